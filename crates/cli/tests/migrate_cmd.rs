//! `miggate migrate` end to end: the real binary drives real QEMUs, in
//! gateway mode (a real `miggate daemon`) and with QEMU's native TLS.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::daemon::Daemon;
use common::gateway::{pki_init, BIN};
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use common::scenario::{pki, pki_dir, MIGRATION_TIMEOUT, SOURCE_DN};
use miggate::control::types::Phase;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn migrate_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("migrate")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn migrate(args: &[&str]) -> Output {
    let out = tokio::time::timeout(MIGRATION_TIMEOUT, migrate_cmd(args).output())
        .await
        .expect("miggate migrate did not finish")
        .unwrap();
    eprintln!(
        "miggate migrate {args:?} -> {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("miggate-migrate-")
        .tempdir()
        .unwrap()
}

/// Gateway mode: a running guest, registered through the daemon's API
/// (which issues migrate-incoming on the target QEMU), arrives and keeps
/// counting; the daemon reports the migration completed with our DN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_through_daemon_running_guest_keeps_counting() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let mut opts = QemuOpts::new(Guest::RunningCounter, 64);
    opts.uuid = Some(uuid::Uuid::new_v4());
    let (mut src, mut dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let daemon = common::daemon::start(dir.path(), &pki).await;
    let t0 = std::time::Instant::now();
    let out = migrate(&[
        "--source-qmp",
        &format!("unix:{}", s(&sq)),
        "--target",
        &daemon.target(),
        "--target-qmp",
        &format!("unix:{}", s(&tq)),
        "--x509-dir",
        s(&pki),
    ])
    .await;
    eprintln!(
        "FIGURE migrate_cmd gateway 64 MiB running guest: {:?}",
        t0.elapsed()
    );
    assert!(out.status.success(), "daemon log:\n{}", daemon.log_text());
    let text = stdout(&out);
    assert!(text.contains("migration completed in"), "{text}");
    assert!(
        text.contains(&format!("admitted {SOURCE_DN} as migration")),
        "{text}"
    );
    dst.assert_running_and_counting().await;
    assert_eq!(src.query_status().await.unwrap(), "postmigrate");
    let all = daemon.client().unwrap().migrations().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, Phase::Completed, "{:?}", all[0]);
    assert_eq!(all[0].peer_dn.as_deref(), Some(SOURCE_DN));
}

/// `--json`: a paused guest's random RAM arrives bit-identical; stdout is
/// JSON objects only, progress included, and ends with the result; the
/// daemon books the migration completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_json_paused_guest_ram_intact() {
    let Paused {
        out,
        daemon,
        hash,
        mut dst,
        _dirs,
    } = migrate_paused_guest(0).await;
    let lines = json_lines(&out);
    let last = lines.last().expect("some output");
    assert_eq!(last["channels"], 1);
    assert!(
        lines.iter().any(|l| l["type"] == "progress"),
        "no progress objects: {lines:?}"
    );
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["type"] != "result"));
    assert_eq!(
        dst.ram_sha256().await.unwrap(),
        hash,
        "destination RAM differs"
    );
    let id = last["migration_id"].as_str().unwrap();
    let view = daemon.client().unwrap().migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Completed, "{view:?}");
    assert_eq!(view.channels_seen, 1, "{view:?}");
}

/// The same with 2 multifd channels (3 TLS connections, one ticket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_json_multifd_paused_guest_ram_intact() {
    let Paused {
        out,
        daemon,
        hash,
        mut dst,
        _dirs,
    } = migrate_paused_guest(2).await;
    let last = json_lines(&out).pop().unwrap();
    assert_eq!(last["channels"], 3);
    assert_eq!(
        dst.ram_sha256().await.unwrap(),
        hash,
        "destination RAM differs"
    );
    let id = last["migration_id"].as_str().unwrap();
    let view = daemon.client().unwrap().migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Completed, "{view:?}");
    assert_eq!(view.channels_seen, 3, "{view:?}");
}

/// `miggate migrate --json [--multifd N]` of a paused 128 MiB random-RAM
/// guest through a daemon; asserts success and a well-formed result.
struct Paused {
    out: Output,
    daemon: Daemon,
    hash: String,
    dst: Qemu,
    // Removed when the test ends, after the daemon and the QEMUs.
    _dirs: (TempDir, TempDir),
}

