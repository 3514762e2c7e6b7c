//! Storage migration through `miggate daemon`: a registration with disks
//! (QMP forward) makes the daemon start the target QEMU's NBD server on a
//! socket of its own and export those disks; the ticket admits exactly
//! their NBD channels besides the migration's; the API shows each disk's
//! bytes; the exports and server are gone once the migration has ended,
//! or was cancelled.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::gateway::Gateway;
use common::qemu::{Guest, Qemu, QemuOpts};
use common::scenario::{migrate_and_expect_completed, pki, pki_dir, source_gateway, SOURCE_DN};
use common::storage::{self, NODE};
use miggate::control::client::ApiClient;
use miggate::control::types::{
    Allow, DiskRequest, Forward, IncomingRequest, MigrationView, Phase, QmpForward,
};
use serde_json::json;
use tempfile::TempDir;

const RAM_MIB: u32 = 64;

struct Lab {
    _pki: TempDir,
    dir: TempDir,
    daemon: miggate_lab::Daemon,
    src: Qemu,
    dst: Qemu,
    src_img: PathBuf,
    dst_img: PathBuf,
    target_qmp: PathBuf,
}

impl Lab {
    async fn new(disk_mib: usize) -> Lab {
        let pki = pki();
        let dir = tempfile::Builder::new()
            .prefix("miggate-storage-managed-")
            .tempdir()
            .unwrap();
        let daemon = common::daemon::start(dir.path(), &pki_dir(&pki)).await;
        let src_img = storage::random_disk(dir.path(), "src.img", disk_mib, 0x5108);
        let dst_img = storage::empty_disk(dir.path(), "dst.img", disk_mib);
        let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 13 }, RAM_MIB);
        let target_qmp = dir.path().join("target.qmp");
        let (mut src, dst) = Qemu::pair(
            storage::with_disk(opts.clone(), &src_img),
            storage::with_disk(opts.as_incoming(), &dst_img).with_qmp(&target_qmp),
        )
        .await
        .unwrap();
        src.set_unlimited_bandwidth().await.unwrap();
        Lab {
            _pki: pki,
            dir,
            daemon,
            src,
            dst,
            src_img,
            dst_img,
            target_qmp,
        }
    }

    fn api(&self) -> ApiClient {
        self.daemon.client().unwrap()
    }

    /// Registers the migration with `disks`; returns its id and a file
    /// holding its ticket.
    async fn register(&self, disks: &[&str]) -> (String, PathBuf) {
        let req = IncomingRequest {
            vm_uuid: None,
            allow: Allow::Identity(SOURCE_DN.into()),
            forward: Forward::Qmp(QmpForward {
                qmp: format!("unix:{}", self.target_qmp.display()),
                capabilities: Default::default(),
                parameters: Default::default(),
            }),
            channels: 1,
            expires_in: 300,
            listeners: None,
            disks: disks
                .iter()
                .map(|d| DiskRequest {
                    node: Some((*d).to_string()),
                    export: None,
                })
                .collect(),
            nbd_forward: None,
        };
        let r = self.api().register(&req).await.unwrap();
        let file = self.dir.path().join(format!("ticket-{}", r.id));
        std::fs::write(&file, r.ticket.expose()).unwrap();
        (r.id, file)
    }

    /// A source gateway presenting `ticket`, with an NBD listener at
    /// [`Lab::nbd`] (the ticket's: one gateway per ticket).
    async fn source_gateway(&self, ticket: &Path) -> Gateway {
        let nbd = format!("unix:{}", self.nbd(ticket).display());
        let ticket = ticket.to_str().unwrap();
        let args = ["--ticket-file", ticket, "--listen-nbd", &nbd];
        source_gateway(&pki_dir(&self._pki), &self.daemon.gw.addr, &args).await
    }

    fn nbd(&self, ticket: &Path) -> PathBuf {
        let name = ticket.file_name().unwrap().to_str().unwrap();
        self.dir.path().join(format!("nbd-{name}.sock"))
    }

    /// The registration once `done` holds (the API, polled).
    async fn view_when(&self, id: &str, done: impl Fn(&MigrationView) -> bool) -> MigrationView {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.api().migration(id).await.unwrap();
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{v:?}\ndaemon log:\n{}",
                self.daemon.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The target QEMU's NBD exports, through the test's own QMP.
    async fn exports(&mut self) -> Vec<serde_json::Value> {
        let v = self
            .dst
            .cmd("query-block-exports", json!({}))
            .await
            .unwrap();
        v.as_array().cloned().unwrap_or_default()
    }
}

/// The whole sequence through the daemon: disk and RAM arrive intact, the
/// API shows the disk's bytes, and the daemon has stopped the target's
/// NBD server once the migration ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_disk_arrives_through_the_daemon() {
    let mut lab = Lab::new(64).await;
    let (id, ticket) = lab.register(&[NODE]).await;
    assert_eq!(lab.exports().await.len(), 1, "the daemon exported the disk");
    let sgw = lab.source_gateway(&ticket).await;
    let nbd = lab.nbd(&ticket);
    storage::start_mirror(&mut lab.src, &nbd, NODE)
        .await
        .unwrap();
    storage::wait_ready(&mut lab.src).await;
    storage::write_through_device(&mut lab.src, 0x6b, 3 << 20, 1 << 20).await;
    let v = lab.api().migration(&id).await.unwrap();
    assert_eq!(v.state, Phase::Active, "{v:?}");
    assert!(v.disks[0].open && v.disks[0].bytes_sent > 64 << 20, "{v:?}");
    let ram = lab.src.ram_sha256().await.unwrap();
    let uri = format!("tcp:{}", sgw.addr);
    migrate_and_expect_completed(&mut lab.src, &mut lab.dst, &uri).await;
    // The registration waits for its disk: the mirror is still running.
    let v = lab.api().migration(&id).await.unwrap();
    assert!(!v.state.is_final(), "ended before its disk: {v:?}");
    end_source_side(&mut lab.src).await;
    let v = lab.view_when(&id, |v| v.state.is_final()).await;
    assert_eq!(v.state, Phase::Completed, "{v:?}");
    assert_eq!(v.disks.len(), 1);
    assert_eq!(v.disks[0].export, NODE);
    assert!(!v.disks[0].open);
    assert_eq!(v.disks[0].channels_seen, 1);
    assert!(v.disks[0].bytes_recv > 0, "{v:?}");
    // Stopped by the daemon (the view is final before the QMP clean-up
    // is done: poll).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.exports().await.is_empty() {
        assert!(Instant::now() < deadline, "{}", lab.daemon.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    storage::flush(&mut lab.src).await;
    storage::flush(&mut lab.dst).await;
    assert_eq!(
        storage::image_sha256(&lab.dst_img),
        storage::image_sha256(&lab.src_img)
    );
    assert_eq!(lab.dst.ram_sha256().await.unwrap(), ram);
}

