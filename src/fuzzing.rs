//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by
//! `scripts/fuzz.sh`) and of the stable test that replays their corpora
//! (`crates/cli/tests/fuzz_corpus.rs`): one function per target, each
//! taking arbitrary bytes and panicking when the property it documents
//! does not hold. Not part of the product's API.
//!
//! Every function is pure: no file, socket or clock is touched, so a
//! corpus replays the same way everywhere.

use std::cell::RefCell;
use std::path::Path;

use crate::authz::{glob_match, qjson, List};
use crate::control::types::{Allow, Forward, IncomingRequest};
use crate::creds::dn::subject_dn;
use crate::daemon::config::Config;
use crate::net::Endpoint;
use crate::wire::frames::{
    encode_hello, encode_verdict, parse_hello, read_verdict, FrameError, Hello, Secret, Verdict,
    HELLO_MAGIC, MAX_FRAME, VERDICT_MAGIC,
};
use crate::wire::qemu::{
    postcopy_advised, resume_stream, sniff, SniffError, StreamKind, MULTIFD_INIT_LEN, SNIFF_MAX,
    WORST_CASE,
};

/// A target's entry function: panics when its property fails on the input.
pub type Target = fn(&[u8]);

/// The names of the targets, as directories of `fuzz/corpus/` and
/// binaries of `fuzz/fuzz_targets/`, with their entry functions.
pub const TARGETS: &[(&str, Target)] = &[
    ("qemu_stream", qemu_stream),
    ("frames", frames),
    ("acl_json", acl_json),
    ("glob", glob),
    ("dn", dn),
    ("control_body", control_body),
    ("daemon_toml", daemon_toml),
];

/// The QEMU stream sniffer (`wire::qemu`), on `data` as the first bytes of
/// a connection.
///
/// - `sniff`, `postcopy_advised` and `resume_stream` are each monotone in
///   the prefix: once one answers (anything but "incomplete"), every
///   longer prefix gets the same answer (for `NotQemu`, the same kind: its
///   message quotes the bytes seen).
/// - `sniff` decides within [`WORST_CASE`] bytes, so a caller that stops
///   reading at [`SNIFF_MAX`] always gets an answer.
/// - What it reports is in the bytes: a multifd channel's uuid and number,
///   a main channel's machine name and uuid.
/// - The three readers agree: anything `sniff` calls other than a main
///   channel advises no postcopy, and a resumed stream is not a QEMU
///   header.
pub fn qemu_stream(data: &[u8]) {
    let stable = |r: Result<StreamKind, SniffError>| match r {
        Err(SniffError::NotQemu { .. }) => Err(SniffError::NotQemu {
            head: String::new(),
            hint: "",
        }),
        other => other,
    };
    let decided = check_monotone(data, |p| {
        Some(stable(sniff(p))).filter(|r| *r != Err(SniffError::Incomplete))
    });
    if let Some((at, _)) = &decided {
        assert!(*at <= WORST_CASE, "sniff needed {at} bytes");
    }
    if data.len() >= SNIFF_MAX {
        assert!(decided.is_some(), "no answer within SNIFF_MAX bytes");
    }
    let advised = check_monotone(data, postcopy_advised);
    let resumed = check_monotone(data, resume_stream);

    match sniff(data) {
        Ok(StreamKind::Multifd { uuid, channel }) => {
            assert!(data.len() >= MULTIFD_INIT_LEN);
            assert_eq!(&data[8..24], uuid.as_bytes());
            assert_eq!(data[24], channel);
        }
        Ok(StreamKind::Main { uuid, machine }) => {
            if let Some(m) = machine {
                let len = u32::from_be_bytes(data[9..13].try_into().unwrap()) as usize;
                assert_eq!(&data[13..13 + len], m.as_bytes());
            }
            if let Some(u) = uuid {
                assert!(
                    data.windows(16).any(|w| w == u.as_bytes()),
                    "uuid {u} not in the stream"
                );
            }
        }
        Ok(other) => panic!("sniff never returns {other:?}"),
        Err(SniffError::Incomplete) => {}
        Err(_) => assert_eq!(postcopy_advised(data), Some(false)),
    }
    if let Some((_, true)) = advised {
        assert!(matches!(sniff(data), Ok(StreamKind::Main { .. })));
    }
    if let Some((_, true)) = resumed {
        assert!(matches!(sniff(data), Err(SniffError::NotQemu { .. })));
    }
}

