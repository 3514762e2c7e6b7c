//! How the TLS sessions of a migration with QEMU's own TLS end, per QEMU
//! version, on both sides of miggate (`miggate::relay::native` has the
//! facts and the rule): every target record says how its source's TLS
//! stream ended (`tls_end`), a QEMU 10 source's multifd channels end with
//! close_notify and one that does not is a failure, a 7.2 source's end
//! with a bare EOF and complete, and a QEMU 10 target sees miggate end
//! every multifd channel cleanly.

mod common;

use common::native::{multifd_init_packet, native_tls_source, native_tls_target, NativeOpts};
use common::scenario::*;
use miggate::creds::tls;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A QEMU source with native TLS migrates through a target gateway; both
/// QEMUs complete and the RAM arrives intact. Returns the gateway's
/// records, sorted by channel (`main`, `multifd/0`, ...).
async fn native_source_through_target_gateway(opts: NativeOpts<'_>) -> Vec<Value> {
    let pki = pki();
    let pki = pki_dir(&pki);
    let (mut src, mut dst, port) = native_tls_source(&pki, opts).await;
    let mut tgw = target_gateway(&pki, port, &["--authz-identity", SOURCE_DN]).await;
    let hash = src.ram_sha256().await.unwrap();
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", tgw.addr)).await;
    assert_eq!(dst.ram_sha256().await.unwrap(), hash, "RAM differs");
    let channels = 1 + usize::from(opts.multifd.unwrap_or(0));
    let mut recs = outcomes(&mut tgw, channels).await;
    recs.sort_by_key(|r| r["channel"].as_str().unwrap_or("-").to_string());
    eprintln!("{opts:?}: {recs:#?}");
    recs
}

fn field<'a>(rec: &'a Value, name: &str) -> &'a str {
    rec[name].as_str().unwrap_or("-")
}

/// (a) QEMU 10.0 ends each multifd channel with close_notify
/// (`gnutls_bye()` in `multifd_send_shutdown()`); its main channel with a
/// bare EOF (or a reset). Every channel completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu10_source_ends_every_multifd_channel_with_close_notify() {
    let recs = native_source_through_target_gateway(NativeOpts {
        multifd: Some(2),
        ..NativeOpts::new(Versions::Q10)
    })
    .await;
    let channels: Vec<&str> = recs.iter().map(|r| field(r, "channel")).collect();
    assert_eq!(channels, ["main", "multifd/0", "multifd/1"]);
    for r in &recs {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    for r in &recs[1..] {
        assert_eq!(field(r, "tls_end"), "close_notify", "{r}");
    }
    assert!(
        matches!(field(&recs[0], "tls_end"), "eof" | "reset"),
        "QEMU ends its main channel without close_notify: {}",
        recs[0]
    );
}

/// (b) QEMU 7.2 ends every multifd channel with a bare EOF (and its main
/// channel, or with a reset): that is how it always ends, so each channel
/// still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu72_source_ends_multifd_channels_without_close_notify_and_completes() {
    let recs = native_source_through_target_gateway(NativeOpts {
        multifd: Some(2),
        ..NativeOpts::new(Versions::Q72)
    })
    .await;
    for r in &recs {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    for r in &recs[1..] {
        assert_eq!(field(r, "tls_end"), "eof", "{r}");
    }
    // Its main channel ends the same way, or (sometimes, with our last
    // records unread) with a reset.
    assert!(
        matches!(field(&recs[0], "tls_end"), "eof" | "reset"),
        "{}",
        recs[0]
    );
}

/// QEMU 10.0 on machine type pc-i440fx-7.2 ends its multifd channels with
/// close_notify all the same (the source sends it whatever the machine
/// type); the gateway, which can only see the machine type, does not
/// require it there and records what it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu10_source_on_an_old_machine_type_is_not_required_to_but_does() {
    let recs = native_source_through_target_gateway(NativeOpts {
        multifd: Some(2),
        machine: Some("pc-i440fx-7.2"),
        ..NativeOpts::new(Versions::Q10)
    })
    .await;
    for r in &recs {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    for r in &recs[1..] {
        assert_eq!(field(r, "tls_end"), "close_notify", "{r}");
    }
}

