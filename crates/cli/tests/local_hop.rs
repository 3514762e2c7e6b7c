//! The local hop (source QEMU -> source gateway) serves the source QEMU of
//! this migration and nobody else: its unix socket has its mode from the
//! first moment whatever the umask, other users cannot connect, and a
//! process of the same user that is not the QEMU is refused by its peer
//! credentials before anything reaches the target. `miggate migrate` has
//! no TCP listener for it at all. A dead gateway's socket file is replaced,
//! a live one's is not.
//!
//! Runs as root (as CI does): the other user is `nobody`, through runuser.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::gateway::{miggate, BIN};
use common::nobody::{assert_root, connect_as_nobody};
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use common::scenario::{
    checking_target_gateway, migrate_and_expect_completed, outcomes, pki, pki_dir, EVENT_TIMEOUT,
    MIGRATION_TIMEOUT,
};
use miggate::control::types::Phase;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The UUID in the captured stream of miggate_lab::fixtures.
const FIXTURE_UUID: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c2a3b_4d5e_4f60_8a7b_9c0d1e2f3a4b);

/// The first 2 KiB of a real QEMU 7.2 main channel (QEVM, configuration
/// with `configuration/uuid`, the start of the RAM section), rewritten to
/// carry `uuid`: what an intruder would send to get its own device state
/// into the target VM.
fn plausible_qemu_prefix(uuid: uuid::Uuid) -> Vec<u8> {
    let mut bytes = miggate_lab::fixtures::QEMU72_MAIN_UUID.to_vec();
    let at = bytes
        .windows(16)
        .position(|w| w == FIXTURE_UUID.as_bytes())
        .expect("the fixture carries its UUID");
    bytes[at..at + 16].copy_from_slice(uuid.as_bytes());
    bytes
}

/// A same-user process that is not the QEMU connects and sends `prefix`;
/// returns once the gateway has closed the connection.
async fn intrude(mut s: UnixStream, prefix: &[u8]) {
    // The gateway may close before reading: a failed write is fine.
    let _ = s.write_all(prefix).await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(EVENT_TIMEOUT, s.read(&mut buf))
        .await
        .expect("the gateway kept the intruder's connection open");
    // EOF, or a reset because the intruder's bytes were never read.
    assert!(
        !matches!(n, Ok(n) if n > 0),
        "the gateway sent bytes to a refused intruder"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn tmp() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("miggate-local-")
        .tempdir()
        .unwrap();
    // Traversable by everyone: what stops `nobody` must be the socket or
    // the gateway's own directory, not this one.
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Socket inodes held by process `pid`.
fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// The TCP sockets in state LISTEN that process `pid` holds, as
/// /proc/net/tcp{,6} lines.
fn tcp_listeners(pid: u32) -> Vec<String> {
    let mine = socket_inodes(pid);
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && mine.iter().any(|i| i == f[9]) {
                found.push(line.trim().to_string());
            }
        }
    }
    found
}

