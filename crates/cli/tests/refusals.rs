//! Every refusal gives its reason, forwards nothing, and leaves the target
//! QEMU able to take the right migration afterwards. The source is a running
//! guest with QEMU's return-path capability, so a refusal makes its
//! migration fail and it keeps running.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::gateway::{pki_issue, Gateway};
use common::qemu::{Guest, NativeTls, Qemu, QemuExt, QemuOpts, TlsEndpoint};
use common::scenario::*;
use miggate::creds::tls;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const VM: Uuid = Uuid::from_u128(0x0c0f_fee0_0000_4000_8000_0000_0000_0001);
const STALL: &str = "3";

/// A target QEMU behind a target gateway that allows [`SOURCE_DN`] and
/// expects [`VM`], and a running source VM with that UUID.
struct Bench {
    pki_tmp: tempfile::TempDir,
    src: Qemu,
    dst: Qemu,
    tgw: Gateway,
}

impl Bench {
    async fn new(src_opts: QemuOpts) -> Bench {
        Self::with_pki(pki(), src_opts).await
    }

    async fn with_pki(pki_tmp: tempfile::TempDir, src_opts: QemuOpts) -> Bench {
        let pki = pki_dir(&pki_tmp);
        let mut dst_opts = QemuOpts::new(Guest::RunningCounter, 64).as_incoming();
        dst_opts.uuid = Some(VM);
        let (mut src, mut dst) = Qemu::pair(src_opts, dst_opts).await.unwrap();
        let caps = [("return-path", true), ("validate-uuid", true)];
        capabilities(&mut src, &mut dst, &caps).await;
        src.set_unlimited_bandwidth().await.unwrap();
        let port = dst.migrate_incoming_any_port().await.unwrap();
        let vm = VM.to_string();
        let tgw = target_gateway(
            &pki,
            port,
            &[
                "--authz-identity",
                SOURCE_DN,
                "--expect-uuid",
                &vm,
                "--stall-timeout",
                STALL,
            ],
        )
        .await;
        src.assert_running_and_counting().await;
        Bench {
            pki_tmp,
            src,
            dst,
            tgw,
        }
    }

    fn pki(&self) -> PathBuf {
        pki_dir(&self.pki_tmp)
    }

    /// The target gateway's record of the refused connection.
    async fn refused(&mut self) -> Value {
        let rec = self.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "refused", "{rec}");
        assert_eq!(rec["bytes_sent"], 0, "nothing may be forwarded: {rec}");
        rec
    }

    /// The right source now migrates into the same target QEMU.
    async fn then_the_right_migration_completes(mut self) {
        let sgw = source_gateway(&self.pki(), &self.tgw.addr, &[]).await;
        self.src
            .set_capabilities(&[("validate-uuid", true)])
            .await
            .unwrap();
        self.src
            .set_parameters(json!({ "tls-creds": "" }))
            .await
            .unwrap();
        migrate_and_expect_completed(&mut self.src, &mut self.dst, &format!("tcp:{}", sgw.addr))
            .await;
        self.dst
            .wait_status("running", EVENT_TIMEOUT)
            .await
            .unwrap();
        self.dst.assert_running_and_counting().await;
        let rec = self.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "completed", "{rec}");
    }
}

fn running_source(uuid: Option<Uuid>) -> QemuOpts {
    let mut o = QemuOpts::new(Guest::RunningCounter, 64);
    o.uuid = uuid;
    o
}

fn reason(rec: &Value) -> &str {
    rec["reason"].as_str().unwrap_or("")
}

