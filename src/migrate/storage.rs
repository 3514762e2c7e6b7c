//! `miggate migrate --copy-storage`: the disks of the source VM copied to
//! the target QEMU over NBD channels of the same gateway and ticket, in
//! libvirt's order, with one change at the end.
//!
//! 1. the daemon starts the target QEMU's NBD server and exports the disks
//!    (the registration carries them);
//! 2. on the source, a mirror job per disk into an `nbd` node whose server
//!    is the source gateway's NBD socket, until every job is ready;
//! 3. the RAM migration, with `pause-before-switchover`;
//! 4. at `pre-switchover` (the guest is stopped on the source, nothing
//!    writes to its disks any more, the target has not started it yet)
//!    each mirror is cancelled, which completes its final synchronisation,
//!    and its node removed; only then `migrate-continue`, so the target
//!    starts its guest on whole disks whether or not it was started with
//!    `-S` (libvirt relies on `-S` and a `cont` of its own instead).
//!
//! On any failure the mirrors are abandoned: the source keeps its disks
//! (a mirror never pivots here), and the daemon stops the target's exports
//! when the registration ends.

use std::path::Path;
use std::time::{Duration, Instant};

use super::progress::{bytes, Reporter};
use crate::qmp::storage::{self, MirrorState};
use crate::qmp::{Qmp, QmpError};

/// How often the mirror jobs are polled while they copy.
const POLL: Duration = Duration::from_millis(200);
/// How often a copy in progress is reported.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Why the disks could not be copied. `Display` is the middle of the
/// command's one sentence.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("--copy-storage: the source QEMU has no writable disk with a node name to copy (query-block; a disk whose node QEMU named itself, #block..., cannot be exported under the same name on the target)")]
    NoDisk,
    #[error(
        "--disk {node}: the source QEMU has no writable disk with that node name (it has: {have})"
    )]
    UnknownNode { node: String, have: String },
    #[error("disk {node}: {why}")]
    Mirror { node: String, why: String },
    #[error("source QEMU")]
    Qmp(#[from] QmpError),
}

/// The source's writable disks: their node names, as `query-block` shows
/// their inserted media (`wanted`, `--disk`, picks among them), and the
/// devices of writable disks left out because QEMU named their node
/// itself (`#block123`: the target's node of that disk has another name,
/// so there is nothing to export it under; `-blockdev node-name=` or
/// `-drive node-name=` gives it one).
pub async fn source_disks(
    src: &mut Qmp,
    wanted: &[String],
) -> Result<(Vec<String>, Vec<String>), StorageError> {
    let devices = src.execute("query-block", None).await?;
    let mut writable = Vec::new();
    let mut unnamed = Vec::new();
    for d in devices.as_array().into_iter().flatten() {
        let Some(i) = d.get("inserted").filter(|i| i["ro"] != true) else {
            continue;
        };
        match i["node-name"].as_str() {
            Some(n) if storage::node_name_ok(n) => writable.push(n.to_owned()),
            // The drive's name (-drive id=), else its device's path.
            _ => unnamed.push(
                d["device"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .or(d["qdev"].as_str())
                    .unwrap_or("?")
                    .to_owned(),
            ),
        }
    }
    if wanted.is_empty() {
        return if writable.is_empty() {
            Err(StorageError::NoDisk)
        } else {
            Ok((writable, unnamed))
        };
    }
    for node in wanted {
        if !writable.contains(node) {
            return Err(StorageError::UnknownNode {
                node: node.clone(),
                have: if writable.is_empty() {
                    "none".into()
                } else {
                    writable.join(", ")
                },
            });
        }
    }
    Ok((wanted.to_vec(), Vec::new()))
}

/// Starts a mirror of each disk into the target (through `socket`, the
/// source gateway's NBD listener) and waits until every one is ready.
/// Returns the bytes copied. On error the mirrors started are abandoned.
pub async fn copy_until_ready(
    src: &mut Qmp,
    nodes: &[String],
    socket: &Path,
    rep: &mut Reporter,
) -> Result<u64, StorageError> {
    let started = Instant::now();
    rep.step(&format!(
        "mirroring {} into the target QEMU through the gateway's NBD channels (the same ticket; one export per disk)",
        nodes.join(", ")
    ));
    let result = async {
        for node in nodes {
            storage::start_mirror(src, node, node, socket)
                .await
                .map_err(|e| StorageError::Mirror {
                    node: node.clone(),
                    why: format!("the source QEMU could not open its copy on the target: {e}"),
                })?;
        }
        let mut reported = Instant::now();
        loop {
            let states = storage::mirrors(src, nodes).await?;
            if let Some(e) = states.iter().find_map(ended_early) {
                return Err(e);
            }
            let (done, total) = states
                .iter()
                .fold((0, 0), |(d, t), s| (d + s.offset, t + s.len));
            if states.iter().all(|s| s.ready) {
                return Ok(total);
            }
            if reported.elapsed() >= REPORT_EVERY {
                reported = Instant::now();
                rep.note(&format!(
                    "disks: {} of {} copied ({} of {} ready)",
                    bytes(done),
                    bytes(total),
                    states.iter().filter(|s| s.ready).count(),
                    states.len()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    .await;
    match result {
        Ok(total) => {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            rep.step(&format!(
                "disks copied: {} in {:.1} s ({}/s) through the gateway's NBD channels; the mirror{} now follow{} the guest's writes",
                bytes(total),
                secs,
                bytes((total as f64 / secs) as u64),
                if nodes.len() == 1 { "" } else { "s" },
                if nodes.len() == 1 { "s" } else { "" },
            ));
            Ok(total)
        }
        Err(e) => {
            abandon(src, nodes).await;
            Err(e)
        }
    }
}

/// A mirror that ended before it was ready: why, in QEMU's words.
fn ended_early(s: &MirrorState) -> Option<StorageError> {
    let why = match (s.status.as_deref(), &s.error) {
        (_, Some(e)) => e.clone(),
        (None, None) => "its mirror job ended before the copy was complete".into(),
        (Some("concluded" | "aborting" | "null"), None) => {
            "its mirror job stopped before the copy was complete".into()
        }
        _ => return None,
    };
    Some(StorageError::Mirror {
        node: s.node.clone(),
        why,
    })
}

/// At `pre-switchover`: each mirror completes its final synchronisation
/// (the guest is stopped, nothing writes any more) and is removed.
pub async fn complete(src: &mut Qmp, nodes: &[String]) -> Result<(), StorageError> {
    // A job that failed meanwhile would leave the target's disk behind.
    let states = storage::mirrors(src, nodes).await?;
    if let Some(s) = states.iter().find(|s| !s.ready || s.error.is_some()) {
        let e = ended_early(s).unwrap_or(StorageError::Mirror {
            node: s.node.clone(),
            why: "its mirror is not in sync".into(),
        });
        abandon(src, nodes).await;
        return Err(e);
    }
    if let Some(e) = storage::end_mirrors(src, nodes, true).await {
        return Err(StorageError::Mirror {
            node: nodes.join(", "),
            why: format!("the final synchronisation failed: {e}"),
        });
    }
    Ok(())
}

/// Every mirror abandoned at once: the source keeps its disks.
pub async fn abandon(src: &mut Qmp, nodes: &[String]) {
    if let Some(e) = storage::end_mirrors(src, nodes, false).await {
        tracing::warn!(error = %e, "removing the disk mirrors");
    }
}