/// Sockets in /proc/net/unix bound under `dir` (a listener and the
/// connections it accepted or queued all show its path).
fn unix_sockets_under(dir: &Path) -> usize {
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(7)
                .is_some_and(|p| p.starts_with(&prefix))
        })
        .count()
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// `miggate source --listen unix:... --source-qmp ...` started with umask
/// 000: the socket is 0600 anyway, `nobody` gets EACCES, and a process of
/// the same user that sends a plausible QEMU stream (with the right VM
/// UUID) first is refused by pid before anything is sent to the target;
/// then the real migration (main + 2 multifd channels, all from the QEMU's
/// pid) completes with the RAM intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_serves_the_source_qemu_alone() {
    assert_root();
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let uuid = uuid::Uuid::new_v4();
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x10ca1 }, 64);
    opts.uuid = Some(uuid);
    let sq = dir.path().join("source.qmp");
    let (mut src, mut dst) = Qemu::pair(opts.clone().with_qmp(&sq), opts.as_incoming())
        .await
        .unwrap();
    for q in [&mut src, &mut dst] {
        q.set_capabilities(&[("multifd", true), ("validate-uuid", true)])
            .await
            .unwrap();
        q.set_parameters(json!({ "multifd-channels": 2 }))
            .await
            .unwrap();
    }
    src.set_unlimited_bandwidth().await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    let mut tgw = checking_target_gateway(&pki, port, uuid).await;

    let sock = dir.path().join("source.sock");
    let listen = format!("unix:{}", sock.display());
    let qmp = format!("unix:{}", sq.display());
    let mut sgw = miggate()
        .gateway_with_umask(
            "000",
            &[
                "source",
                "--listen",
                &listen,
                "--source-qmp",
                &qmp,
                "--x509-dir",
                pki.to_str().unwrap(),
                "--connect",
                &tgw.addr,
            ],
        )
        .await
        .unwrap();
    let qemu_pid = src.pid().unwrap();
    assert_eq!(mode(&sock), 0o600, "socket mode under umask 000");
    assert!(
        sgw.log_text()
            .contains(&format!("pid {qemu_pid} (the QEMU of QMP socket")),
        "the gateway should name the QEMU's pid it serves:\n{}",
        sgw.log_text()
    );

    // Another user: the socket's mode stops it.
    let err = connect_as_nobody(&sock);
    assert!(err.contains("Permission denied"), "{err}");

    // The same user, not the QEMU, first: refused by pid, nothing forwarded.
    let intruder = UnixStream::connect(&sock).await.unwrap();
    intrude(intruder, &plausible_qemu_prefix(uuid)).await;
    let r = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(r["outcome"], "refused", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("local peer pid {} (uid 0)", std::process::id()))
            && reason.contains(&format!("is not the source QEMU (pid {qemu_pid}")),
        "{reason}"
    );
    assert_eq!(r["bytes_sent"], 0, "{r}");
    assert!(
        tgw.outcomes().is_empty(),
        "the target saw the intruder: {:?}",
        tgw.outcomes()
    );

    // The real migration: every channel comes from the QEMU's pid.
    let hash = src.ram_sha256().await.unwrap();
    migrate_and_expect_completed(&mut src, &mut dst, &listen).await;
    assert_eq!(
        dst.ram_sha256().await.unwrap(),
        hash,
        "destination RAM differs"
    );
    let mut channels: Vec<String> = outcomes(&mut tgw, 3)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r["outcome"], "completed", "{r}");
            r["channel"].as_str().unwrap().to_string()
        })
        .collect();
    channels.sort();
    assert_eq!(channels, ["main", "multifd/0", "multifd/1"]);
    for r in outcomes(&mut sgw, 3).await {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    assert_eq!(tgw.outcomes().len(), 3, "{:?}", tgw.outcomes());
}