/// What a QEMU 10 destination says of a multifd TLS session that ended
/// without close_notify: GnuTLS's GNUTLS_E_PREMATURE_TERMINATION, seen in
/// its `query-migrate` as "Cannot read from TLS channel: The TLS
/// connection was non-properly terminated." (with status `completed`),
/// and QEMU's other wordings of it.
const TERMINATION_ERRORS: [&str; 4] = [
    "non-properly terminated",
    "premature",
    "unexpected end-of-file",
    "terminate tls",
];

fn termination_errors(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            let l = l.to_lowercase();
            TERMINATION_ERRORS.iter().any(|e| l.contains(e))
        })
        .collect()
}

/// The TLS termination errors a finished QEMU 10 destination reports, in
/// its `query-migrate` and on its stderr; asserts it completed.
async fn destination_termination_errors(dst: &mut common::qemu::Qemu) -> Vec<String> {
    let info = dst.query_migrate().await.unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"), "{:?}", info.raw);
    let text = format!(
        "{}\n{}",
        info.error_desc.unwrap_or_default(),
        dst.stderr_text()
    );
    termination_errors(&text)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Without `return-path` a QEMU 10 destination's multifd threads still
/// read when the source ends its channels, so it checks how they end
/// (with `return-path` it has often stopped reading: the check is racy).
fn multifd_no_return_path(versions: Versions) -> NativeOpts<'static> {
    NativeOpts {
        multifd: Some(2),
        return_path: false,
        ..NativeOpts::new(versions)
    }
}

/// (c) miggate source → QEMU 10.0 target with native TLS and multifd 2
/// (machine type pc-i440fx-10.0: `multifd-clean-tls-termination` on): the
/// gateway ends each channel with close_notify, so the target completes
/// and reports no TLS termination error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miggate_source_ends_multifd_channels_cleanly_into_qemu10() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let opts = multifd_no_return_path(Versions::Q10);
    let (mut src, mut dst, tls_port) = native_tls_target(&pki, SOURCE_DN, None, opts).await;
    let mut sgw = source_gateway(&pki, &format!("127.0.0.1:{tls_port}"), &[]).await;
    let hash = src.ram_sha256().await.unwrap();
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(dst.ram_sha256().await.unwrap(), hash, "RAM differs");
    for r in outcomes(&mut sgw, 3).await {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    assert_eq!(
        destination_termination_errors(&mut dst).await,
        Vec::<String>::new()
    );
}

/// The control of (c): a QEMU 7.2 source with native TLS (no close_notify
/// on its multifd channels) straight into a QEMU 10.0 target that requires
/// it (`multifd-clean-tls-termination` forced on; machine type
/// pc-i440fx-7.2 on both): the target reports the termination error (c)
/// looks for. Whether its multifd threads still read when the EOF comes is
/// a race (about 1 migration in 8 here ends before they do, and reports
/// nothing), so up to [`CONTROL_ATTEMPTS`] migrations, one must report it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_qemu10_target_reports_multifd_channels_ended_without_close_notify() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let mut seen = Vec::new();
    for _ in 0..CONTROL_ATTEMPTS {
        let (status, text) = qemu72_straight_into_strict_qemu10(&pki).await;
        if termination_errors(&text)
            .iter()
            .any(|e| e.contains("non-properly terminated"))
        {
            return;
        }
        seen.push(format!("{status:?}: {text}"));
    }
    panic!("no attempt reported a TLS termination error: {seen:#?}");
}

const CONTROL_ATTEMPTS: usize = 4;

