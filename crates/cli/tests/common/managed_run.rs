//! A running counter guest with a daemon in front of its target, and
//! `miggate migrate --json` run against them to its end: what the
//! postcopy and recovery tests of `miggate migrate` share.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::daemon::Daemon;
use super::gateway::BIN;
use super::qemu::{Guest, Qemu, QemuExt, QemuOpts, QemuVersion};
use super::scenario::{pki, pki_dir, MIGRATION_TIMEOUT};

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Both QEMUs (each with a spare QMP socket: `sq`, `tq`), the daemon, the PKI.
pub struct CounterPair {
    pub src: Qemu,
    pub dst: Qemu,
    pub sq: PathBuf,
    pub tq: PathBuf,
    pub daemon: Daemon,
    pub pki: PathBuf,
    // Removed last, after the daemon and the QEMUs.
    _dirs: (TempDir, TempDir),
}

/// A running counter guest of `ram_mib` on `qemu` (with a UUID), its
/// incoming twin, and a daemon; the source is counting when it returns.
pub async fn counter_pair(qemu: QemuVersion, ram_mib: u32, prefix: &str) -> CounterPair {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let mut opts = QemuOpts::new(Guest::RunningCounter, ram_mib);
    opts.uuid = Some(uuid::Uuid::new_v4());
    opts.qemu = qemu;
    let (mut src, dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    src.assert_running_and_counting().await;
    let daemon = super::daemon::start(dir.path(), &pki).await;
    CounterPair {
        src,
        dst,
        sq,
        tq,
        daemon,
        pki,
        _dirs: (dir, pki_t),
    }
}

impl CounterPair {
    /// `miggate migrate --json` from the source QMP socket to the daemon
    /// with the PKI, plus `args`; output piped, killed when dropped.
    pub fn migrate(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(["migrate", "--json", "--source-qmp"])
            .arg(format!("unix:{}", s(&self.sq)))
            .args([
                "--target",
                &self.daemon.target(),
                "--x509-dir",
                s(&self.pki),
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }
}

/// Runs the command, handing each JSON line to `on_line` with the lines
/// before it and the command's pid (to signal it); returns every line and
/// the exit code, printing them and its stderr.
pub async fn run_migrate(
    mut cmd: Command,
    mut on_line: impl FnMut(&Value, &[Value], u32),
) -> (Vec<Value>, Option<i32>) {
    let mut child = cmd.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen: Vec<Value> = Vec::new();
    let status = tokio::time::timeout(MIGRATION_TIMEOUT, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: Value =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            on_line(&v, &seen, pid);
            seen.push(v);
        }
        child.wait().await.unwrap()
    })
    .await
    .unwrap_or_else(|_| panic!("miggate migrate did not finish: {seen:#?}"));
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    eprintln!("miggate migrate -> {status}\nstdout:");
    for l in &seen {
        eprintln!("{l}");
    }
    eprintln!("stderr:\n{stderr}");
    (seen, status.code())
}

/// The `message` of every line of type `kind` (`step`, `note`).
pub fn messages<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|l| l["type"] == kind)
        .filter_map(|l| l["message"].as_str())
        .collect()
}
