//! The target QEMU of a QMP-forward registration (`"forward": {"qmp":
//! "unix:PATH"}`): the daemon prepares it for the incoming migration
//! (capabilities, parameters, `migrate-incoming` on a socket of its own),
//! and once the channels have ended asks it how the migration went, since
//! only QEMU knows whether it loaded the VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admit::registry::{Migration, Phase, Registry};
use crate::control::types::QmpForward;
use crate::qmp::capabilities::{self, CapabilityError};
use crate::qmp::storage::{self, DiskCopy};
use crate::qmp::{MigrationParameters, Qmp, QmpError};

/// Connecting to the target QEMU's QMP and preparing it. Each command is
/// bounded by the QMP client itself; this bounds the whole.
const QMP_SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the target QEMU may take to finish loading once the sockets
/// closed (device state is loaded after the last RAM page).
const QEMU_VERDICT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a DELETE waits to learn whether the target QEMU is in
/// postcopy: its QMP socket serves one client at a time, and a busy one
/// must not hold the API's answer.
const POSTCOPY_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The target QEMU's QMP socket of each QMP-forward migration, while it
/// runs: a cancel asks it first whether the guest has moved already.
#[derive(Debug, Default)]
pub struct TargetQmps(Mutex<HashMap<String, String>>);

impl TargetQmps {
    fn insert(&self, id: &str, qmp_path: &str) {
        let mut m = self.0.lock().expect("target QMP map lock");
        m.insert(id.to_string(), qmp_path.to_string());
    }

    fn remove(&self, id: &str) {
        self.0.lock().expect("target QMP map lock").remove(id);
    }

    fn get(&self, id: &str) -> Option<String> {
        self.0.lock().expect("target QMP map lock").get(id).cloned()
    }

    /// `migrate-recover` on the paused target QEMU of migration `id`, on
    /// the socket it listened on for the registration (`sock`, in the
    /// runtime directory), where the gateway forwards.
    pub async fn recover(&self, id: &str, sock: &Path) -> Result<(), RecoverError> {
        let path = self.get(id).ok_or(RecoverError::NoQmp)?;
        let work = async {
            let mut qmp =
                Qmp::connect_unix(&path)
                    .await
                    .map_err(|error| RecoverError::Connect {
                        path: path.clone(),
                        error,
                    })?;
            let info = qmp.query_migrate().await.map_err(RecoverError::Command)?;
            let status = info.status.unwrap_or_default();
            if status != "postcopy-paused" {
                return Err(RecoverError::NotPaused(status));
            }
            // The first listener's socket file is still there: QEMU's
            // bind would fail on it.
            let _ = std::fs::remove_file(sock);
            qmp.migrate_recover(&format!("unix:{}", sock.display()))
                .await
                .map_err(RecoverError::Command)
        };
        tokio::time::timeout(QMP_SETUP_TIMEOUT, work)
            .await
            .map_err(|_| RecoverError::Timeout { path: path.clone() })?
    }

    /// The migration's target QEMU status when it is in postcopy
    /// (`postcopy-active`, `postcopy-paused`...): cutting the channels
    /// then leaves the guest split over the hosts instead of giving it
    /// back to the source. `None` when not, or when QEMU cannot tell in
    /// time (the cancel then goes ahead as it always did).
    pub async fn in_postcopy(&self, id: &str) -> Option<String> {
        let path = self
            .0
            .lock()
            .expect("target QMP map lock")
            .get(id)
            .cloned()?;
        let ask = async {
            let mut qmp = Qmp::connect_unix(&path).await.ok()?;
            qmp.query_migrate().await.ok()
        };
        let info = tokio::time::timeout(POSTCOPY_CHECK_TIMEOUT, ask)
            .await
            .ok()
            .flatten()?;
        info.in_postcopy().then(|| info.status.unwrap_or_default())
    }
}

