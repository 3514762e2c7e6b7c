//! The real `miggate` binary as the tests, the demo and the bench run it:
//! gateways and the daemon with JSON logs read line by line (so callers
//! await events such as "listening" or an outcome record instead of
//! sleeping), and `miggate pki`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use miggate::control::{ApiAddr, ApiClient};

use super::LabError;

/// A gateway or daemon binds and logs "listening" within milliseconds;
/// this is the patience of a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The `HOST` and `PORT` of `HOST:PORT` (`[v6]:port` too: the last colon).
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

/// The miggate binary to run.
#[derive(Debug, Clone)]
pub struct Miggate {
    pub bin: PathBuf,
}

impl Miggate {
    pub fn new(bin: impl Into<PathBuf>) -> Miggate {
        Miggate { bin: bin.into() }
    }

    /// The running binary: `miggate demo` and `miggate bench` run themselves.
    pub fn current_exe() -> Result<Miggate, LabError> {
        let bin =
            std::env::current_exe().map_err(|e| LabError::io("finding the miggate binary", e))?;
        Ok(Miggate { bin })
    }

    /// `miggate target --listen 127.0.0.1:0 ARGS...`
    pub async fn target(&self, args: &[&str]) -> Result<Gateway, LabError> {
        self.gateway(&[&["target", "--listen", "127.0.0.1:0"], args].concat())
            .await
    }

    /// `miggate source --listen tcp:127.0.0.1:0 ARGS...`
    pub async fn source(&self, args: &[&str]) -> Result<Gateway, LabError> {
        self.gateway(&[&["source", "--listen", "tcp:127.0.0.1:0"], args].concat())
            .await
    }

    /// `miggate --log-format json ARGS...`, once it logged "listening".
    pub async fn gateway(&self, args: &[&str]) -> Result<Gateway, LabError> {
        Gateway::spawn(Command::new(&self.bin), args, None).await
    }

    /// [`Miggate::gateway`] with the process umask set to `umask` (octal),
    /// e.g. to show that a socket's mode does not depend on it.
    pub async fn gateway_with_umask(
        &self,
        umask: &str,
        args: &[&str],
    ) -> Result<Gateway, LabError> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "umask \"$0\" && exec \"$@\"", umask])
            .arg(&self.bin);
        Gateway::spawn(cmd, args, None).await
    }

    /// `miggate ARGS...`, an error with its output unless it succeeds.
    pub fn run_ok(&self, args: &[&str]) -> Result<Output, LabError> {
        let out = std::process::Command::new(&self.bin)
            .args(args)
            .output()
            .map_err(|e| LabError::io(format!("running miggate {args:?}"), e))?;
        if !out.status.success() {
            return Err(LabError::Unexpected {
                what: format!("miggate {args:?} failed ({})", out.status),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(out)
    }

    /// `miggate pki init DIR [ARGS...]`
    pub fn pki_init(&self, dir: &Path, args: &[&str]) -> Result<(), LabError> {
        let dir = dir.display().to_string();
        self.run_ok(&[&["pki", "init", &dir], args].concat())
            .map(drop)
    }

    /// `miggate pki issue`: a new directory `out` holding the CA cert of
    /// `ca_dir` and a client cert for `dn`.
    pub fn pki_issue(&self, ca_dir: &Path, out: &Path, dn: &str) -> Result<PathBuf, LabError> {
        let (ca, o) = (ca_dir.display().to_string(), out.display().to_string());
        self.run_ok(&[
            "pki",
            "issue",
            "--ca-dir",
            &ca,
            "--out",
            &o,
            "--client-dn",
            dn,
        ])?;
        Ok(out.to_path_buf())
    }

    /// `miggate daemon` with one loopback migration listener using `pki`,
    /// its API socket, runtime directory and config in `dir`; ready when
    /// its API listens.
    pub async fn daemon(
        &self,
        dir: &Path,
        pki: &Path,
        opts: &DaemonOpts,
    ) -> Result<Daemon, LabError> {
        let api = dir.join(&opts.api_socket);
        let config = dir.join("daemon.toml");
        let metrics = if opts.metrics {
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\n"
        } else {
            ""
        };
        // The daemon creates its runtime directory, private (0700).
        let text = format!(
            "[daemon]\nruntime_dir = {run:?}\n\n[api]\nsocket = {api:?}\n\n{metrics}\
             [[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = {pki:?}\n{extra}",
            run = dir.join("run").display().to_string(),
            api = api.display().to_string(),
            pki = pki.display().to_string(),
            extra = opts.target_extra,
        );
        std::fs::write(&config, text)
            .map_err(|e| LabError::io("writing the daemon's config", e))?;
        let config_s = config.display().to_string();
        let mut gw = Gateway::spawn(
            Command::new(&self.bin),
            &["daemon", "--config", &config_s],
            opts.log_file.as_deref(),
        )
        .await?;
        let metrics = match opts.metrics {
            true => {
                let ev = gw
                    .wait_event(|v| v["message"] == "metrics listening", START_TIMEOUT)
                    .await?;
                ev["listen"].as_str().map(str::to_owned)
            }
            false => None,
        };
        let ev = gw
            .wait_event(|v| v["message"] == "API listening", START_TIMEOUT)
            .await?;
        if ev["socket"].as_str() != api.to_str() {
            return Err(LabError::Unexpected {
                what: format!("the daemon's API listens elsewhere than configured: {ev}"),
                stderr: gw.log_text(),
            });
        }
        Ok(Daemon {
            gw,
            api,
            config,
            metrics,
        })
    }
}

/// What varies between the daemons of the tests and the demo.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// The API socket, relative to the daemon's directory.
    pub api_socket: PathBuf,
    /// A loopback metrics listener.
    pub metrics: bool,
    /// Appended to the configuration after the `[[target]]` table's
    /// `listen` and `x509_dir` (more keys of that table, then more tables).
    pub target_extra: String,
    /// Also write the daemon's log lines to this file.
    pub log_file: Option<PathBuf>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts {
            api_socket: "api.sock".into(),
            metrics: false,
            target_extra: String::new(),
            log_file: None,
        }
    }
}