async fn migrate_paused_guest(multifd: u8) -> Paused {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x4d16 }, 128);
    opts.uuid = Some(uuid::Uuid::new_v4());
    let (mut src, dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    let hash = src.ram_sha256().await.unwrap();
    let daemon = common::daemon::start(dir.path(), &pki).await;
    let n = multifd.to_string();
    let out = migrate(&[
        "--json",
        // Key updates on every channel (main and multifd), through the daemon.
        "--rekey-after-mib",
        "1",
        "--multifd",
        &n,
        "--source-qmp",
        s(&sq),
        "--target",
        &daemon.target(),
        "--target-qmp",
        &format!("unix:{}", s(&tq)),
        "--x509-dir",
        s(&pki),
    ])
    .await;
    assert!(out.status.success(), "daemon log:\n{}", daemon.log_text());
    let last = json_lines(&out).pop().expect("some output");
    assert_eq!(last["type"], "result", "{last}");
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["source_dn"], SOURCE_DN);
    assert!(last["bytes"].as_u64().unwrap() > 128 << 20, "{last}");
    drop(src);
    Paused {
        out,
        daemon,
        hash,
        dst,
        _dirs: (dir, pki_t),
    }
}

/// `--native-tls`: no gateway, no daemon; QEMU's own TLS with tls-authz on
/// the target, set up over QMP. The running guest arrives and counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_native_tls_running_guest_keeps_counting() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let mut opts = QemuOpts::new(Guest::RunningCounter, 64);
    opts.uuid = Some(uuid::Uuid::new_v4());
    let (mut src, mut dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let out = migrate(&[
        "--native-tls",
        "--source-qmp",
        s(&sq),
        "--target-qmp",
        s(&tq),
        "--x509-dir",
        s(&pki),
    ])
    .await;
    assert!(out.status.success(), "{}", dst.stderr_text());
    let text = stdout(&out);
    assert!(
        text.contains("authz-simple identity O=miggate tests,CN=source.test"),
        "{text}"
    );
    assert!(text.contains("is running on the target"), "{text}");
    dst.assert_running_and_counting().await;
    // QEMU's own view: the target used the TLS objects miggate created.
    let params = dst
        .cmd("query-migrate-parameters", Value::Null)
        .await
        .unwrap();
    assert_eq!(params["tls-creds"], "miggate-tls0");
    assert_eq!(params["tls-authz"], "miggate-authz0");
}

/// `--native-tls` with a DN the target's tls-authz does not allow: exit 1,
/// one sentence, and the source VM still running (and counting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_native_tls_denied_dn_keeps_vm_on_source() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let opts = QemuOpts::new(Guest::RunningCounter, 64);
    let (mut src, _dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let out = migrate(&[
        "--native-tls",
        "--authz-identity",
        "O=miggate tests,CN=someone-else",
        "--source-qmp",
        s(&sq),
        "--target-qmp",
        s(&tq),
        "--x509-dir",
        s(&pki),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let last = stdout(&out).lines().last().unwrap_or_default().to_string();
    // The target QEMU knows why; the sentence says it, not the source's echo.
    assert!(
        last.starts_with(
            "migration failed: target QEMU: its tls-authz refused the TLS session \
             (peer O=miggate tests,CN=source.test does not match the authorized identity \
             O=miggate tests,CN=someone-else)"
        ),
        "{last}"
    );
    assert!(
        last.ends_with("; the VM is still running on the source."),
        "{last}"
    );
    src.assert_running_and_counting().await;
}

/// `--native-tls --authz-list-file`: QEMU 7.2's object-add has no
/// authz-list-file (its schema says authz-listfile), so the file's rules go
/// into an authz-list, the command says so, and the migration completes
/// under that ACL. QEMU 10.0: `migrate_native_authz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_native_tls_acl_file_falls_back_to_authz_list() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let acl = dir.path().join("acl.json");
    std::fs::write(
        &acl,
        r#"{"rules":[{"match":"O=miggate tests,CN=*","policy":"allow","format":"glob"}],"policy":"deny"}"#,
    )
    .unwrap();
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0xac1 }, 64);
    let (mut src, mut dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    let hash = src.ram_sha256().await.unwrap();
    let out = migrate(&[
        "--native-tls",
        "--json",
        "--authz-list-file",
        s(&acl),
        "--source-qmp",
        s(&sq),
        "--target-qmp",
        s(&tq),
        "--x509-dir",
        s(&pki),
    ])
    .await;
    assert!(out.status.success(), "{}", dst.stderr_text());
    let lines = json_lines(&out);
    assert_eq!(lines.last().unwrap()["ok"], true);
    let notes: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "note")
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        notes.iter().any(|n| n.starts_with("this QEMU (7.2.")
            && n.contains("cannot create authz-list-file")
            && n.contains("1 rule(s)")),
        "{notes:?}"
    );
    assert_eq!(dst.ram_sha256().await.unwrap(), hash);
}

