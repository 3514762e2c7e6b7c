//! Live revocation: a migration held mid-stream (a running 128 MiB guest
//! capped at 1 MiB/s, which never converges) through real gateways, then
//! the ACL file, the CRL or the registration changes. A change that no
//! longer allows the source closes its live channel: the source QEMU's
//! migration fails and its VM keeps counting, the target QEMU exits, the
//! record and the metrics say why. A change that still allows it, a
//! broken CRL, or `--keep-live-on-acl-change` cut nothing: once the cap
//! is lifted the migration completes and the guest counts on the target.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::gateway::{miggate, run_ok, Gateway};
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use common::scenario::*;
use miggate::control::types::{Allow, Forward, IncomingRequest};
use miggate::control::{ApiAddr, ApiClient};
use miggate_lab::DaemonOpts;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const VM: Uuid = Uuid::from_u128(0x11fe_0000_0000_4000_8000_0000_0000_0005);
/// The guest dirties 576 KiB continuously: at 1 MiB/s it never converges,
/// so the migration stays mid-stream until the cap is lifted.
const CRAWL: u64 = 1 << 20;
const RAM_MIB: u32 = 128;
/// Bytes through the gateways before the change: well into the stream.
const MID_STREAM: u64 = 2 << 20;
/// From the change to the source QEMU's `failed`: a file watch (debounced
/// 50 ms), a re-check, a socket close. Generous for a busy 2-core machine;
/// far below the 30 s stall timeout, which therefore cannot be the cause.
const CUT_BOUND: Duration = Duration::from_secs(15);

/// The gateway that closes the channel.
enum Cutter {
    Target,
    Source,
}

/// Who runs the target side.
enum TargetSide {
    /// `miggate daemon` with a static route through the ACL file, and
    /// metrics.
    DaemonStatic,
    /// `miggate daemon`, the migration registered (ticket).
    DaemonTicket,
    /// `miggate target --authz-list-file ACL [EXTRA]`.
    Cli(&'static [&'static str]),
}

/// A migration through both gateways, held mid-stream.
struct Held {
    _tmp: tempfile::TempDir,
    _pki_tmp: tempfile::TempDir,
    pki: PathBuf,
    acl: PathBuf,
    src: Qemu,
    dst: Qemu,
    /// The target gateway or daemon.
    tgt: Gateway,
    sgw: Gateway,
    metrics: Option<String>,
    api: Option<ApiClient>,
    /// The registration (DaemonTicket).
    id: Option<String>,
    /// The daemon's configuration file.
    config: Option<PathBuf>,
}

/// Replaces the file the way editors do: write a sibling, rename over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The ACL: rule 1 decides for the source's DN.
fn acl(policy_for_source: &str) -> String {
    json!({
        "rules": [
            { "match": "O=miggate tests,CN=*", "policy": policy_for_source, "format": "glob" },
            { "match": "O=nobody,CN=x", "policy": "allow" }
        ],
        "policy": "deny"
    })
    .to_string()
}

async fn metrics(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp
}

fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