/// A directory with the test CA (to trust the target) and a client cert
/// from `client_from`.
fn mixed_dir(dir: &Path, ca_from: &Path, client_from: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca_from.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(client_from.join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_dn_not_in_acl() {
    let mut b = Bench::new(running_source(Some(VM))).await;
    let tmp = tempfile::tempdir().unwrap();
    let intruder = pki_issue(
        &b.pki(),
        &tmp.path().join("intruder"),
        "O=miggate tests,CN=intruder.test",
    );
    let mut sgw = source_gateway(&intruder, &b.tgw.addr, &[]).await;
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", sgw.addr)).await;
    let rec = b.refused().await;
    assert_eq!(rec["peer.dn"], "O=miggate tests,CN=intruder.test");
    assert!(
        reason(&rec).contains("O=miggate tests,CN=intruder.test"),
        "reason should name the peer: {rec}"
    );
    // The source gateway is told which check failed, and no more: not the
    // ACL, its rules or where it lives.
    let srec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(srec["outcome"], "refused", "{srec}");
    assert_eq!(
        reason(&srec),
        "target refused: certificate DN not authorized",
        "{srec}"
    );
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_certificate_from_another_ca() {
    let mut b = Bench::new(running_source(Some(VM))).await;
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other-ca");
    common::gateway::pki_init(&other, &["--client-dn", SOURCE_DN]);
    let dir = mixed_dir(&tmp.path().join("mixed"), &b.pki(), &other);
    let mut sgw = source_gateway(&dir, &b.tgw.addr, &[]).await;
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", sgw.addr)).await;
    let rec = b.refused().await;
    assert!(reason(&rec).contains("not issued by our CA"), "{rec}");
    let srec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert!(
        reason(&srec).contains("rejected our certificate")
            || reason(&srec).contains("does not trust our CA"),
        "{srec}"
    );
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_client_without_certificate() {
    // A QEMU with native TLS and no client certificate: a real peer. It
    // trusts the test CA, so only the missing certificate is wrong.
    let pki_tmp = pki();
    let tmp = tempfile::tempdir().unwrap();
    let nocert = tmp.path().join("nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    std::fs::copy(
        pki_dir(&pki_tmp).join("ca-cert.pem"),
        nocert.join("ca-cert.pem"),
    )
    .unwrap();
    let mut opts = running_source(Some(VM));
    opts.tls = Some(NativeTls {
        dir: nocert,
        endpoint: TlsEndpoint::Client,
        authz_identity: None,
        priority: None,
    });
    let mut b = Bench::with_pki(pki_tmp, opts).await;
    b.src
        .set_native_tls_parameters(Some("127.0.0.1"))
        .await
        .unwrap();
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", b.tgw.addr)).await;
    let rec = b.refused().await;
    assert!(reason(&rec).contains("no client certificate"), "{rec}");
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_revoked_certificate() {
    // Revoked before the target starts: it loads ca-crl.pem at start.
    let pki_tmp = pki();
    let revoked = pki_issue(
        &pki_dir(&pki_tmp),
        &pki_tmp.path().join("revoked"),
        SOURCE_DN,
    );
    common::gateway::run_ok(&[
        "pki",
        "revoke",
        "--ca-dir",
        pki_dir(&pki_tmp).to_str().unwrap(),
        revoked.join("client-cert.pem").to_str().unwrap(),
    ]);
    let mut b = Bench::with_pki(pki_tmp, running_source(Some(VM))).await;
    let mut sgw = source_gateway(&revoked, &b.tgw.addr, &[]).await;
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", sgw.addr)).await;
    let rec = b.refused().await;
    assert!(reason(&rec).contains("revoked"), "{rec}");
    let srec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert!(reason(&srec).contains("revoked"), "{srec}");
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_refuses_target_with_wrong_hostname() {
    let mut b = Bench::new(running_source(Some(VM))).await;
    let mut sgw = source_gateway(
        &b.pki(),
        &b.tgw.addr,
        &["--tls-hostname", "dst.example.org"],
    )
    .await;
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", sgw.addr)).await;
    let srec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert!(
        reason(&srec).contains("certificate does not match the hostname dst.example.org"),
        "{srec}"
    );
    let rec = b.refused().await;
    assert!(
        reason(&rec).contains("rejected our certificate") || reason(&rec).contains("alert"),
        "{rec}"
    );
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_wrong_vm_uuid() {
    let other = Uuid::from_u128(0xbad0_0000_0000_4000_8000_0000_0000_0002);
    let mut b = Bench::new(running_source(Some(other))).await;
    let mut sgw = source_gateway(&b.pki(), &b.tgw.addr, &[]).await;
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", sgw.addr)).await;
    let rec = b.refused().await;
    assert_eq!(
        reason(&rec),
        format!("VM UUID mismatch: expected {VM}, stream carries {other}")
    );
    // The source learns it is the wrong VM, not which VM is expected.
    let srec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(reason(&srec), "target refused: wrong VM", "{srec}");
    // The right VM (same target QEMU) still gets in.
    let mut right = Qemu::spawn(running_source(Some(VM))).await.unwrap();
    right
        .set_capabilities(&[("return-path", true)])
        .await
        .unwrap();
    std::mem::swap(&mut b.src, &mut right);
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_stream_without_uuid() {
    let mut b = Bench::new(running_source(Some(VM))).await;
    b.src
        .set_capabilities(&[("validate-uuid", false)])
        .await
        .unwrap();
    let sgw = source_gateway(&b.pki(), &b.tgw.addr, &[]).await;
    migrate_and_expect_failure(&mut b.src, &format!("tcp:{}", sgw.addr)).await;
    let rec = b.refused().await;
    assert!(reason(&rec).contains("carries none"), "{rec}");
    assert!(reason(&rec).contains("validate-uuid"), "{rec}");
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refuses_garbage_instead_of_tls() {
    let mut b = Bench::new(running_source(Some(VM))).await;
    let mut sock = tokio::net::TcpStream::connect(&b.tgw.addr).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let rec = b.refused().await;
    assert!(reason(&rec).contains("does not speak TLS"), "{rec}");
    // The gateway closed on it.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, sock.read_to_end(&mut rest))
        .await
        .unwrap();
    b.then_the_right_migration_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_cuts_client_that_stalls_after_handshake() {
    let mut b = Bench::new(running_source(Some(VM))).await;
    let config = tls::client_config(&b.pki(), &[tls::ALPN_MIGGATE]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&config));
    let sock = tokio::net::TcpStream::connect(&b.tgw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, sock).await.unwrap();
    // Handshake done; now say nothing. The target must cut us off.
    let rec = b.refused().await;
    assert_eq!(reason(&rec), format!("peer sent nothing for {STALL} s"));
    let verdict = tokio::time::timeout(
        Duration::from_secs(5),
        miggate::wire::frames::read_verdict(&mut tls),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        verdict,
        miggate::wire::frames::Verdict::Refused {
            reason: format!("peer sent nothing for {STALL} s")
        }
    );
    b.then_the_right_migration_completes().await;
}