/// Why the target QEMU could not be prepared. `Display` is the API's answer.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The request named something else than a unix socket (the caller's
    /// mistake, not QEMU's).
    #[error("forward.qmp {0:?} is not unix:PATH (the target QEMU's QMP socket)")]
    NotUnix(String),
    /// A capability that cannot work through the daemon's gateway, or one
    /// on without what it needs (the caller's mistake).
    #[error("forward.capabilities: {0}")]
    Refused(String),
    /// The target QEMU cannot do what was asked (its version).
    #[error("forward.capabilities: the target {0}")]
    Unsupported(CapabilityError),
    #[error("cannot use the target QEMU's QMP at {path}: {error}")]
    Connect { path: String, error: QmpError },
    #[error("target {0}")]
    Command(QmpError),
    #[error("the target QEMU's QMP at {path} did not finish the set-up within {} s", QMP_SETUP_TIMEOUT.as_secs())]
    Timeout { path: String },
}

/// Why the target QEMU could not be made to listen for a recovery.
/// `Display` is the API's answer.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("the daemon does not drive this migration's target QEMU (no forward.qmp, or the daemon restarted): run migrate-recover on it yourself")]
    NoQmp,
    #[error("the target QEMU is {0:?}, not postcopy-paused: there is nothing to recover")]
    NotPaused(String),
    #[error("cannot use the target QEMU's QMP at {path}: {error}")]
    Connect { path: String, error: QmpError },
    #[error("target {0}")]
    Command(QmpError),
    #[error("the target QEMU's QMP at {path} did not answer within {} s", QMP_SETUP_TIMEOUT.as_secs())]
    Timeout { path: String },
}

/// Capabilities the daemon does not set on a target QEMU, with why: the
/// migration must be a byte stream that ends, arriving through the gateway
/// (the admission, not the capabilities, guards the target; these could
/// only fail later and less clearly).
const NOT_THROUGH_GATEWAY: &[(&str, &str)] = &[
    ("rdma-pin-all", "RDMA does not travel through a TLS gateway"),
    (
        "x-colo",
        "COLO's checkpoint stream never ends as a migration",
    ),
    (
        "background-snapshot",
        "a snapshot is not an incoming migration",
    ),
    ("mapped-ram", "mapped-ram migrates to a file, not a socket"),
];

/// The request's capabilities, before the target QEMU is touched.
pub fn check_request(q: &QmpForward) -> Result<(), PrepareError> {
    if let Some((cap, why)) = NOT_THROUGH_GATEWAY
        .iter()
        .find(|(c, _)| q.capabilities.get(*c) == Some(&true))
    {
        return Err(PrepareError::Refused(format!(
            "{cap} is not set by the daemon: {why}"
        )));
    }
    capabilities::check_consistent(&q.capabilities)
        .map_err(|e| PrepareError::Refused(e.to_string()))
}

/// The QMP socket path of `forward.qmp`.
pub(crate) fn qmp_path(q: &QmpForward) -> Result<&str, PrepareError> {
    q.qmp
        .strip_prefix("unix:")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| PrepareError::NotUnix(q.qmp.clone()))
}