impl Held {
    async fn start(side: TargetSide) -> Held {
        let pki_tmp = pki();
        let pki = pki_dir(&pki_tmp);
        let tmp = tempfile::tempdir().unwrap();
        let acl_path = tmp.path().join("acl.json");
        replace(&acl_path, &acl("allow"));

        let mut opts = QemuOpts::new(Guest::RunningCounter, RAM_MIB);
        opts.uuid = Some(VM);
        let caps = [("return-path", true), ("validate-uuid", true)];
        let (mut src, dst, port) = qemu_pair_with(&opts, Versions::Q72, &caps, None).await;
        src.set_parameters(json!({ "max-bandwidth": CRAWL }))
            .await
            .unwrap();
        src.assert_running_and_counting().await;

        let forward = format!("tcp:127.0.0.1:{port}");
        let (tgt, metrics, api, config) = match &side {
            TargetSide::DaemonStatic | TargetSide::DaemonTicket => {
                let extra = match side {
                    TargetSide::DaemonStatic => format!(
                        "forward = {forward:?}\nauthz_list_file = {:?}\n",
                        acl_path.display().to_string()
                    ),
                    _ => String::new(),
                };
                let d = miggate()
                    .daemon(
                        tmp.path(),
                        &pki,
                        &DaemonOpts {
                            metrics: true,
                            target_extra: extra,
                            ..DaemonOpts::default()
                        },
                    )
                    .await
                    .unwrap();
                let api = ApiClient::new(ApiAddr::Unix(d.api.clone())).unwrap();
                (d.gw, d.metrics, Some(api), Some(d.config))
            }
            TargetSide::Cli(extra) => {
                let mut args = vec![
                    "--x509-dir",
                    pki.to_str().unwrap(),
                    "--forward",
                    &forward,
                    "--authz-list-file",
                    acl_path.to_str().unwrap(),
                ];
                args.extend_from_slice(extra);
                (miggate().target(&args).await.unwrap(), None, None, None)
            }
        };
        let (mut ticket_args, mut id) = (Vec::new(), None);
        if let TargetSide::DaemonTicket = side {
            let req = IncomingRequest {
                vm_uuid: Some(VM),
                allow: Allow::Identity(SOURCE_DN.into()),
                forward: Forward::Endpoint(forward.clone()),
                channels: 1,
                expires_in: 300,
                listeners: None,
                disks: Vec::new(),
                nbd_forward: None,
            };
            let r = api.as_ref().unwrap().register(&req).await.unwrap();
            let f = tmp.path().join("ticket");
            std::fs::write(&f, format!("{}\n", r.ticket.expose())).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            ticket_args = vec!["--ticket-file".to_string(), f.display().to_string()];
            id = Some(r.id);
        }
        let extra: Vec<&str> = ticket_args.iter().map(String::as_str).collect();
        let sgw = source_gateway(&pki, &tgt.addr, &extra).await;
        let mut held = Held {
            _tmp: tmp,
            _pki_tmp: pki_tmp,
            pki,
            acl: acl_path,
            src,
            dst,
            tgt,
            sgw,
            metrics,
            api,
            id,
            config,
        };
        held.hold_mid_stream().await;
        held
    }

    /// Starts the migration and waits until it is well under way.
    async fn hold_mid_stream(&mut self) {
        self.src
            .migrate(&format!("tcp:{}", self.sgw.addr))
            .await
            .unwrap();
        self.tgt
            .wait_event(|v| v["message"] == "admitted", EVENT_TIMEOUT)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self.src.query_migrate().await.unwrap();
            let sent = info.ram.as_ref().map_or(0, |r| r.transferred);
            assert_eq!(info.status.as_deref(), Some("active"), "{:?}", info.raw);
            if sent > MID_STREAM {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the migration never got going: {:?}",
                info.raw
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The migration was cut by the change made at `since`: the source
    /// QEMU reports `failed` with a reason and keeps running its VM, the
    /// target QEMU exits, the target's record says `reason_has`.
    async fn expect_cut(&mut self, since: Instant, reason_has: &[&str]) -> Value {
        self.expect_cut_by(Cutter::Target, since, reason_has).await
    }

    /// [`Held::expect_cut`], the reason in `by`'s record.
    async fn expect_cut_by(&mut self, by: Cutter, since: Instant, reason_has: &[&str]) -> Value {
        let s = self
            .src
            .wait_migration_end(MIGRATION_TIMEOUT)
            .await
            .unwrap();
        let took = since.elapsed();
        assert_eq!(s.status.as_deref(), Some("failed"), "source: {:?}", s.raw);
        assert!(
            s.error_desc.as_deref().is_some_and(|e| !e.is_empty()),
            "no error-desc: {:?}",
            s.raw
        );
        eprintln!(
            "cut {:.2} s after the change; source QEMU: {:?}",
            took.as_secs_f64(),
            s.error_desc
        );
        assert!(took < CUT_BOUND, "cut only after {took:?}");
        self.src.assert_running_and_counting().await;

        let d = self
            .dst
            .wait_migration_end(MIGRATION_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(d.status.as_deref(), Some("failed"), "target: {:?}", d.raw);
        let running = self.dst.query_status().await.ok();
        assert_ne!(running.as_deref(), Some("running"), "the target QEMU runs");

        let rec = self.tgt.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "failed", "{rec}");
        assert_eq!(rec["peer.dn"], SOURCE_DN, "{rec}");
        // Mid-stream: what the source QEMU counted as sent (> MID_STREAM)
        // may still partly sit in the sockets' buffers between it and the
        // target gateway when the cut comes (seen: 2,022,261 bytes).
        assert!(
            rec["bytes_sent"].as_u64().unwrap() > MID_STREAM / 2,
            "{rec}"
        );
        // The other gateway saw its channel fail too, not complete.
        let srec = self.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(srec["outcome"], "failed", "{srec}");
        let rec = match by {
            Cutter::Target => rec,
            Cutter::Source => srec,
        };
        let reason = rec["reason"].as_str().unwrap();
        for part in reason_has {
            assert!(reason.contains(part), "{part:?} not in {rec}");
        }
        rec
    }

    /// Nothing was cut: lifting the cap lets the migration complete, the
    /// guest counts on the target, both gateways record `completed`.
    async fn expect_completes(&mut self) {
        self.src.set_unlimited_bandwidth().await.unwrap();
        let s = self
            .src
            .wait_migration_end(MIGRATION_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(s.status.as_deref(), Some("completed"), "{:?}", s.raw);
        let d = self
            .dst
            .wait_migration_end(MIGRATION_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(d.status.as_deref(), Some("completed"), "{:?}", d.raw);
        self.dst.assert_running_and_counting().await;
        let rec = self.tgt.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "completed", "{rec}");
        assert!(rec["bytes_sent"].as_u64().unwrap() > MID_STREAM, "{rec}");
        let srec = self.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(srec["outcome"], "completed", "{srec}");
    }

    async fn metric(&self, series: &str) -> u64 {
        sample(&metrics(self.metrics.as_ref().unwrap()).await, series)
    }
}

/// (a) The ACL file now denies the source's DN: its live channel is
/// closed, the record and the metrics name the ACL and the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_edit_denying_the_source_closes_its_live_channel() {
    let mut h = Held::start(TargetSide::DaemonStatic).await;
    let t = Instant::now();
    replace(&h.acl, &acl("deny"));
    let acl = h.acl.display().to_string();
    let expected = format!("revoked: peer {SOURCE_DN} not allowed by ACL {acl} (rule 1");
    h.expect_cut(t, &[&expected]).await;
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"acl\"}").await,
        1
    );
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"crl\"}").await,
        0
    );
    assert_eq!(
        h.metric("miggate_connections_total{outcome=\"failed\"}")
            .await,
        1
    );
}