/// `miggate migrate`: no TCP listener for the local hop; a unix socket in
/// a private directory (0700) that `nobody` cannot enter; a process of the
/// same user that connects before the QEMU (held back: the target QEMU is
/// stopped, so the registration waits while the socket already queues
/// connections) is refused by pid, the ticket is not spent on it, and the
/// migration (2 multifd channels) completes; the directory is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_local_hop_is_a_private_unix_socket() {
    assert_root();
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let tmpdir = dir.path().join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    std::fs::set_permissions(&tmpdir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let uuid = uuid::Uuid::new_v4();
    let mut opts = QemuOpts::new(Guest::RunningCounter, 64);
    opts.uuid = Some(uuid);
    let (mut src, mut dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let daemon = common::daemon::start(dir.path(), &pki).await;

    // The daemon's migrate-incoming waits for the target QEMU: the
    // registration, and so the source QEMU's `migrate`, wait with it.
    let dst_pid = dst.pid().unwrap();
    signal(dst_pid, "-STOP");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "migrate",
            "--json",
            "--multifd",
            "2",
        ])
        .arg("--source-qmp")
        .arg(format!("unix:{}", sq.display()))
        .args(["--target", &daemon.target()])
        .arg("--target-qmp")
        .arg(format!("unix:{}", tq.display()))
        .arg("--x509-dir")
        .arg(&pki)
        .env("TMPDIR", &tmpdir)
        .env_remove("XDG_RUNTIME_DIR")
        .env("RUST_LOG", "miggate::outcome=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let migrate_pid = child.id().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    // Outcome records on stderr, collected until the process exits.
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let records = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Ok(Some(l)) = err.next_line().await {
            v.push(l);
        }
        v
    });

    let mut seen: Vec<Value> = Vec::new();
    let sock = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(l) = out.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&l).unwrap();
            seen.push(v.clone());
            let msg = v["message"].as_str().unwrap_or_default();
            if let Some(rest) = msg.split(" will migrate to unix:").nth(1) {
                return PathBuf::from(rest.split(':').next().unwrap());
            }
        }
        panic!("migrate ended without announcing a unix socket: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| {
        signal(dst_pid, "-CONT");
        panic!("no unix socket for the source QEMU was announced")
    });
    let private = sock.parent().unwrap().to_path_buf();
    assert!(private.starts_with(&tmpdir), "{}", private.display());
    assert_eq!(mode(&private), 0o700, "{}", private.display());
    assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    let listeners = tcp_listeners(migrate_pid);
    assert!(
        listeners.is_empty(),
        "miggate migrate listens on TCP: {listeners:?}"
    );
    // Nothing is connected yet: the intruder below is first.
    assert_eq!(unix_sockets_under(&private), 1, "only the listener");

    let err = connect_as_nobody(&sock);
    assert!(err.contains("Permission denied"), "{err}");
    // Queued by the kernel until the gateway starts, ahead of the QEMU.
    let intruder = UnixStream::connect(&sock).await.unwrap();
    signal(dst_pid, "-CONT");
    intrude(intruder, &plausible_qemu_prefix(uuid)).await;

    let result = tokio::time::timeout(MIGRATION_TIMEOUT, async {
        while let Some(l) = out.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&l).unwrap();
            seen.push(v.clone());
            if v["type"] == "result" {
                return v;
            }
        }
        panic!("no result: {seen:?}");
    })
    .await
    .expect("migrate did not finish");
    let status = child.wait().await.unwrap();
    let records: Vec<Value> = records
        .await
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "miggate::outcome")
        .collect();
    assert!(
        status.success() && result["ok"] == true,
        "{result}\nsteps: {seen:?}\nrecords: {records:?}\ndaemon log:\n{}",
        daemon.log_text()
    );

    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    let reason = refused[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("local peer pid {} (uid 0)", std::process::id())),
        "{reason}"
    );
    // The intruder was accepted first: its record comes before any channel's.
    assert_eq!(records[0]["outcome"], "refused", "{records:?}");
    let completed = records
        .iter()
        .filter(|r| r["outcome"] == "completed")
        .count();
    assert_eq!(completed, 3, "{records:?}");

    let id = result["migration_id"].as_str().unwrap();
    let view = daemon.client().unwrap().migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Completed, "{view:?}");
    assert_eq!(view.channels_seen, 3, "{view:?}");
    assert!(view.refusals.is_empty(), "{view:?}");
    dst.assert_running_and_counting().await;
    assert!(!private.exists(), "{} was left behind", private.display());
}

/// A gateway killed with SIGKILL leaves its socket file; the next one on
/// the path replaces it and says so. While that one runs, a third start on
/// the path fails with a clear error, and a file that is not a socket is
/// never replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_replaced_live_socket_refused() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tmp();
    let sock = dir.path().join("source.sock");
    let listen = format!("unix:{}", sock.display());
    let args = |listen: &str| -> Vec<String> {
        [
            "source",
            "--listen",
            listen,
            "--x509-dir",
            pki.to_str().unwrap(),
            // Nothing connects in this test.
            "--connect",
            "127.0.0.1:9",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = args(&listen);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();

    let first = miggate().gateway(&a).await.unwrap();
    first.stop().await; // SIGKILL: no cleanup
    let meta = std::fs::symlink_metadata(&sock).expect("a killed gateway leaves its socket");
    assert!(meta.file_type().is_socket());

    let mut second = miggate().gateway_with_umask("077", &a).await.unwrap();
    let log = second.log_text();
    assert!(
        log.lines().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_default();
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("replaced a stale socket file"))
                && v["path"] == sock.to_str().unwrap()
        }),
        "no log line about the stale socket:\n{log}"
    );
    assert_eq!(mode(&sock), 0o600, "socket mode under umask 077");

    // A live gateway's socket is not taken over.
    let third = tokio::process::Command::new(BIN)
        .args(&a)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let third = tokio::time::timeout(EVENT_TIMEOUT, third)
        .await
        .expect("a second gateway started on a live gateway's socket")
        .unwrap();
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(!third.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "another process is listening on {}; refusing to replace its socket",
            sock.display()
        )),
        "{err}"
    );
    // ... and the live one still has it: a connection reaches it.
    let probe = UnixStream::connect(&sock).await.unwrap();
    drop(probe);
    second.wait_outcome(EVENT_TIMEOUT).await.unwrap();

    // Not a socket: left alone.
    let file = dir.path().join("notes.sock");
    std::fs::write(&file, "keep me").unwrap();
    let fl = format!("unix:{}", file.display());
    let out = std::process::Command::new(BIN)
        .args(args(&fl))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("is not a socket; refusing to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}