/// An export not registered for this migration, and an unknown ticket:
/// each NBD channel is refused (the source QEMU's `blockdev-add` fails),
/// the registration shows the refusal, the target disk stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_channels_outside_the_registration_are_refused() {
    let mut lab = Lab::new(16).await;
    let dst_before = storage::image_sha256(&lab.dst_img);
    let (id, ticket) = lab.register(&[NODE]).await;
    let sgw = lab.source_gateway(&ticket).await;
    let nbd = lab.nbd(&ticket);
    let err = storage::start_mirror(&mut lab.src, &nbd, "other-disk")
        .await
        .unwrap_err();
    assert!(err.contains("Denied by server"), "{err}");
    let v = lab.view_when(&id, |v| !v.refusals.is_empty()).await;
    assert!(
        v.refusals[0].contains("\"other-disk\" is not a disk registered"),
        "{v:?}"
    );
    assert_eq!(v.state, Phase::Registered, "not burnt: {v:?}");
    drop(sgw);

    let forged = lab.dir.path().join("forged-ticket");
    std::fs::write(&forged, "0".repeat(64)).unwrap();
    let _sgw = lab.source_gateway(&forged).await;
    let nbd = lab.nbd(&forged);
    let err = storage::start_mirror(&mut lab.src, &nbd, NODE)
        .await
        .unwrap_err();
    assert!(err.contains("Denied by server"), "{err}");
    let v = lab.api().migration(&id).await.unwrap();
    assert_eq!(v.disks[0].channels_seen, 0, "{v:?}");
    storage::flush(&mut lab.dst).await;
    assert_eq!(storage::image_sha256(&lab.dst_img), dst_before);
}

/// `DELETE` while the disk is being copied: the NBD channel is cut, the
/// source's mirror fails and the source keeps its disk, the daemon stops
/// the target's exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_the_disk_copy_cleans_up_both_ends() {
    let mut lab = Lab::new(64).await;
    let src_before = storage::image_sha256(&lab.src_img);
    let (id, ticket) = lab.register(&[NODE]).await;
    let _sgw = lab.source_gateway(&ticket).await;
    let nbd = lab.nbd(&ticket);
    start_mirror_slowly(&mut lab.src, &nbd, NODE, 4 << 20).await;
    // Copying (not ready at 4 MiB/s for 64 MiB) through an open channel.
    lab.view_when(&id, |v| {
        v.disks.first().is_some_and(|d| d.open && d.bytes_sent > 0)
    })
    .await;
    let v = lab.api().cancel(&id).await.unwrap();
    assert_eq!(v.state, Phase::Cancelled);
    // The mirror fails on its cut connection (or is gone).
    let last = wait_gone_or_failed(&mut lab.src).await;
    println!("source mirror after the cancel: {last:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.exports().await.is_empty() {
        assert!(Instant::now() < deadline, "{}", lab.daemon.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = lab.api().migration(&id).await.unwrap();
    assert!(!v.disks[0].open, "{v:?}");
    assert_eq!(lab.src.query_status().await.unwrap(), "prelaunch");
    storage::flush(&mut lab.src).await;
    assert_eq!(storage::image_sha256(&lab.src_img), src_before);
}

/// The source's end of a successful copy (libvirt's, after the RAM
/// migration): the ready mirror cancelled (it completes in sync), its NBD
/// node removed, which closes the NBD channel. The target's side is the
/// daemon's.
async fn end_source_side(src: &mut Qemu) {
    src.cmd("block-job-cancel", json!({ "device": storage::JOB }))
        .await
        .unwrap();
    storage::wait_gone(src).await;
    src.cmd("blockdev-del", json!({ "node-name": storage::NBD_NODE }))
        .await
        .unwrap();
}

/// [`storage::start_mirror`] at `speed` bytes/s, so that the copy lasts.
async fn start_mirror_slowly(src: &mut Qemu, socket: &Path, export: &str, speed: u64) {
    storage::start_mirror(src, socket, export).await.unwrap();
    src.cmd(
        "block-job-set-speed",
        json!({ "device": storage::JOB, "speed": speed }),
    )
    .await
    .unwrap();
}

/// Waits until the mirror job is gone or has concluded (failed); returns
/// what was seen last.
async fn wait_gone_or_failed(src: &mut Qemu) -> Option<serde_json::Value> {
    let deadline = Instant::now() + storage::JOB_TIMEOUT;
    let mut last = None;
    while let Some(j) = storage::job(src).await {
        if j["status"] == "concluded" {
            return Some(j);
        }
        assert!(Instant::now() < deadline, "mirror job never ended: {j}");
        last = Some(j);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}
