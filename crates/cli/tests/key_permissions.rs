//! A private key that other users may read is refused at start, like
//! OpenSSH's "UNPROTECTED PRIVATE KEY FILE": `miggate target`, `source`
//! and `daemon` exit non-zero naming the file and its mode, and start once
//! it is `chmod 600`; a daemon reload that meets one keeps the previous
//! configuration.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::gateway::{miggate, BIN};
use common::scenario::{pki, pki_dir};
use miggate_lab::DaemonOpts;

/// Long enough for a gateway to start; a refused one exits well before.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `miggate ARGS...`, which must exit (non-zero) by itself; its stderr.
async fn refused(args: &[&str]) -> String {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(EXIT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("miggate {args:?} is still running: the key was accepted"))
        .unwrap();
    // `migrate` says why on stdout, the others on stderr.
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "miggate {args:?} succeeded: {err}");
    err
}

fn assert_names(err: &str, key: &Path, mode: &str) {
    let key = key.display().to_string();
    assert!(err.contains(&key), "{err}");
    assert!(err.contains(&format!("mode {mode}")), "{err}");
    assert!(err.contains(&format!("chmod 600 {key}")), "{err}");
}

#[tokio::test]
async fn target_refuses_an_open_server_key_and_starts_once_it_is_0600() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let key = pki.join("server-key.pem");
    let args = [
        "--x509-dir",
        pki.to_str().unwrap(),
        "--forward",
        "tcp:127.0.0.1:9",
        "--allow-any-verified-peer",
    ];
    chmod(&key, 0o644);
    let err = refused(&[&["target", "--listen", "127.0.0.1:0"], &args[..]].concat()).await;
    assert_names(&err, &key, "0644");
    assert!(err.contains("accessible by other users"), "{err}");

    chmod(&key, 0o600);
    miggate().target(&args).await.unwrap().stop().await;
}

#[tokio::test]
async fn source_refuses_an_open_client_key_and_starts_once_it_is_0600() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let key = pki.join("client-key.pem");
    let args = [
        "--connect",
        "127.0.0.1:9",
        "--x509-dir",
        pki.to_str().unwrap(),
    ];
    chmod(&key, 0o644);
    let err = refused(&[&["source", "--listen", "tcp:127.0.0.1:0"], &args[..]].concat()).await;
    assert_names(&err, &key, "0644");

    chmod(&key, 0o600);
    miggate().source(&args).await.unwrap().stop().await;
}

/// `miggate migrate` refuses before it touches anything: the source QMP
/// socket and the daemon named here do not even exist.
#[tokio::test]
async fn migrate_refuses_an_open_client_key_before_anything_else() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let key = pki.join("client-key.pem");
    chmod(&key, 0o604);
    let nowhere = pki_tmp.path().join("absent");
    let qmp = format!("unix:{}", nowhere.join("qmp.sock").display());
    let api = format!("unix:{}", nowhere.join("api.sock").display());
    let args = [
        "migrate",
        "--source-qmp",
        &qmp,
        "--target",
        &api,
        "--forward",
        "tcp:127.0.0.1:9",
        "--x509-dir",
        pki.to_str().unwrap(),
    ];
    let err = refused(&args).await;
    assert_names(&err, &key, "0604");
    assert!(err.contains("migration not started"), "{err}");

    // With the key fixed it gets as far as the (absent) source QEMU.
    chmod(&key, 0o600);
    let err = refused(&args).await;
    assert!(
        err.contains("QMP socket") && !err.contains("mode 0"),
        "{err}"
    );
}

/// The daemon fails at start (and `--check` says why); once running, a
/// reload (SIGHUP or the API) that meets an open key is refused with the
/// reason and the daemon keeps serving with the configuration it had.
#[tokio::test]
async fn daemon_refuses_an_open_key_at_start_and_on_reload() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let key = pki.join("server-key.pem");
    let dir = tempfile::Builder::new()
        .prefix("miggate-keyperm-")
        .tempdir()
        .unwrap();
    let mut d = miggate()
        .daemon(dir.path(), &pki, &DaemonOpts::default())
        .await
        .unwrap();
    let config = d.config.display().to_string();

    chmod(&key, 0o640);
    let pid = d.gw.pid().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let ev =
        d.gw.wait_event(
            |v| v["level"] == "ERROR" || v["message"] == "configuration reloaded",
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    let reason = ev["reason"].as_str().unwrap_or_default();
    assert_names(reason, &key, "0640");
    let api = d.client().unwrap();
    api.migrations().await.unwrap();
    let e = api.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("server-key.pem") && e.contains("mode 0640"),
        "{e}"
    );

    // `--check` and a fresh start fail the same way.
    let err = refused(&["daemon", "--check", "--config", &config]).await;
    assert_names(&err, &key, "0640");
    drop(d);
    let err = refused(&["daemon", "--config", &config]).await;
    assert_names(&err, &key, "0640");

    chmod(&key, 0o600);
    let dir2 = tempfile::Builder::new()
        .prefix("miggate-keyperm-")
        .tempdir()
        .unwrap();
    let d = miggate()
        .daemon(dir2.path(), &pki, &DaemonOpts::default())
        .await
        .unwrap();
    d.client().unwrap().reload().await.unwrap();
}