/// Gateway mode with the source's credentials from another CA: the TLS
/// handshake fails, the sentence names the cause, the daemon's
/// registration is withdrawn, and the VM keeps running on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_with_foreign_ca_fails_with_cause_and_vm_keeps_running() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let other = pki_t.path().join("other-ca");
    pki_init(&other, &["--client-dn", SOURCE_DN]);
    let dir = tmp();
    let mut opts = QemuOpts::new(Guest::RunningCounter, 64);
    opts.uuid = Some(uuid::Uuid::new_v4());
    let (mut src, _dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let daemon = common::daemon::start(dir.path(), &pki).await;
    let out = migrate(&[
        "--json",
        "--source-qmp",
        s(&sq),
        "--target",
        &daemon.target(),
        "--target-qmp",
        s(&tq),
        "--x509-dir",
        s(&other),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out);
    let last = lines.last().unwrap();
    assert_eq!(last["ok"], false, "{last}");
    let sentence = last["error"].as_str().unwrap();
    assert!(
        sentence.starts_with("migration failed: source gateway: "),
        "{sentence}"
    );
    assert!(sentence.contains("certificate"), "{sentence}");
    assert!(
        sentence.ends_with("; the VM is still running on the source."),
        "{sentence}"
    );
    assert_eq!(last["source_status"], "running");
    src.assert_running_and_counting().await;
}

/// SIGINT mid-migration (a running guest that cannot converge under a
/// tiny bandwidth cap): `migrate_cancel` on the source, DELETE at the
/// daemon; exit 130, the VM still running on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_cancels_on_both_sides() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let mut opts = QemuOpts::new(Guest::RunningCounter, 64);
    opts.uuid = Some(uuid::Uuid::new_v4());
    let (mut src, _dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let daemon = common::daemon::start(dir.path(), &pki).await;
    let mut child = migrate_cmd(&[
        "--json",
        "--max-bandwidth",
        "256K",
        "--source-qmp",
        s(&sq),
        "--target",
        &daemon.target(),
        "--target-qmp",
        s(&tq),
        "--x509-dir",
        s(&pki),
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Wait until the migration is moving bytes.
    tokio::time::timeout(MIGRATION_TIMEOUT, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&l).unwrap();
            seen.push(v.clone());
            if v["type"] == "progress"
                && v["status"] == "active"
                && v["transferred"].as_u64() > Some(0)
            {
                return;
            }
            assert_ne!(v["type"], "result", "ended before SIGINT: {seen:?}");
        }
        panic!("migrate ended before SIGINT: {seen:?}");
    })
    .await
    .expect("no progress");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    while let Some(l) = lines.next_line().await.unwrap() {
        rest.push(serde_json::from_str::<Value>(&l).unwrap());
    }
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "result");
    let sentence = last["error"].as_str().unwrap();
    assert!(
        sentence.starts_with("migration cancelled: interrupted by SIGINT"),
        "{sentence}"
    );
    assert!(
        sentence.ends_with("the VM is still running on the source."),
        "{sentence}"
    );
    let id = last["migration_id"].as_str().unwrap();
    let view = daemon.client().unwrap().migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Cancelled, "{view:?}");
    // The daemon cuts the channels first, so QEMU may see them fail before
    // its own migrate_cancel: either way the migration is over on the source.
    let info = src.query_migrate().await.unwrap();
    assert!(
        matches!(info.status.as_deref(), Some("cancelled" | "failed")),
        "{:?}",
        info.raw
    );
    src.assert_running_and_counting().await;
}
