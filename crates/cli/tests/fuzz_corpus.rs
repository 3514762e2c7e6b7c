//! Replays the fuzz corpora on stable: every file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` goes through the same entry function
//! the libFuzzer target calls (`miggate::fuzzing`), which panics when the
//! property it documents fails. A target without a corpus fails the test,
//! so a renamed or forgotten target cannot pass by replaying nothing.
//!
//! `cargo test -p miggate-cli --test fuzz_corpus -- --ignored write_seeds`
//! (re)writes the seed inputs (real captures, encoder output, the docs'
//! examples) into the corpora; `scripts/fuzz.sh` then grows and
//! minimises them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use miggate::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Runs every file of `dir` through `f`; returns the files that panicked,
/// with the panic message.
fn replay(dir: &Path, f: fn(&[u8])) -> (usize, Vec<String>) {
    let mut failed = Vec::new();
    let inputs = files(dir);
    for p in &inputs {
        let data = match std::fs::read(p) {
            Ok(data) => data,
            // Removed by a fuzzer running on the corpus right now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", p.display()),
        };
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(&data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", p.display()));
        }
    }
    (inputs.len(), failed)
}

#[test]
fn every_corpus_and_regression_input_keeps_its_property() {
    let root = fuzz_dir();
    let mut failed = Vec::new();
    for (name, f) in TARGETS {
        let corpus = root.join("corpus").join(name);
        let (n, mut bad) = replay(&corpus, *f);
        assert!(
            n > 0,
            "fuzz target {name} has no corpus in {} (run scripts/fuzz.sh {name})",
            corpus.display()
        );
        failed.append(&mut bad);
        let (_, mut bad) = replay(&root.join("regressions").join(name), *f);
        failed.append(&mut bad);
    }
    // Every regression directory belongs to a target.
    for dir in std::fs::read_dir(root.join("regressions")).unwrap() {
        let dir = dir.unwrap();
        if !dir.path().is_dir() {
            continue;
        }
        let name = dir.file_name().into_string().unwrap();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/regressions/{name} is no fuzz target"
        );
    }
    assert!(failed.is_empty(), "failing inputs:\n{}", failed.join("\n"));
}

/// Every libFuzzer target is one of the entry functions, and back.
#[test]
fn targets_and_entry_functions_match() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = files(&dir)
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    for t in &listed {
        let src = std::fs::read_to_string(dir.join(format!("{t}.rs"))).unwrap();
        assert!(
            src.contains(&format!("miggate::fuzzing::{t}(data)")),
            "fuzz_targets/{t}.rs does not call miggate::fuzzing::{t}"
        );
    }
}

/// Writes the seed inputs. Not run by default: the committed corpora
/// are these seeds grown by the fuzzer and minimised.
#[test]
#[ignore]
fn write_seeds() {
    let root = fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    seeds::qemu_stream(&mut |n, d| put("qemu_stream", n, d));
    seeds::frames(&mut |n, d| put("frames", n, d));
    seeds::acl_json(&mut |n, d| put("acl_json", n, d));
    seeds::glob(&mut |n, d| put("glob", n, d));
    seeds::dn(&mut |n, d| put("dn", n, d));
    seeds::control_body(&mut |n, d| put("control_body", n, d));
    seeds::daemon_toml(&mut |n, d| put("daemon_toml", n, d));
}

mod seeds {
    use std::path::Path;

    use miggate::wire::frames::{encode_hello, encode_verdict, Hello, Secret, Verdict};
    use rcgen::{
        BmpString, CertificateParams, DistinguishedName, DnType, DnValue, Ia5String, KeyPair,
        PrintableString, TeletexString,
    };

    type Put<'a> = &'a mut dyn FnMut(&str, &[u8]);

