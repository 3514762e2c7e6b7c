//! A real `miggate daemon` for tests that register migrations.

use std::path::Path;

pub use miggate_lab::Daemon;
use miggate_lab::DaemonOpts;

use super::gateway::miggate;

/// A daemon with one loopback migration listener, its files in `dir`.
pub async fn start(dir: &Path, pki: &Path) -> Daemon {
    miggate()
        .daemon(dir, pki, &DaemonOpts::default())
        .await
        .unwrap()
}