/// (b) `miggate pki revoke` of the source's certificate, in the target's
/// PKI directory: the live channel is closed, the record names the
/// serial and the CRL. `miggate target` without the flag: on by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_revoke_of_the_source_certificate_closes_its_live_channel() {
    let mut h = Held::start(TargetSide::Cli(&[])).await;
    let (pki, cert) = (h.pki.clone(), h.pki.join("client-cert.pem"));
    let t = Instant::now();
    pki_revoke(&pki, &cert);
    let crl = format!("revoked by {}", pki.join("ca-crl.pem").display());
    let rec = h
        .expect_cut(t, &["revoked: peer certificate serial ", &crl])
        .await;
    // The serial is the certificate's, as openssl prints it.
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let serial = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string();
    assert!(!serial.is_empty(), "openssl: {out:?}");
    assert!(
        rec["reason"].as_str().unwrap().contains(&serial),
        "{serial} not in {rec}"
    );
}

/// `miggate pki revoke` of the *target's* certificate in the source
/// gateway's PKI directory: the source gateway closes its live channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_revoke_of_the_target_certificate_closes_the_source_channel() {
    let mut h = Held::start(TargetSide::Cli(&[])).await;
    let (pki, cert) = (h.pki.clone(), h.pki.join("server-cert.pem"));
    let t = Instant::now();
    pki_revoke(&pki, &cert);
    let crl = format!("revoked by {}", pki.join("ca-crl.pem").display());
    h.expect_cut_by(
        Cutter::Source,
        t,
        &["revoked: peer certificate serial ", &crl],
    )
    .await;
}

/// (c) DELETE of the registration: its channel is cut, the record and the
/// metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_the_registration_closes_its_live_channel() {
    let mut h = Held::start(TargetSide::DaemonTicket).await;
    let id = h.id.clone().unwrap();
    let t = Instant::now();
    h.api.as_ref().unwrap().cancel(&id).await.unwrap();
    let expected = format!("revoked: registration {id} deleted");
    h.expect_cut(t, &[&expected]).await;
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"deleted\"}")
            .await,
        1
    );
}