/// Finds the shortest prefix of `data` for which `f` answers, and checks
/// that every longer prefix gets the same answer. Returns where and what.
fn check_monotone<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    f: impl Fn(&[u8]) -> Option<T>,
) -> Option<(usize, T)> {
    let at = (0..=data.len()).find(|&n| f(&data[..n]).is_some())?;
    let first = f(&data[..at]).unwrap();
    for n in at + 1..=data.len() {
        let again = f(&data[..n]);
        assert_eq!(
            again.as_ref(),
            Some(&first),
            "answer at {n} bytes differs from the one at {at}"
        );
    }
    Some((at, first))
}

thread_local! {
    /// `read_verdict` is async over an in-memory reader, which never
    /// waits: a current-thread runtime without I/O or timers runs it.
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime"),
    );
}

/// Reads one verdict from `bytes`; returns it and how many bytes it used.
fn read_verdict_sync(bytes: &[u8]) -> (Result<Verdict, FrameError>, usize) {
    RUNTIME.with(|rt| {
        let mut r = bytes;
        let v = rt.borrow().block_on(read_verdict(&mut r));
        (v, bytes.len() - r.len())
    })
}

/// The hello and verdict frames (`wire::frames`), on `data` as what a
/// peer sent.
///
/// - A hello parses only from a whole frame (`MGH1`, length, that many
///   bytes of JSON); every shorter prefix is "need more"; it re-encodes
///   and parses back to itself.
/// - A verdict admits only on exactly `MGV1 00 len`: garbage never
///   admits; it uses no byte past its frame; re-encoded it is the same
///   verdict, and the same bytes when its text was UTF-8.
/// - decode(encode(v)) == v for a verdict built from `data` (first byte:
///   the kind, the rest: the text, cut to the frame limit).
pub fn frames(data: &[u8]) {
    // Hello, framed.
    match parse_hello(data) {
        Ok(Some((hello, used))) => {
            assert_eq!(&data[..4], HELLO_MAGIC);
            let len = u16::from_be_bytes([data[4], data[5]]) as usize;
            assert_eq!(used, 6 + len);
            for n in 0..used {
                assert!(
                    matches!(parse_hello(&data[..n]), Ok(None)),
                    "prefix {n} of a hello is not incomplete"
                );
            }
            hello_round_trip(&hello);
        }
        Ok(None) => {
            if data.len() >= 6 {
                let len = u16::from_be_bytes([data[4], data[5]]) as usize;
                assert!(data.len() < 6 + len, "a whole hello frame was not parsed");
            }
        }
        Err(_) => {}
    }
    // A hello's JSON alone.
    if let Ok(hello) = serde_json::from_slice::<Hello>(data) {
        hello_round_trip(&hello);
    }

    // Verdict, as read from the wire.
    let (v, used) = read_verdict_sync(data);
    assert!(used <= data.len());
    if let Ok(v) = &v {
        assert_eq!(&data[..4], VERDICT_MAGIC);
        let len = u16::from_be_bytes([data[5], data[6]]) as usize;
        assert!(len <= MAX_FRAME);
        assert_eq!(used, 7 + len, "the verdict used bytes past its frame");
        match v {
            Verdict::Admitted => assert_eq!(data[4], 0, "admitted on code {}", data[4]),
            Verdict::Refused { .. } => assert_eq!(data[4], 1),
            Verdict::Bound { .. } => assert_eq!(data[4], 2),
        }
        let again = encode_verdict(v);
        let text_is_utf8 = std::str::from_utf8(&data[7..used]).is_ok();
        if text_is_utf8 && !(data[4] == 0 && len > 0) {
            assert_eq!(again, &data[..used], "re-encoded verdict differs");
        }
        assert_eq!(read_verdict_sync(&again).0.ok().as_ref(), Some(v));
    }

    // decode(encode(v)) == v on a verdict made from the bytes.
    if let Some((&kind, rest)) = data.split_first() {
        let text = String::from_utf8_lossy(rest);
        let mut end = text.len().min(MAX_FRAME);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let text = &text[..end];
        let v = match kind % 3 {
            0 => Verdict::Admitted,
            1 => Verdict::Refused {
                reason: text.to_string(),
            },
            _ => Verdict::Bound {
                token: Secret::new(text),
            },
        };
        let bytes = encode_verdict(&v);
        let (back, used) = read_verdict_sync(&bytes);
        assert_eq!(used, bytes.len());
        assert_eq!(back.ok(), Some(v));
    }
}