    fn repo() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    /// The captured QEMU 7.2 streams, and what follows a header in the
    /// cases the captures lack (postcopy advise, a resumed stream).
    pub fn qemu_stream(put: Put) {
        let dir = repo().join("crates/lab/fixtures/streams");
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "bin") {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let data = std::fs::read(&p).unwrap();
                // The first 256 bytes hold every decision; keep seeds small.
                put(&name, &data[..data.len().min(256)]);
            }
        }
        let uuid = std::fs::read(dir.join("qemu72-main-uuid.bin")).unwrap();
        // Header + configuration + uuid subsection: 66 bytes, then the
        // commands migration_thread() sends first: open return path (1),
        // ping (2, be32), postcopy advise (3, two be64: page sizes).
        let mut advised = uuid[..66].to_vec();
        advised.extend([0x08, 0x00, 0x01, 0x00, 0x00]);
        advised.extend([0x08, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 1]);
        advised.extend([0x08, 0x00, 0x03, 0x00, 0x10]);
        advised.extend(4096u64.to_be_bytes());
        advised.extend(4096u64.to_be_bytes());
        advised.push(0x01);
        put("main-uuid-postcopy-advise", &advised);
        let mut resumed = vec![0x08, 0x00, 0x0a, 0x00, 0x07, 0x06];
        resumed.extend(b"pc.ram");
        put("resume-recv-bitmap", &resumed);
        put("postcopy-magic", &[0x55, 0x66, 0x77, 0x88, 0, 0, 0, 0]);
        put("qevm-v2", &[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 2, 0x07]);
        put("tls-client-hello", &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
        put("http", b"GET / HTTP/1.1\r\n");
    }

    /// What the encoders produce, every field used.
    pub fn frames(put: Put) {
        let secret = "0f".repeat(32);
        put("hello-default", &encode_hello(&Hello::default()));
        let ticket = Hello {
            ticket: Some(Secret::new(&secret)),
            bind: true,
            ..Hello::default()
        };
        put("hello-ticket-bind", &encode_hello(&ticket));
        let join = Hello {
            join: Some(Secret::new(&secret)),
            ..Hello::default()
        };
        put("hello-join", &encode_hello(&join));
        let resume = Hello {
            ticket: Some(Secret::new(&secret)),
            resume: Some(Secret::new(&secret)),
            bind: true,
            ..Hello::default()
        };
        put("hello-resume", &encode_hello(&resume));
        let mut with_stream = encode_hello(&ticket);
        with_stream.extend(b"QEVM\0\0\0\x03");
        put("hello-then-stream", &with_stream);
        put("verdict-admitted", &encode_verdict(&Verdict::Admitted));
        let refused = Verdict::Refused {
            reason: "peer O=Example Org,CN=src not allowed by ACL (default policy deny) é".into(),
        };
        put("verdict-refused", &encode_verdict(&refused));
        let bound = Verdict::Bound {
            token: Secret::new(&secret),
        };
        put("verdict-bound", &encode_verdict(&bound));
        put(
            "hello-json",
            br#"{"version":1,"agent":"miggate/0.1.0","ticket":"ab","bind":true}"#,
        );
    }

    /// The ACL files of the tests and docs.
    pub fn acl_json(put: Put) {
        let docs: &[(&str, &str)] = &[
            (
                "seed-004",
                r#"{
  "rules": [
     { "match": "fred", "policy": "allow", "format": "exact" },
     { "match": "bob", "policy": "allow", "format": "exact" },
     { "match": "danb", "policy": "deny", "format": "glob" },
     { "match": "dan*", "policy": "allow", "format": "exact" }
  ],
  "policy": "deny"
}"#,
            ),
            (
                "single-quotes-escapes",
                r#"{'rules': [{'match': 'O=Example Org,CN=*.example.org', 'policy': 'allow', 'format': 'glob'}, {"match": "CN=\u00e9\'x\"", "policy": "deny"}], 'policy': 'deny'}"#,
            ),
            ("empty-allow", r#"{"policy": "allow", "rules": []}"#),
            (
                "bad-enum",
                r#"{"rules": [{"match": "a", "policy": "permit"}]}"#,
            ),
            (
                "trailing-comma",
                r#"{"rules": [{"match": "a", "policy": "allow"},]}"#,
            ),
            ("duplicate-key", r#"{"policy": "allow", "policy": "deny"}"#),
            ("nested", "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]"),
            (
                "literals",
                "[true, false, null, -1.5e3, 0, \"\\ud83d\\ude00\"]",
            ),
        ];
        for (n, d) in docs {
            put(n, d.as_bytes());
        }
    }

    pub fn glob(put: Put) {
        let cases: &[(&str, &str)] = &[
            ("*.example.com", "CN=x.example.com"),
            ("a*b*c", "aXXbYYc"),
            ("*ab*ab", "abababab"),
            ("CN=?ü*", "CN=Müller"),
            ("O=Foo\\, Inc*", "O=Foo\\, Inc.,CN=x"),
            ("[ab]?*", "[ab]é"),
            ("O=Example Org,CN=*", "O=Example Org,CN=src.example.org"),
        ];
        for (i, (p, t)) in cases.iter().enumerate() {
            put(&format!("case-{i}"), format!("{p}\0{t}").as_bytes());
        }
    }

    fn mint(entries: Vec<(DnType, DnValue)>) -> Vec<u8> {
        let mut dn = DistinguishedName::new();
        for (ty, value) in entries {
            dn.push(ty, value);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// Certificates as the lab's PKI and openssl make them, and bare
    /// Name contents (the target also wraps its input as a subject).
    pub fn dn(put: Put) {
        let utf8 = |s: &str| DnValue::Utf8String(s.into());
        put(
            "cert-london",
            &mint(vec![
                (
                    DnType::CountryName,
                    DnValue::PrintableString(PrintableString::try_from("GB").unwrap()),
                ),
                (DnType::StateOrProvinceName, utf8("London")),
                (DnType::OrganizationName, utf8("Example Org")),
                (DnType::CommonName, utf8("laptop.example.com")),
            ]),
        );
        put(
            "cert-odd-values",
            &mint(vec![
                (DnType::OrganizationName, utf8(" #Foo, Inc.+\"<>;\\ ")),
                (
                    DnType::OrganizationalUnitName,
                    DnValue::BmpString(BmpString::try_from("Jösé").unwrap()),
                ),
                (
                    DnType::LocalityName,
                    DnValue::TeletexString(TeletexString::try_from("teletex").unwrap()),
                ),
                (
                    DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 25]),
                    DnValue::Ia5String(Ia5String::try_from("example").unwrap()),
                ),
                (DnType::CustomDnType(vec![1, 2, 3, 4]), utf8("hello")),
                (DnType::CommonName, utf8("名前")),
            ]),
        );
        // openssl req -multivalue-rdn -subj "/O=Org/OU=a+CN=b", and
        // "/DC=example/DC=com/OU=one/OU=two/CN=joe/emailAddress=...":
        // the contents of the subject SEQUENCE.
        let names = [
            (
                "name-multivalued",
                "310c300a060355040a0c034f72673114300806035504030c01623008060355040b0c0161",
            ),
            (
                "name-dc-email",
                "31173015060a0992268993f22c64011916076578616d706c6531133011060a0992268993\
                 f22c6401191603636f6d310c300a060355040b0c036f6e65310c300a060355040b0c0374776f\
                 310c300a06035504030c036a6f65311e301c06092a864886f70d010901160f6a6f6540657861\
                 6d706c652e636f6d",
            ),
            ("name-empty-last-rdn", "310c300a060355040a0c034f72673100"),
        ];
        for (n, h) in names {
            put(n, &unhex(h));
        }
    }

    fn unhex(h: &str) -> Vec<u8> {
        let h: Vec<u8> = h.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        h.chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect()
    }

    /// The request bodies of docs/api.yaml and the tests.
    pub fn control_body(put: Put) {
        let bodies: &[(&str, &str)] = &[
            (
                "doc-identity",
                r#"{"vm_uuid": "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
   "allow": {"identity": "O=Example Org,CN=src.example.org"},
   "forward": "tcp:127.0.0.1:4444"}"#,
            ),
            (
                "qmp-forward",
                r#"{"vm_uuid":"6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b","allow":{"identity":"O=x,CN=y"},"forward":{"qmp":"unix:/var/lib/libvirt/qemu/domain-1-vm1/monitor.sock","capabilities":{"multifd":true,"postcopy-ram":true},"parameters":{"multifd-channels":4}},"channels":5,"expires_in":600}"#,
            ),
            (
                "any-verified-listeners",
                r#"{"allow":{"any_verified_peer":true},"forward":"unix:/run/q.sock","listeners":[1,"127.0.0.1:49152"]}"#,
            ),
            (
                "acl-file",
                r#"{"allow":{"acl_file":"/etc/miggate/acl.json"},"forward":"tcp:[::1]:4444","channels":64,"expires_in":86400}"#,
            ),
        ];
        for (n, d) in bodies {
            put(n, d.as_bytes());
        }
    }

    pub fn daemon_toml(put: Put) {
        let example = std::fs::read(repo().join("docs/daemon.example.toml")).unwrap();
        put("daemon.example.toml", &example);
        put(
            "static-route",
            br#"[daemon]
runtime_dir = "/run/miggate"
retention = 60
[api]
socket = "/run/miggate/api.sock"
socket_mode = "0o660"
[api.tls]
listen = "[::]:9443"
x509_dir = "/etc/pki/miggate-admin"
authz_list_file = "/etc/miggate/admin-acl.json"
no_refresh = true
[metrics]
listen = "127.0.0.1:9464"
[[target]]
listen = "0.0.0.0:49152"
x509_dir = "/etc/pki/miggate"
forward = "tcp:127.0.0.1:4444"
authz_identity = "O=Example Org,CN=src.example.org"
expect_uuid = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
stall_timeout = 30
handshake_timeout = 10
max_pending = 64
max_pending_per_ip = 8
[[target]]
listen = "127.0.0.1:49153"
x509_dir = "/etc/pki/other"
"#,
        );
    }
}