/// One migration of the control; returns the target's final status and
/// its error description and stderr.
async fn qemu72_straight_into_strict_qemu10(pki: &std::path::Path) -> (Option<String>, String) {
    use common::qemu::{Guest, NativeTls, Qemu, QemuOpts, TlsEndpoint};
    let native = |endpoint, authz_identity| NativeTls {
        dir: pki.to_path_buf(),
        endpoint,
        authz_identity,
        priority: None,
    };
    let mut src_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 43 }, 128);
    let mut dst_opts = src_opts.as_incoming();
    Versions::Q72ToQ10.apply(&mut src_opts, &mut dst_opts);
    src_opts.tls = Some(native(TlsEndpoint::Client, None));
    dst_opts.tls = Some(native(TlsEndpoint::Server, Some(SOURCE_DN.into())));
    dst_opts.extra_args.extend([
        "-global".to_string(),
        "migration.multifd-clean-tls-termination=on".to_string(),
    ]);
    let (mut src, mut dst) = Qemu::pair(src_opts, dst_opts).await.unwrap();
    src.set_unlimited_bandwidth().await.unwrap();
    capabilities(&mut src, &mut dst, &[("multifd", true)]).await;
    for q in [&mut src, &mut dst] {
        q.set_parameters(serde_json::json!({ "multifd-channels": 2 }))
            .await
            .unwrap();
    }
    src.set_native_tls_parameters(Some("127.0.0.1"))
        .await
        .unwrap();
    dst.set_native_tls_parameters(None).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    src.migrate(&format!("tcp:127.0.0.1:{port}")).await.unwrap();
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(s.status.as_deref(), Some("completed"), "{:?}", s.raw);
    // The target either completes with the error in `error-desc`, or
    // fails and exits with it on stderr.
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let text = format!(
        "{}\n{}",
        d.error_desc.clone().unwrap_or_default(),
        dst.stderr_text()
    );
    (d.status, text)
}

// Loopback: real TLS and the real gateways, a hand-made QEMU on the other
// side, so that the stream can be cut exactly where the test wants.

/// The start of a QEMU main channel whose configuration section names
/// `machine` (QEMU 7.2's captured stream, the machine type renamed).
fn main_channel_start(machine: &str) -> Vec<u8> {
    let captured = miggate_lab::fixtures::QEMU72_MAIN_PLAIN;
    let name = b"pc-i440fx-7.2";
    assert_eq!(&captured[13..13 + name.len()], name, "fixture layout");
    let mut v = captured[..9].to_vec();
    v.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    v.extend_from_slice(machine.as_bytes());
    v.extend_from_slice(&captured[13 + name.len()..]);
    v
}

/// A connection to `addr` as QEMU's native TLS makes it: the client
/// certificate of `pki`, no ALPN.
async fn qemu_tls_connect(
    pki: &std::path::Path,
    addr: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(pki, &[]).unwrap());
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, sock).await.unwrap()
}

/// A plain target QEMU as far as the wire goes: reads each connection to
/// its end, then closes it. Returns its port.
async fn reading_target() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
        }
    });
    port
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    CloseNotify,
    /// TCP EOF without close_notify.
    Cut,
}