/// parse(encode(hello)) == hello, for a hello that fits a frame.
fn hello_round_trip(hello: &Hello) {
    let json = serde_json::to_vec(hello).expect("a hello serializes");
    if json.len() > MAX_FRAME {
        // encode_hello refuses it (by design: every field is bounded
        // where the gateway makes it); nothing to round-trip.
        return;
    }
    let bytes = encode_hello(hello);
    let (back, used) = parse_hello(&bytes)
        .expect("an encoded hello parses")
        .expect("an encoded hello is whole");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, hello);
}

/// The ACL JSON in QEMU's dialect (`authz::qjson`, `authz::list`), on
/// `data` as the contents of an authz-list-file.
///
/// - An error points into the text (its line exists).
/// - A loaded list prints (`Display`) as JSON that loads back to the same
///   list.
/// - Evaluation is first-match: the identity a rule names exactly is
///   decided by that rule or an earlier one.
pub fn acl_json(data: &[u8]) {
    let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
    if let Err(e) = qjson::parse(data) {
        assert!(e.pos.line >= 1 && e.pos.line <= lines, "{e:?}");
        assert!(e.pos.column >= 1, "{e:?}");
    }
    let list = match List::from_json("fuzz", data) {
        Ok(list) => list,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= lines, "{e:?}");
            return;
        }
    };
    let printed = list.to_string();
    let back = List::from_json("fuzz", printed.as_bytes())
        .unwrap_or_else(|e| panic!("printed list {printed} does not load: {e}"));
    assert_eq!(back, list);
    for (i, rule) in list.rules().iter().enumerate() {
        let (policy, by) = list.evaluate(&rule.pattern);
        if let Some(j) = by {
            assert!(list.rules()[j].matches(&rule.pattern));
            assert_eq!(policy, list.rules()[j].policy);
            if rule.matches(&rule.pattern) {
                assert!(j <= i, "rule {i} matches itself but rule {j} decided");
            }
        } else {
            assert_eq!(policy, list.policy());
            assert!(!rule.matches(&rule.pattern));
        }
    }
}

/// Longest pattern or subject (in characters) the glob target compares
/// with its quadratic reference.
const GLOB_MAX_CHARS: usize = 1024;