/// (d) `--keep-live-on-acl-change`: the same denying edit leaves the live
/// migration alone; it completes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_live_on_acl_change_lets_the_migration_complete() {
    let mut h = Held::start(TargetSide::Cli(&["--keep-live-on-acl-change"])).await;
    replace(&h.acl, &acl("deny"));
    let ev = h
        .tgt
        .wait_event(
            |v| v["message"] == "ACL file reloaded: live channels kept (keep-live-on-acl-change)",
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(ev["live"], 1, "{ev}");
    h.expect_completes().await;
}

/// (e) An edit that still allows the DN (another rule now allows it)
/// cuts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_edit_still_allowing_the_source_cuts_nothing() {
    let mut h = Held::start(TargetSide::DaemonStatic).await;
    let still = json!({
        "rules": [
            { "match": "O=miggate tests,CN=other.test", "policy": "deny" },
            { "match": SOURCE_DN, "policy": "allow" }
        ],
        "policy": "deny"
    });
    replace(&h.acl, &still.to_string());
    let ev = h
        .tgt
        .wait_event(
            |v| v["message"] == "ACL file reloaded: live channels re-checked",
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(
        (ev["live"].as_u64(), ev["closed"].as_u64()),
        (Some(1), Some(0)),
        "{ev}"
    );
    h.expect_completes().await;
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"acl\"}").await,
        0
    );
}

/// (f) A broken CRL written over the good one: kept out (the previous
/// one stays), reported once, nothing cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_crl_cuts_nothing_and_is_reported() {
    let mut h = Held::start(TargetSide::DaemonStatic).await;
    let crl = h.pki.join("ca-crl.pem");
    replace(
        &crl,
        "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    );
    let ev = h
        .tgt
        .wait_event(
            |v| {
                v["message"].as_str().is_some_and(|m| {
                    m.starts_with("the new ca-crl.pem cannot be used: the previous CRL stays")
                })
            },
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(ev["error"].as_str().unwrap().contains("ca-crl.pem"), "{ev}");
    assert_eq!(ev["live"], 1, "{ev}");
    h.expect_completes().await;
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"crl\"}").await,
        0
    );
}

/// A daemon reload (`POST /v1/reload`) whose static route now names
/// another identity: the live channel is closed, as for an ACL edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_reload_denying_the_source_closes_its_live_channel() {
    let mut h = Held::start(TargetSide::DaemonStatic).await;
    let config = h.config.clone().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("authz_list_file"))
        .unwrap()
        .to_string();
    std::fs::write(
        &config,
        text.replace(&line, "authz_identity = \"O=miggate tests,CN=other.test\""),
    )
    .unwrap();
    let t = Instant::now();
    h.api.as_ref().unwrap().reload().await.unwrap();
    let expected = format!(
        "revoked: peer {SOURCE_DN} does not match the authorized identity O=miggate tests,CN=other.test"
    );
    h.expect_cut(t, &[&expected]).await;
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"acl\"}").await,
        1
    );
}

/// Postcopy: the guest already runs on the target. Revocation cuts anyway
/// (the peer is no longer trusted to feed it): both QEMUs pause
/// (`postcopy-paused`, the VM split over them, nothing lost), and a
/// recovery is admitted only once the ACL allows the DN again; then the
/// migration completes with the RAM intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_edit_in_postcopy_pauses_and_recovers_once_allowed_again() {
    revoked_in_postcopy(Change::Acl).await;
}

/// The same with `pki revoke` of the source's certificate: recovered once
/// the revocation is lifted (`ca-crl.pem` removed) for the recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_revoke_in_postcopy_pauses_and_recovers_once_lifted() {
    revoked_in_postcopy(Change::Crl).await;
}

enum Change {
    Acl,
    Crl,
}

