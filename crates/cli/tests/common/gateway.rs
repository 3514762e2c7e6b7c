//! Runs the real `miggate` binary as a source or target gateway and reads
//! its JSON log lines, so tests can await events (listening, outcome records)
//! instead of sleeping.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub const BIN: &str = env!("CARGO_BIN_EXE_miggate");

pub struct Gateway {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    cursor: usize,
    /// The address the gateway listens on (from its "listening" event).
    pub addr: String,
}

impl Gateway {
    /// `miggate target --listen 127.0.0.1:0 ARGS...`
    pub async fn target(args: &[&str]) -> Gateway {
        let mut full = vec!["target", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Self::spawn(&full).await
    }

    /// `miggate source --listen tcp:127.0.0.1:0 ARGS...`
    pub async fn source(args: &[&str]) -> Gateway {
        let mut full = vec!["source", "--listen", "tcp:127.0.0.1:0"];
        full.extend_from_slice(args);
        Self::spawn(&full).await
    }

    pub async fn spawn(args: &[&str]) -> Gateway {
        Self::spawn_cmd(Command::new(BIN), args).await
    }

    /// [`Gateway::spawn`] with the process umask set to `umask` (octal),
    /// e.g. to show that a socket's mode does not depend on it.
    pub async fn spawn_with_umask(umask: &str, args: &[&str]) -> Gateway {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "umask \"$0\" && exec \"$@\"", umask, BIN]);
        Self::spawn_cmd(cmd, args).await
    }

    async fn spawn_cmd(mut cmd: Command, args: &[&str]) -> Gateway {
        let mut child = cmd
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn miggate");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (tx, count) = watch::channel(0usize);
        {
            let (lines, raw) = (lines.clone(), raw.clone());
            tokio::spawn(async move {
                let mut rd = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = rd.next_line().await {
                    raw.lock().unwrap().push(line.clone());
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        let mut l = lines.lock().unwrap();
                        l.push(v);
                        tx.send_replace(l.len());
                    }
                }
                // Closing the channel wakes waiters: the process is gone.
                drop(tx);
            });
        }
        let mut gw = Gateway {
            child,
            lines,
            raw,
            count,
            cursor: 0,
            addr: String::new(),
        };
        let ev = gw
            .wait_event(|v| v["message"] == "listening", Duration::from_secs(20))
            .await;
        gw.addr = ev["listen"]
            .as_str()
            .expect("listen field")
            .trim_start_matches("tcp:")
            .to_string();
        gw
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// Everything the gateway printed so far (for failure messages).
    pub fn log_text(&self) -> String {
        self.raw.lock().unwrap().join("\n")
    }

    /// Waits for the next log event (after those already consumed) that
    /// matches `pred`; panics with the log on timeout or exit.
    pub async fn wait_event(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                while self.cursor < lines.len() {
                    let v = &lines[self.cursor];
                    self.cursor += 1;
                    if pred(v) {
                        return v.clone();
                    }
                }
            }
            match tokio::time::timeout_at(deadline, self.count.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!(
                    "miggate exited while a test waited for an event; log:\n{}",
                    self.log_text()
                ),
                Err(_) => panic!(
                    "timed out waiting for a miggate event; log:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    /// Waits for the next per-connection outcome record.
    pub async fn wait_outcome(&mut self, timeout: Duration) -> Value {
        self.wait_event(|v| v["target"] == "miggate::outcome", timeout)
            .await
    }

    /// Every JSON log event seen so far (consumed or not).
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// All outcome records seen so far (consumed or not).
    pub fn outcomes(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["target"] == "miggate::outcome")
            .cloned()
            .collect()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for Gateway {
    /// A failing test shows what the gateway saw.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- miggate {} log ---\n{}", self.addr, self.log_text());
        }
    }
}

/// `miggate pki init DIR [ARGS...]`, panicking with its output on failure.
pub fn pki_init(dir: &Path, args: &[&str]) {
    run_ok(&[&["pki", "init", dir.to_str().unwrap()], args].concat());
}

/// A new directory holding the CA cert of `ca_dir` and a client cert for `dn`.
pub fn pki_issue(ca_dir: &Path, out: &Path, dn: &str) -> PathBuf {
    run_ok(&[
        "pki",
        "issue",
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--client-dn",
        dn,
    ]);
    out.to_path_buf()
}

pub fn run_ok(args: &[&str]) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "miggate {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