/// Sets the target QEMU's migration capabilities and parameters, then
/// `migrate-incoming unix:SOCK`, where the gateway will forward; with
/// `storage`, also its NBD server on that socket, exporting those disks.
pub async fn prepare(
    q: &QmpForward,
    sock: &Path,
    storage: Option<(&Path, &[DiskCopy])>,
) -> Result<(), PrepareError> {
    let path = qmp_path(q)?;
    check_request(q)?;
    let work = async {
        let mut qmp = Qmp::connect_unix(path)
            .await
            .map_err(|error| PrepareError::Connect {
                path: path.to_string(),
                error,
            })?;
        if !q.capabilities.is_empty() {
            // Checked against this QEMU first: a capability it lacks, or
            // postcopy with multifd on a QEMU that would break at the
            // switch, is refused in words before anything is set.
            let offered = qmp
                .offered_capabilities()
                .await
                .map_err(PrepareError::Command)?;
            capabilities::check(&q.capabilities, &offered).map_err(PrepareError::Unsupported)?;
            qmp.set_capabilities(capabilities::settable(&q.capabilities, &offered))
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
        if let Some((nbd, disks)) = storage {
            storage::serve_disks(&mut qmp, nbd, disks)
                .await
                .map_err(PrepareError::Command)?;
        }
        if let Err(e) = qmp
            .migrate_incoming(&format!("unix:{}", sock.display()))
            .await
        {
            if let Some((_, disks)) = storage {
                storage::stop_serving(&mut qmp, disks).await;
            }
            return Err(PrepareError::Command(e));
        }
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
/// With `storage` (its NBD socket and disks): the target QEMU's NBD
/// server is stopped once the channels have ended, whatever the end (a
/// guest must not run with its disks still exported), before the verdict.
pub fn settle_when_ended(
    registry: Arc<Registry>,
    mig: Arc<Migration>,
    q: &QmpForward,
    sock: PathBuf,
    storage: Option<(PathBuf, Vec<DiskCopy>)>,
    qmps: Arc<TargetQmps>,
) {
    let qmp_path = q.qmp.trim_start_matches("unix:").to_string();
    qmps.insert(&mig.id, &qmp_path);
    tokio::spawn(async move {
        // A postcopy cut pauses the migration (not final): it is settled
        // again once its recovery has ended, or failed at its deadline.
        loop {
            wait_until_ended(&registry, &mig).await;
            if let Some((nbd, disks)) = &storage {
                stop_serving(&qmp_path, disks, &mig.id).await;
                let _ = std::fs::remove_file(nbd);
            }
            if mig.view().state == Phase::Cancelled
                || !settle_with_qemu_verdict(&mig, &qmp_path).await
            {
                break;
            }
        }
        qmps.remove(&mig.id);
        let _ = std::fs::remove_file(&sock);
    });
}

/// The target QEMU's NBD exports and server stopped; a failure is only
/// logged (a QEMU that is gone has nothing exported any more).
async fn stop_serving(qmp_path: &str, disks: &[DiskCopy], id: &str) {
    let stop = async {
        let mut qmp = Qmp::connect_unix(qmp_path).await?;
        match storage::stop_serving(&mut qmp, disks).await {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    match tokio::time::timeout(QMP_SETUP_TIMEOUT, stop).await {
        Ok(Ok(())) => {
            tracing::info!(migration = %id, disks = disks.len(), "target QEMU's NBD exports and server stopped")
        }
        Ok(Err(e)) => {
            tracing::warn!(migration = %id, error = %e, "stopping the target QEMU's NBD exports")
        }
        Err(_) => {
            tracing::warn!(migration = %id, "the target QEMU did not stop its NBD server in time")
        }
    }
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

/// Asks the target QEMU how its incoming migration ended and records that;
/// true when it is `postcopy-paused` and the migration now waits for a
/// recovery. A QEMU that is gone (nothing listens on its QMP socket: a
/// target QEMU exits when an incoming migration fails) fails a migration
/// the channels saw complete; a QMP that cannot be asked otherwise leaves
/// the channels' verdict, with a note in the log.
async fn settle_with_qemu_verdict(mig: &Migration, qmp_path: &str) -> bool {
    let ask = async {
        let mut qmp = Qmp::connect_unix(qmp_path).await?;
        loop {
            let info = qmp.query_migrate().await?;
            // postcopy-paused waits for a recovery (POST .../recover).
            if info.is_terminal() || info.status.as_deref() == Some("postcopy-paused") {
                return Ok::<_, QmpError>(info);
            }
            // Loading the device state after the stream: a short wait.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(QEMU_VERDICT_TIMEOUT, ask).await {
        Ok(Ok(info)) => {
            let completed = info.status.as_deref() == Some("completed");
            let paused = info.status.as_deref() == Some("postcopy-paused");
            let why = info
                .error_desc
                .map(|e| format!("target QEMU: {e}"))
                .filter(|_| !paused)
                .or_else(|| {
                    paused.then(|| {
                        format!(
                            "target QEMU: postcopy-paused: the VM runs here, the pages it has \
                             not fetched yet are on the source; recover it with \
                             miggate migrate --recover {id} on the source host \
                             (POST /v1/migrations/{id}/recover)",
                            id = mig.id
                        )
                    })
                })
                .or_else(|| {
                    Some(format!(
                        "target QEMU: migration {}",
                        info.status.unwrap_or_default()
                    ))
                });
            if paused {
                let why = why.unwrap_or_default();
                if mig.pause(why.clone(), crate::timeouts::RECOVERY_WINDOW) {
                    return true;
                }
                // Past its recovery deadline: settle keeps that verdict.
                mig.settle(false, Some(why));
                return false;
            }
            mig.settle(completed, if completed { None } else { why });
        }
        // A target QEMU that loaded the VM runs it; one that is gone ended
        // its incoming migration by failing (QEMU exits then), whatever the
        // channels saw: a source QEMU killed mid-stream, or a target QEMU
        // killed, can leave every socket closed cleanly.
        // (A failure the channels saw keeps its own, more precise reason.)
        Ok(Err(e)) if qemu_gone(&e) => {
            if mig.view().state == Phase::Completed {
                mig.settle(
                    false,
                    Some(format!(
                        "target QEMU: gone before it reported the migration complete ({e}); a target QEMU exits when its incoming migration fails"
                    )),
                );
            }
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
    false
}

/// The QMP socket has no QEMU behind it any more: nothing listens on it
/// (or the file is gone), or QEMU closed the connection.
fn qemu_gone(e: &QmpError) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    match e {
        QmpError::Closed => true,
        QmpError::Io { source, .. } => matches!(source.kind(), ConnectionRefused | NotFound),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::registry::IncomingSpec;
    use crate::wire::qemu::StreamKind;

    /// Regression (faults: the source QEMU killed mid-stream): its gateway
    /// ends the stream as QEMU closed it, every channel looks completed,
    /// and the target QEMU exits on the truncated stream. The migration
    /// must be failed, not completed.
    #[tokio::test]
    async fn a_target_qemu_that_is_gone_fails_a_completed_looking_migration() {
        const DN: &str = "O=t,CN=src";
        let reg = Registry::new(Duration::from_secs(60));
        let vm = uuid::Uuid::from_u128(1);
        let spec = || IncomingSpec {
            vm_uuid: Some(vm),
            allow: Arc::new(crate::authz::Simple::new(DN)),
            allow_desc: DN.into(),
            forward: crate::net::Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            channels: 1,
            ttl: Duration::from_secs(60),
            listeners: vec![0],
            disks: Vec::new(),
            nbd_forward: None,
        };
        let (mig, _) = reg.register(spec());
        let main = StreamKind::Main {
            uuid: Some(vm),
            machine: None,
        };
        mig.admit_channel(DN, &main).unwrap().finish(Ok(()));
        assert_eq!(mig.view().state, Phase::Completed);

        // A QMP socket file nothing listens on any more (a killed QEMU's).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(!settle_with_qemu_verdict(&mig, path.to_str().unwrap()).await);
        let v = mig.view();
        assert_eq!(v.state, Phase::Failed, "{v:?}");
        let reason = v.reason.unwrap_or_default();
        assert!(reason.starts_with("target QEMU: gone before"), "{reason}");

        // Its socket file removed as well: the same.
        let (mig, _) = reg.register(spec());
        mig.admit_channel(DN, &main).unwrap().finish(Ok(()));
        let gone = dir.path().join("nothing.sock");
        assert!(!settle_with_qemu_verdict(&mig, gone.to_str().unwrap()).await);
        assert_eq!(mig.view().state, Phase::Failed);

        // A failure the channels saw keeps its reason.
        let (mig, _) = reg.register(spec());
        mig.admit_channel(DN, &main)
            .unwrap()
            .finish(Err("source->target: cut".into()));
        assert!(!settle_with_qemu_verdict(&mig, gone.to_str().unwrap()).await);
        let v = mig.view();
        assert_eq!(
            (v.state, v.reason.as_deref()),
            (Phase::Failed, Some("source->target: cut"))
        );
    }

    fn forward(caps: &[(&str, bool)]) -> QmpForward {
        QmpForward {
            qmp: "unix:/run/q.sock".into(),
            capabilities: caps.iter().map(|(c, on)| (c.to_string(), *on)).collect(),
            parameters: Default::default(),
        }
    }

    #[test]
    fn requests_are_checked_before_qemu_is_touched() {
        check_request(&forward(&[])).unwrap();
        check_request(&forward(&[
            ("postcopy-ram", true),
            ("postcopy-preempt", true),
        ]))
        .unwrap();
        // Off is always fine: nothing to carry.
        check_request(&forward(&[("x-colo", false)])).unwrap();
        let e = check_request(&forward(&[("postcopy-preempt", true)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "forward.capabilities: postcopy-preempt needs postcopy-ram on too"
        );
        let e = check_request(&forward(&[("rdma-pin-all", true)])).unwrap_err();
        assert!(matches!(e, PrepareError::Refused(_)), "{e}");
        assert!(e.to_string().contains("RDMA"), "{e}");
    }
}