/// The glob matcher (`authz::glob`), on `data` as pattern NUL subject
/// (each lossily UTF-8; no NUL: the whole input is both).
///
/// - It agrees with GLib's `g_pattern_match_simple` semantics, computed
///   independently by dynamic programming.
/// - Every string matches itself as a pattern (`*` and `?` match
///   themselves), and `*` matches everything.
pub fn glob(data: &[u8]) {
    let (p, t) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    let pattern = String::from_utf8_lossy(p);
    let text = String::from_utf8_lossy(t);
    let got = glob_match(&pattern, &text);
    let pc: Vec<char> = pattern.chars().take(GLOB_MAX_CHARS + 1).collect();
    let tc: Vec<char> = text.chars().take(GLOB_MAX_CHARS + 1).collect();
    if pc.len() <= GLOB_MAX_CHARS && tc.len() <= GLOB_MAX_CHARS {
        assert_eq!(
            got,
            glob_reference(&pc, &tc),
            "pattern {pattern:?} subject {text:?}"
        );
    }
    assert!(glob_match(&text, &text), "{text:?} does not match itself");
    assert!(glob_match(&pattern, &pattern));
    assert!(glob_match("*", &text));
}

/// `g_pattern_match_simple` by dynamic programming: `m[i][j]` is whether
/// the pattern from `i` matches the text from `j`.
fn glob_reference(p: &[char], t: &[char]) -> bool {
    let mut next = vec![false; t.len() + 1];
    next[t.len()] = true; // empty pattern matches only the empty rest
    for i in (0..p.len()).rev() {
        let mut cur = vec![false; t.len() + 1];
        for j in (0..=t.len()).rev() {
            cur[j] = match p[i] {
                '*' => next[j] || (j < t.len() && cur[j + 1]),
                '?' => j < t.len() && next[j + 1],
                c => j < t.len() && t[j] == c && next[j + 1],
            };
        }
        next = cur;
    }
    next[0]
}

/// The DN renderer (`creds::dn`), on `data` both as a whole certificate
/// and as the contents of a subject Name put into two certificate
/// skeletons that differ in everything else.
///
/// - A rendered DN is never empty.
/// - The rendering depends only on the subject (both skeletons agree,
///   on the string or on the error).
/// - Where x509-parser also reads the Name (and no RDN is empty, where
///   x509-parser stops silently), the DN has one unescaped separator
///   (`,` or `+`) between attribute values: what a value holds cannot
///   split it into two.
pub fn dn(data: &[u8]) {
    if let Ok(s) = subject_dn(data) {
        assert!(!s.is_empty());
    }
    let name = der(0x30, data);
    let a = subject_dn(&skeleton(&name, 1, b"issuer-a"));
    let b = subject_dn(&skeleton(&name, 0x7f_ffff, b"another issuer"));
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y),
        (Err(x), Err(y)) => assert_eq!(x.to_string(), y.to_string()),
        _ => panic!("the skeleton changed the answer: {a:?} vs {b:?}"),
    }
    let Ok(rendered) = a else { return };
    assert!(!rendered.is_empty());
    // x509-parser stops, without an error, at an empty RDN (which GnuTLS
    // accepts and renders): compare only Names without one.
    if !top_level_lengths(data).is_some_and(|lens| lens.iter().all(|&n| n > 0)) {
        return;
    }
    if let Ok((rest, parsed)) = <x509_parser::x509::X509Name as x509_parser::prelude::FromDer<
        x509_parser::error::X509Error,
    >>::from_der(&name)
    {
        if !rest.is_empty() {
            return;
        }
        let values: usize = parsed.iter().map(|rdn| rdn.iter().count()).sum();
        // GnuTLS's separators: `+` inside an RDN, `,` between RDNs.
        let (separators, _) = unescaped_separators(&rendered);
        assert_eq!(
            separators + 1,
            values,
            "DN {rendered:?} from {values} values"
        );
    }
}

/// The content lengths of the DER elements `data` is made of, in order;
/// `None` if it is not such a sequence (definite lengths only).
fn top_level_lengths(mut data: &[u8]) -> Option<Vec<usize>> {
    let mut lens = Vec::new();
    while !data.is_empty() {
        if data.len() < 2 || data[0] & 0x1f == 0x1f {
            return None;
        }
        let (len, head) = match data[1] {
            n @ 0..=0x7f => (usize::from(n), 2),
            0x80 => return None,
            n => {
                let k = usize::from(n & 0x7f);
                if k > 4 || data.len() < 2 + k {
                    return None;
                }
                let len = data[2..2 + k]
                    .iter()
                    .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
                (len, 2 + k)
            }
        };
        let end = head.checked_add(len).filter(|&e| e <= data.len())?;
        lens.push(len);
        data = &data[end..];
    }
    Some(lens)
}

