//! Durations and sizes from the command line are bounded when parsed: a
//! value that would overflow a deadline is an error naming the option and
//! its range, not a panic on the first connection.

mod common;

use std::time::Duration;

use common::scenario::{pki, pki_dir};

/// Long enough for a gateway to start and fail a connection; it must have
/// exited well before.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

async fn run(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(common::gateway::BIN)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(EXIT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("miggate {args:?} is still running: the value was accepted"))
        .unwrap()
}

#[tokio::test]
async fn a_huge_stall_timeout_is_refused_at_parse_time() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let huge = u64::MAX.to_string();
    let target = [
        "target",
        "--listen",
        "127.0.0.1:0",
        "--x509-dir",
        pki.to_str().unwrap(),
        "--forward",
        "tcp:127.0.0.1:9",
        "--allow-any-verified-peer",
        "--stall-timeout",
        &huge,
    ];
    let source = [
        "source",
        "--listen",
        "tcp:127.0.0.1:0",
        "--connect",
        "127.0.0.1:9",
        "--x509-dir",
        pki.to_str().unwrap(),
        "--stall-timeout",
        &huge,
    ];
    for args in [&target[..], &source[..]] {
        let out = run(args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--stall-timeout") && err.contains("1..=3600"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
