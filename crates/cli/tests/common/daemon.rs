//! A real `miggate daemon` for tests that register migrations.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use miggate::control::{ApiAddr, ApiClient};
use tokio::process::{Child, Command};

use super::gateway::BIN;

const DAEMON_START: Duration = Duration::from_secs(20);

/// A `miggate daemon` with one loopback migration listener; killed on drop.
pub struct Daemon {
    _child: Child,
    pub api: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub async fn start(dir: &Path, pki: &Path) -> Daemon {
        let api = dir.join("api.sock");
        // The daemon creates its runtime directory, private (0700).
        let run = dir.join("run");
        let config = dir.join("daemon.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nruntime_dir = {:?}\n[api]\nsocket = {:?}\n[[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = {:?}\n",
                run.display().to_string(),
                api.display().to_string(),
                pki.display().to_string()
            ),
        )
        .unwrap();
        let log = dir.join("daemon.log");
        let child = Command::new(BIN)
            .args(["--log-format", "json", "daemon", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn miggate daemon");
        let d = Daemon {
            _child: child,
            api,
            log,
        };
        let client = d.client();
        let deadline = tokio::time::Instant::now() + DAEMON_START;
        while client.migrations().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon API not up; log:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(ApiAddr::Unix(self.api.clone())).unwrap()
    }

    pub fn target(&self) -> String {
        format!("unix:{}", self.api.display())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