/// The separators of a rendered DN that no backslash escapes, and
/// whether the last character is one (a dangling `,`).
fn unescaped_separators(dn: &str) -> (usize, bool) {
    let (mut n, mut last) = (0, false);
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        last = false;
        match c {
            '\\' => {
                chars.next();
            }
            ',' | '+' => {
                n += 1;
                last = c == ',';
            }
            _ => {}
        }
    }
    (n, last)
}

/// A DER TLV with a definite length.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend(&bytes[skip..]);
    }
    out.extend(content);
    out
}

/// A certificate around `subject` (a whole Name TLV): what the renderer
/// walks past before the subject, with a fake signature.
fn skeleton(subject: &[u8], serial: u32, issuer_cn: &[u8]) -> Vec<u8> {
    let version = der(0xa0, &der(0x02, &[2]));
    let serial = der(0x02, &serial.to_be_bytes());
    // ecdsa-with-SHA256.
    let alg = der(
        0x30,
        &der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
    );
    let cn = [der(0x06, &[0x55, 0x04, 0x03]), der(0x0c, issuer_cn)].concat();
    let issuer = der(0x30, &der(0x31, &der(0x30, &cn)));
    let validity = der(
        0x30,
        &[der(0x17, b"250101000000Z"), der(0x17, b"350101000000Z")].concat(),
    );
    let spki = der(
        0x30,
        &[
            der(
                0x30,
                &der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]),
            ),
            der(0x03, &[0, 4, 1, 2, 3]),
        ]
        .concat(),
    );
    let tbs = der(
        0x30,
        &[
            version,
            serial,
            alg.clone(),
            issuer,
            validity,
            subject.to_vec(),
            spki,
        ]
        .concat(),
    );
    der(0x30, &[tbs, alg, der(0x03, &[0, 0x30, 0])].concat())
}

/// The listeners the control-body target's daemon has.
const LISTEN: &[&str] = &["127.0.0.1:49152", "[::1]:49153"];

/// The control API's `POST /v1/incoming` body (`control::types`) and the
/// checks the server applies to a parsed body before it registers
/// anything (`control::server`), on `data` as the body.
///
/// - A parsed request serializes and parses back to itself.
/// - Listener binding yields at least one listener, each once, each one
///   the daemon has.
/// - An accepted `forward` endpoint prints and parses back to itself.
/// - An accepted `allow` describes what it allows.
/// - Not run: `allow.acl_file` (the server opens the file) and the QMP
///   forward's connection (only its pure checks are).
pub fn control_body(data: &[u8]) {
    let Ok(req) = serde_json::from_slice::<IncomingRequest>(data) else {
        return;
    };
    let json = serde_json::to_vec(&req).expect("a request serializes");
    let back: IncomingRequest = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "{} does not parse back: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    // serde_json parses floats to within one unit in the last place (its
    // default, without float_roundtrip): a migration parameter given as a
    // float may come back that close, not bit-equal.
    let mut back = back;
    if let (Forward::Qmp(b), Forward::Qmp(r)) = (&mut back.forward, &req.forward) {
        if b.parameters.len() == r.parameters.len()
            && r.parameters
                .iter()
                .all(|(k, v)| b.parameters.get(k).is_some_and(|w| json_close(v, w)))
        {
            b.parameters = r.parameters.clone();
        }
    }
    assert_eq!(back, req);

    let listen: Vec<String> = LISTEN.iter().map(|s| s.to_string()).collect();
    if let Ok(bound) = crate::control::server::bind_listeners(&listen, req.listeners.as_deref()) {
        assert!(!bound.is_empty());
        for (k, i) in bound.iter().enumerate() {
            assert!(*i < listen.len());
            assert!(!bound[..k].contains(i), "listener {i} bound twice");
        }
    }
    match &req.forward {
        Forward::Endpoint(s) => {
            if let Ok(ep) = crate::control::server::parse_forward(s) {
                endpoint_round_trip(&ep);
            }
        }
        Forward::Qmp(q) => {
            let _ = crate::daemon::target_qemu::qmp_path(q);
            let _ = crate::daemon::target_qemu::check_request(q);
        }
    }
    if !matches!(req.allow, Allow::AclFile(_)) {
        if let Ok((_, desc)) = crate::control::server::build_allow(&req.allow) {
            assert!(!desc.is_empty());
        }
    }
}

