//! The QMP commands of a storage migration, in libvirt's order
//! (`virsh migrate --copy-storage-all`): on the target, an NBD server and
//! one writable export per disk; on the source, an `nbd` block node per
//! disk (its server: the source gateway's NBD socket) and a mirror job
//! into it, until every job is ready; the RAM migration; then each ready
//! mirror cancelled (it ends in sync, the source keeps its own disk) and
//! its node removed; the target's exports and server stopped.

use std::path::Path;

use serde_json::{json, Value};

use super::{Qmp, QmpError};

/// One disk to copy: its block node on each QEMU and the export name that
/// joins them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCopy {
    /// The target QEMU's node that receives the disk.
    pub target_node: String,
    /// The NBD export name (what the source's client asks for).
    pub export: String,
}

/// A block node name QEMU accepts (`id_wellformed()`: a letter first,
/// then letters, digits, `-`, `.`, `_`; at most 31 bytes in practice), so
/// that a name from a request cannot be anything else in a command.
pub fn node_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && name.len() <= 31
}

/// An export name miggate forwards: printable ASCII without spaces,
/// bounded (NBD allows any UTF-8 up to 4096 bytes; logs and the API show
/// these).
pub fn export_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// The id of the `block-export-add` of an export (its own namespace).
fn export_id(export: &str) -> String {
    format!("miggate-{export}")
}

/// Target: `nbd-server-start` on the unix socket `sock`, then a writable
/// export of each disk.
pub async fn serve_disks(qmp: &mut Qmp, sock: &Path, disks: &[DiskCopy]) -> Result<(), QmpError> {
    // A socket left by an earlier migration would make QEMU's bind fail.
    let _ = std::fs::remove_file(sock);
    let addr = json!({"type": "unix", "data": {"path": sock}});
    qmp.execute("nbd-server-start", Some(json!({ "addr": addr })))
        .await?;
    for d in disks {
        let export = json!({
            "type": "nbd", "id": export_id(&d.export), "node-name": d.target_node,
            "name": d.export, "writable": true,
        });
        if let Err(e) = qmp.execute("block-export-add", Some(export)).await {
            stop_serving(qmp, disks).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Target: the exports and the NBD server gone (whatever exists of
/// them); the first error, if any, for the log.
pub async fn stop_serving(qmp: &mut Qmp, disks: &[DiskCopy]) -> Option<QmpError> {
    let mut first = None;
    for d in disks {
        let del = json!({ "id": export_id(&d.export), "mode": "hard" });
        if let Err(e) = qmp.execute("block-export-del", Some(del)).await {
            first.get_or_insert(e);
        }
    }
    if let Err(e) = qmp.execute("nbd-server-stop", None).await {
        first.get_or_insert(e);
    }
    first
}

/// The source's names for one disk's copy.
fn job_id(node: &str) -> String {
    format!("miggate-mirror-{node}")
}

fn nbd_node(node: &str) -> String {
    format!("miggate-nbd-{node}")
}

/// Source: an `nbd` node for `export` at the source gateway's NBD socket
/// `socket`, and a full mirror of `node` into it. A refused NBD channel
/// fails the `blockdev-add`.
pub async fn start_mirror(
    qmp: &mut Qmp,
    node: &str,
    export: &str,
    socket: &Path,
) -> Result<(), QmpError> {
    let target = json!({
        "driver": "nbd", "node-name": nbd_node(node), "export": export,
        "server": {"type": "unix", "path": socket},
    });
    qmp.execute("blockdev-add", Some(target)).await?;
    let mirror = json!({
        "job-id": job_id(node), "device": node, "target": nbd_node(node),
        "sync": "full", "auto-dismiss": false,
    });
    if let Err(e) = qmp.execute("blockdev-mirror", Some(mirror)).await {
        let _ = qmp
            .execute("blockdev-del", Some(json!({ "node-name": nbd_node(node) })))
            .await;
        return Err(e);
    }
    Ok(())
}

/// One mirror job as `query-block-jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorState {
    pub node: String,
    /// `None`: the job is gone.
    pub status: Option<String>,
    pub ready: bool,
    pub offset: u64,
    pub len: u64,
    /// QEMU's error, once the job failed (`concluded` with an error).
    pub error: Option<String>,
}

/// The state of the mirrors of `nodes`.
pub async fn mirrors(qmp: &mut Qmp, nodes: &[String]) -> Result<Vec<MirrorState>, QmpError> {
    let jobs = qmp.execute("query-block-jobs", None).await?;
    let jobs = jobs.as_array().cloned().unwrap_or_default();
    Ok(nodes
        .iter()
        .map(|node| {
            let j = jobs.iter().find(|j| j["device"] == job_id(node.as_str()));
            let get = |k: &str| j.map(|j| j[k].clone()).unwrap_or(Value::Null);
            MirrorState {
                node: node.clone(),
                status: get("status").as_str().map(str::to_owned),
                ready: get("ready") == true,
                offset: get("offset").as_u64().unwrap_or(0),
                len: get("len").as_u64().unwrap_or(0),
                error: get("error").as_str().map(str::to_owned),
            }
        })
        .collect())
}

/// Source, at the end: each mirror cancelled and dismissed, its NBD node
/// removed (which closes its NBD connection). `in_sync`: a ready mirror
/// first completes its final synchronisation (the migration succeeded:
/// the target's disk must be whole); otherwise every job is abandoned at
/// once. The source keeps its own disk either way (no pivot). Best
/// effort, for every node; the first error, if any.
pub async fn end_mirrors(qmp: &mut Qmp, nodes: &[String], in_sync: bool) -> Option<String> {
    let mut first: Option<String> = None;
    for node in nodes {
        let job = job_id(node);
        // Errors here mostly mean the job already ended.
        let _ = qmp
            .execute(
                "block-job-cancel",
                Some(json!({ "device": job, "force": !in_sync })),
            )
            .await;
    }
    // Cancelled jobs reach `concluded` (auto-dismiss is off, so their end
    // can be read); then they are dismissed.
    for _ in 0..600 {
        let states = match mirrors(qmp, nodes).await {
            Ok(s) => s,
            Err(e) => return Some(e.to_string()),
        };
        if states
            .iter()
            .all(|s| matches!(s.status.as_deref(), None | Some("concluded")))
        {
            // A final synchronisation that failed concludes with an error.
            if let Some(s) = states
                .iter()
                .find(|s| s.error.is_some())
                .filter(|_| in_sync)
            {
                first = Some(format!(
                    "{}: {}",
                    s.node,
                    s.error.clone().unwrap_or_default()
                ));
            }
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for node in nodes {
        let _ = qmp
            .execute("job-dismiss", Some(json!({ "id": job_id(node) })))
            .await;
        if let Err(e) = qmp
            .execute("blockdev-del", Some(json!({ "node-name": nbd_node(node) })))
            .await
        {
            if !e.to_string().contains("not found") && !e.to_string().contains("Failed to find") {
                first.get_or_insert(e.to_string());
            }
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_anything_else() {
        assert!(node_name_ok("disk0"));
        assert!(node_name_ok("drive-virtio-disk0"));
        assert!(!node_name_ok("0disk"));
        assert!(!node_name_ok("disk0\",\"x\":\"y"));
        assert!(!node_name_ok(""));
        assert!(!node_name_ok(&"d".repeat(32)));
        assert!(export_name_ok("drive-virtio-disk0"));
        assert!(!export_name_ok("a b"));
        assert!(!export_name_ok("a\nb"));
        assert!(!export_name_ok(""));
        assert!(!export_name_ok(&"e".repeat(256)));
    }
}