/// (d) A multifd channel of a source whose main channel names a 10.0
/// machine type, cut without close_notify, is recorded `failed` with that
/// reason; the same channel ending with close_notify completes, and cut
/// after a 7.2 machine type's main channel it completes too (what 7.2
/// always does). Each record says how the stream ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu10_multifd_channel_cut_without_close_notify_fails() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let mut tgw = target_gateway(
        &pki,
        reading_target().await,
        &["--authz-identity", SOURCE_DN],
    )
    .await;
    let cut_reason = "source->target: the source QEMU's TLS stream was cut without close_notify \
                      (its machine type is version 10.0, and QEMU 10.0 or later ends every \
                      multifd channel with close_notify)";
    for (machine, end, outcome, reason) in [
        ("pc-i440fx-10.0", End::Cut, "failed", cut_reason),
        ("pc-i440fx-10.0", End::CloseNotify, "completed", "-"),
        ("pc-q35-7.2", End::Cut, "completed", "-"),
    ] {
        let case = format!("{machine}, {end:?}");
        let mut main = qemu_tls_connect(&pki, &tgw.addr).await;
        main.write_all(&main_channel_start(machine)).await.unwrap();
        main.flush().await.unwrap();
        let mut multifd = qemu_tls_connect(&pki, &tgw.addr).await;
        let mut stream = multifd_init_packet(0);
        stream.extend_from_slice(&[0x5a; 100_000]);
        multifd.write_all(&stream).await.unwrap();
        multifd.flush().await.unwrap();
        // Held until the record is in: the gateway's own close towards
        // us must not be what ends the channel.
        let _held = match end {
            End::CloseNotify => {
                multifd.shutdown().await.unwrap();
                (Some(multifd), None)
            }
            End::Cut => {
                let (mut sock, _session) = multifd.into_inner();
                sock.shutdown().await.unwrap();
                (None, Some(sock))
            }
        };
        let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(field(&rec, "channel"), "multifd/0", "{case}: {rec}");
        assert_eq!(field(&rec, "outcome"), outcome, "{case}: {rec}");
        assert_eq!(field(&rec, "reason"), reason, "{case}: {rec}");
        let tls_end = if end == End::Cut {
            "eof"
        } else {
            "close_notify"
        };
        assert_eq!(field(&rec, "tls_end"), tls_end, "{case}: {rec}");
        assert_eq!(
            rec["bytes_sent"],
            stream.len(),
            "{case}: every byte before the end went on: {rec}"
        );
        // The main channel ends as QEMU's always does: without close_notify.
        let (mut sock, _session) = main.into_inner();
        sock.shutdown().await.unwrap();
        let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(field(&rec, "channel"), "main", "{case}: {rec}");
        assert_eq!(field(&rec, "outcome"), "completed", "{case}: {rec}");
        assert_eq!(field(&rec, "tls_end"), "eof", "{case}: {rec}");
    }
}

/// A target QEMU with native TLS as far as the wire goes: takes every TLS
/// connection (the test PKI's server certificate, no ALPN), reads it to
/// its end, reports its first byte and how it ended, and closes with
/// close_notify.
async fn native_tls_target_wire(
    pki: &std::path::Path,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<(u8, End)>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(pki, &[]).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let mut tls = acceptor.accept(s).await.unwrap();
                let mut got = Vec::new();
                // rustls: Ok once close_notify came, UnexpectedEof without.
                let end = match tls.read_to_end(&mut got).await {
                    Ok(_) => End::CloseNotify,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => End::Cut,
                    Err(e) => panic!("reading a channel from the source gateway: {e}"),
                };
                tx.send((got.first().copied().unwrap_or(0), end)).unwrap();
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, rx)
}

/// (c, on the wire) The source gateway ends every channel it relays into
/// a QEMU with native TLS with close_notify, the main channel and each
/// multifd channel, so a QEMU 10 target sees a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_sends_close_notify_on_every_channel() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let (port, mut ends) = native_tls_target_wire(&pki).await;
    let mut sgw = source_gateway(&pki, &format!("127.0.0.1:{port}"), &[]).await;
    let main_start = main_channel_start("pc-i440fx-10.0");
    let mut main = tokio::net::TcpStream::connect(&sgw.addr).await.unwrap();
    main.write_all(&main_start).await.unwrap();
    let mut multifd = tokio::net::TcpStream::connect(&sgw.addr).await.unwrap();
    multifd.write_all(&multifd_init_packet(0)).await.unwrap();
    multifd.write_all(&[0x5a; 100_000]).await.unwrap();
    let mut seen = Vec::new();
    for local in [&mut multifd, &mut main] {
        local.shutdown().await.unwrap();
        seen.push(ends.recv().await.unwrap());
    }
    // QEVM and multifd magics' first bytes.
    assert_eq!(seen, [(0x11, End::CloseNotify), (0x51, End::CloseNotify)]);
    for rec in outcomes(&mut sgw, 2).await {
        assert_eq!(field(&rec, "outcome"), "completed", "{rec}");
        // The target's own close_notify, recorded.
        assert_eq!(field(&rec, "tls_end"), "close_notify", "{rec}");
    }
}
