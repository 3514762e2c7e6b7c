//! The target QEMU of a QMP-forward registration (`"forward": {"qmp":
//! "unix:PATH"}`): the daemon prepares it for the incoming migration
//! (capabilities, parameters, `migrate-incoming` on a socket of its own),
//! and once the channels have ended asks it how the migration went, since
//! only QEMU knows whether it loaded the VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::admit::registry::{Migration, Phase, Registry};
use crate::control::types::QmpForward;
use crate::qmp::{MigrationParameters, Qmp, QmpError};

/// Connecting to the target QEMU's QMP and preparing it. Each command is
/// bounded by the QMP client itself; this bounds the whole.
const QMP_SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the target QEMU may take to finish loading once the sockets
/// closed (device state is loaded after the last RAM page).
const QEMU_VERDICT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the target QEMU could not be prepared. `Display` is the API's answer.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The request named something else than a unix socket (the caller's
    /// mistake, not QEMU's).
    #[error("forward.qmp {0:?} is not unix:PATH (the target QEMU's QMP socket)")]
    NotUnix(String),
    #[error("cannot use the target QEMU's QMP at {path}: {error}")]
    Connect { path: String, error: QmpError },
    #[error("target {0}")]
    Command(QmpError),
    #[error("the target QEMU's QMP at {path} did not finish the set-up within {} s", QMP_SETUP_TIMEOUT.as_secs())]
    Timeout { path: String },
}

/// The QMP socket path of `forward.qmp`.
fn qmp_path(q: &QmpForward) -> Result<&str, PrepareError> {
    q.qmp
        .strip_prefix("unix:")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| PrepareError::NotUnix(q.qmp.clone()))
}

/// Sets the target QEMU's migration capabilities and parameters, then
/// `migrate-incoming unix:SOCK`, where the gateway will forward.
pub async fn prepare(q: &QmpForward, sock: &Path) -> Result<(), PrepareError> {
    let path = qmp_path(q)?;
    let work = async {
        let mut qmp = Qmp::connect_unix(path)
            .await
            .map_err(|error| PrepareError::Connect {
                path: path.to_string(),
                error,
            })?;
        if !q.capabilities.is_empty() {
            qmp.set_capabilities(q.capabilities.iter().map(|(c, on)| (c, *on)))
                .await
                .map_err(PrepareError::Command)?;
        }
        if !q.parameters.is_empty() {
            let params = MigrationParameters {
                other: q.parameters.clone(),
                ..Default::default()
            };
            qmp.set_parameters(&params)
                .await
                .map_err(PrepareError::Command)?;
        }
        // A socket left by an earlier migration would make QEMU's bind fail.
        let _ = std::fs::remove_file(sock);
        qmp.migrate_incoming(&format!("unix:{}", sock.display()))
            .await
            .map_err(PrepareError::Command)?;
        Ok(())
    };
    tokio::time::timeout(QMP_SETUP_TIMEOUT, work)
        .await
        .map_err(|_| PrepareError::Timeout {
            path: path.to_string(),
        })?
}

/// Once `mig` has ended: removes its incoming socket and, unless it was
/// cancelled, settles its outcome with the target QEMU's verdict.
pub fn settle_when_ended(
    registry: Arc<Registry>,
    mig: Arc<Migration>,
    q: &QmpForward,
    sock: PathBuf,
) {
    let qmp_path = q.qmp.trim_start_matches("unix:").to_string();
    tokio::spawn(async move {
        wait_until_ended(&registry, &mig).await;
        let _ = std::fs::remove_file(&sock);
        if mig.view().state != Phase::Cancelled {
            settle_with_qemu_verdict(&mig, &qmp_path).await;
        }
    });
}

/// Waits until the migration's channels have all ended (or it was
/// cancelled or expired).
async fn wait_until_ended(registry: &Registry, mig: &Migration) {
    let mut changes = registry.subscribe();
    while !mig.view().state.is_final() {
        if changes.changed().await.is_err() {
            break;
        }
    }
}

/// Asks the target QEMU how its incoming migration ended and records that.
/// Unreachable QMP (a target QEMU exits when an incoming migration fails)
/// leaves the channels' verdict, with a note in the log.
async fn settle_with_qemu_verdict(mig: &Migration, qmp_path: &str) {
    let ask = async {
        let mut qmp = Qmp::connect_unix(qmp_path).await?;
        loop {
            let info = qmp.query_migrate().await?;
            if info.is_terminal() {
                return Ok::<_, QmpError>(info);
            }
            // Loading the device state after the stream: a short wait.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(QEMU_VERDICT_TIMEOUT, ask).await {
        Ok(Ok(info)) => {
            let completed = info.status.as_deref() == Some("completed");
            let why = info
                .error_desc
                .map(|e| format!("target QEMU: {e}"))
                .or_else(|| {
                    Some(format!(
                        "target QEMU: migration {}",
                        info.status.unwrap_or_default()
                    ))
                });
            mig.settle(completed, if completed { None } else { why });
        }
        Ok(Err(e)) => tracing::warn!(
            migration = %mig.id, error = %e,
            "cannot ask the target QEMU how the migration ended; keeping the channels' verdict"
        ),
        Err(_) => tracing::warn!(
            migration = %mig.id,
            "the target QEMU did not finish the incoming migration within {} s",
            QEMU_VERDICT_TIMEOUT.as_secs()
        ),
    }
}