async fn revoked_in_postcopy(change: Change) {
    use common::postcopy::*;
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let tmp = tempfile::tempdir().unwrap();
    let acl_path = tmp.path().join("acl.json");
    replace(&acl_path, &acl("allow"));
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x5e7 }, RAM_MIB);
    opts.uuid = Some(VM);
    let caps = [
        ("validate-uuid", true),
        ("postcopy-ram", true),
        ("postcopy-preempt", true),
    ];
    let (mut src, mut dst, port) = qemu_pair_with(&opts, Versions::Q72, &caps, None).await;
    slow_postcopy(&mut src).await;
    let src_hash = src.ram_sha256().await.unwrap();
    let vm = VM.to_string();
    let forward = format!("tcp:127.0.0.1:{port}");
    let mut tgw = miggate()
        .target(&[
            "--x509-dir",
            pki.to_str().unwrap(),
            "--forward",
            &forward,
            "--authz-list-file",
            acl_path.to_str().unwrap(),
            "--expect-uuid",
            &vm,
        ])
        .await
        .unwrap();
    let mut sgw = source_gateway(&pki, &tgw.addr, &[]).await;

    src.forget_old_events().await.unwrap();
    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    wait_migration_status(&mut src, "active").await;
    src.cmd("migrate-start-postcopy", json!({})).await.unwrap();
    wait_migration_status(&mut src, "postcopy-active").await;
    wait_migration_status(&mut dst, "postcopy-active").await;
    wait_target_runs_the_vm(&mut dst).await;
    wait_postcopy_bytes(&mut src, 4 << 20).await;

    let crl = pki.join("ca-crl.pem");
    let expected = match change {
        Change::Acl => {
            replace(&acl_path, &acl("deny"));
            format!("revoked: peer {SOURCE_DN} not allowed by ACL")
        }
        Change::Crl => {
            let cert = pki.join("client-cert.pem");
            pki_revoke(&pki, &cert);
            "revoked: peer certificate serial ".to_string()
        }
    };
    wait_migration_status(&mut src, "postcopy-paused").await;
    wait_migration_status(&mut dst, "postcopy-paused").await;
    // Main and preempt channels: both cut, for the ACL.
    for r in outcomes(&mut tgw, 2).await {
        assert_eq!(r["outcome"], "failed", "{r}");
        assert!(r["reason"].as_str().unwrap().starts_with(&expected), "{r}");
    }

    // Allowed again: the source resumes through the same gateways.
    let reloaded = match change {
        Change::Acl => {
            replace(&acl_path, &acl("allow"));
            "ACL file reloaded: live channels re-checked"
        }
        Change::Crl => {
            std::fs::remove_file(&crl).unwrap();
            "CRL reloaded: live channels re-checked"
        }
    };
    // Not the revoking change's line (which may come after the records):
    // that one still saw the two channels live.
    tgw.wait_event(
        |v| v["message"] == reloaded && v["live"] == 0,
        EVENT_TIMEOUT,
    )
    .await
    .unwrap();
    let (recover, resume) = (format!("tcp:127.0.0.1:{port}"), format!("tcp:{}", sgw.addr));
    recover_and_complete(
        &mut src,
        &mut dst,
        &recover,
        &resume,
        &src_hash,
        String::new,
    )
    .await;
    let resumed = outcomes(&mut tgw, 2).await;
    assert!(
        resumed
            .iter()
            .any(|r| r["channel"] == "main-resumed" && r["outcome"] == "completed"),
        "{resumed:?}"
    );
    // The source gateway saw the cut main channel fail (how its preempt
    // channels end around the cut depends on QEMU's timing).
    let mut seen = Vec::new();
    while !seen.iter().any(|r: &Value| r["channel"] == "main") {
        assert!(seen.len() < 6, "no main channel record: {seen:?}");
        seen.push(sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap());
    }
    let main = seen.iter().find(|r| r["channel"] == "main").unwrap();
    assert_eq!(main["outcome"], "failed", "{main}");
}

/// `pki revoke` of the source's certificate also cuts a registered
/// migration (its ticket does not outrank the CRL); the daemon's metrics
/// and API say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_revoke_closes_a_registered_migration_too() {
    let mut h = Held::start(TargetSide::DaemonTicket).await;
    let (pki, cert) = (h.pki.clone(), h.pki.join("client-cert.pem"));
    let t = Instant::now();
    pki_revoke(&pki, &cert);
    h.expect_cut(t, &["revoked: peer certificate serial "])
        .await;
    assert_eq!(
        h.metric("miggate_revocations_total{cause=\"crl\"}").await,
        1
    );
    let id = h.id.clone().unwrap();
    let api = h.api.as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let v = loop {
        let v = api.migration(&id).await.unwrap();
        if v.channels_open == 0 && v.state.as_str() == "failed" {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        v.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("revoked: ")),
        "{v:?}"
    );
}

/// `miggate pki revoke --ca-dir PKI CERT`: (re)writes PKI/ca-crl.pem.
fn pki_revoke(pki: &std::path::Path, cert: &std::path::Path) {
    run_ok(&[
        "pki",
        "revoke",
        "--ca-dir",
        pki.to_str().unwrap(),
        cert.to_str().unwrap(),
    ]);
}