/// Equal JSON values, floats to within a relative 1e-15.
fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Array(x), Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y))
        }
        (Object(x), Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}

fn endpoint_round_trip(ep: &Endpoint) {
    let shown = ep.to_string();
    let back: Endpoint = shown
        .parse()
        .unwrap_or_else(|e| panic!("endpoint {shown:?} does not parse back: {e}"));
    assert_eq!(&back, ep);
}

/// The daemon's TOML (`daemon::config`), on `data` as the file.
///
/// - A parsed configuration dumps (`miggate daemon --dump-config`) as
///   TOML that parses back to itself.
/// - A configuration may always be reloaded over itself.
/// - The checks `build` applies to the text alone (socket mode, listen
///   addresses, authz choice, forward endpoints) do not panic, and an
///   accepted forward prints and parses back to itself. Not run: the rest
///   of `build`, which reads certificates and ACL files.
pub fn daemon_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/fuzz/daemon.toml");
    let Ok(config) = Config::parse(file, text) else {
        return;
    };
    let dumped = config.dump();
    let back = Config::parse(file, &dumped)
        .unwrap_or_else(|e| panic!("dumped configuration does not parse: {e}\n{dumped}"));
    assert_eq!(back, config, "dump:\n{dumped}");
    config
        .check_reloadable(&config, file)
        .expect("a configuration reloads over itself");

    use crate::daemon::config::{authz_choice, check_hostport, parse_mode};
    if let Some(mode) = parse_mode(&config.api.socket_mode) {
        assert!(mode <= 0o777);
    }
    if let Some(tls) = &config.api.tls {
        let _ = check_hostport(&tls.listen);
        let _ = authz_choice(
            &tls.authz_identity,
            &tls.authz_list_file,
            tls.no_refresh,
            tls.allow_any_verified_peer,
        );
    }
    for t in &config.targets {
        let _ = check_hostport(&t.listen);
        let _ = authz_choice(
            &t.authz_identity,
            &t.authz_list_file,
            t.no_refresh,
            t.allow_any_verified_peer,
        );
        if let Some(Ok(ep)) = t.forward.as_deref().map(str::parse::<Endpoint>) {
            endpoint_round_trip(&ep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Floats serde_json reads only to within one unit in the last place
    /// do not make the request round trip fail.
    #[test]
    fn control_body_tolerates_float_parameters() {
        control_body(
            br#"{"allow":{"any_verified_peer":true},"forward":{"qmp":"unix:/q","parameters":
            {"a":2.2250738585072011e-308,"b":[1.7976931348623157e308,0.30000000000000004,1e-320],
             "c":{"d":9007199254740993.0,"e":-0.0}}}}"#,
        );
    }

    #[test]
    fn glob_reference_agrees_on_examples() {
        for (p, t, want) in [
            ("*", "", true),
            ("?", "", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*?", "x", true),
            ("CN=?ü*", "CN=Müller", true),
        ] {
            let (p, t): (Vec<char>, Vec<char>) = (p.chars().collect(), t.chars().collect());
            assert_eq!(glob_reference(&p, &t), want, "{p:?} {t:?}");
        }
    }
}