/// A running `miggate daemon`; killed on drop.
pub struct Daemon {
    /// The process and its log; `gw.addr` is the migration listener.
    pub gw: Gateway,
    pub api: PathBuf,
    pub config: PathBuf,
    /// The metrics listener's `HOST:PORT`, when asked for.
    pub metrics: Option<String>,
}

impl Daemon {
    pub fn client(&self) -> Result<ApiClient, LabError> {
        ApiClient::new(ApiAddr::Unix(self.api.clone())).map_err(|e| LabError::Unexpected {
            what: format!("API client for {}: {e}", self.api.display()),
            stderr: String::new(),
        })
    }

    /// The daemon as `miggate migrate --target` names it.
    pub fn target(&self) -> String {
        format!("unix:{}", self.api.display())
    }

    pub fn log_text(&self) -> String {
        self.gw.log_text()
    }
}

/// A `miggate` process whose JSON log lines are read as they come; killed
/// on drop.
pub struct Gateway {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    cursor: usize,
    /// Where it listens (from its "listening" event): `HOST:PORT`, or
    /// `unix:PATH`.
    pub addr: String,
}

impl Gateway {
    async fn spawn(
        mut cmd: Command,
        args: &[&str],
        tee: Option<&Path>,
    ) -> Result<Gateway, LabError> {
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
            .map_err(|source| LabError::Spawn {
                binary: cmd.as_std().get_program().into(),
                source,
            })?;
        let mut tee = match tee {
            Some(p) => Some(
                tokio::fs::File::create(p)
                    .await
                    .map_err(|e| LabError::io(format!("creating {}", p.display()), e))?,
            ),
            None => None,
        };
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (tx, count) = watch::channel(0usize);
        {
            let (lines, raw) = (lines.clone(), raw.clone());
            // Keeps draining to the end: a full pipe would block the process.
            tokio::spawn(async move {
                let mut rd = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = rd.next_line().await {
                    if let Some(f) = tee.as_mut() {
                        let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                    }
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
            .wait_event(|v| v["message"] == "listening", START_TIMEOUT)
            .await?;
        gw.addr = ev["listen"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("tcp:")
            .to_string();
        Ok(gw)
    }

    /// The port of a TCP listener; panics on a unix one.
    pub fn port(&self) -> u16 {
        split_host_port(&self.addr)
            .unwrap_or_else(|| panic!("{:?} is not HOST:PORT", self.addr))
            .1
    }

    /// Everything the process printed so far (for failure messages).
    pub fn log_text(&self) -> String {
        self.raw.lock().unwrap().join("\n")
    }

    /// Waits for the next log event (after those already consumed) that
    /// matches `pred`; an error with the log on timeout or exit.
    pub async fn wait_event(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, LabError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                while self.cursor < lines.len() {
                    let v = &lines[self.cursor];
                    self.cursor += 1;
                    if pred(v) {
                        return Ok(v.clone());
                    }
                }
            }
            match tokio::time::timeout_at(deadline, self.count.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(LabError::Unexpected {
                        what: "miggate exited while waiting for an event".into(),
                        stderr: self.log_text(),
                    })
                }
                Err(_) => {
                    return Err(LabError::Timeout {
                        what: "a miggate event".into(),
                        after: timeout,
                        stderr: self.log_text(),
                    })
                }
            }
        }
    }

    /// Waits for the next per-connection outcome record.
    pub async fn wait_outcome(&mut self, timeout: Duration) -> Result<Value, LabError> {
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
    /// A failing test shows what the process saw.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- miggate {} log ---\n{}", self.addr, self.log_text());
        }
    }
}
