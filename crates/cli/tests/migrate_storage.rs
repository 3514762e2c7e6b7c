//! `miggate migrate --copy-storage`: a running guest's disk is mirrored
//! through the gateway into the target QEMU the daemon exported, while
//! writes keep coming; the copies complete at the switch-over; the guest
//! runs on the target with a disk equal to the source's.

mod common;

use std::path::PathBuf;

use common::gateway::BIN;
use common::managed_run::{messages, run_migrate, s};
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use common::scenario::{pki, pki_dir};
use common::storage::{self, NODE};
use serde_json::json;
use tokio::process::Command;
use tokio::sync::watch;

const RAM_MIB: u32 = 64;
/// Big enough that the copy lasts while the test writes.
const DISK_MIB: usize = 256;

struct Setup {
    src: Qemu,
    dst: Qemu,
    sq: PathBuf,
    tq: PathBuf,
    src_img: PathBuf,
    dst_img: PathBuf,
    daemon: miggate_lab::Daemon,
    pki: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn setup() -> Setup {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tempfile::Builder::new()
        .prefix("miggate-migrate-storage-")
        .tempdir()
        .unwrap();
    let src_img = storage::random_disk(dir.path(), "src.img", DISK_MIB, 0x5109);
    let dst_img = storage::empty_disk(dir.path(), "dst.img", DISK_MIB);
    let mut opts = QemuOpts::new(Guest::RunningCounter, RAM_MIB);
    opts.uuid = Some(uuid::Uuid::new_v4());
    let (sq, tq) = (dir.path().join("source.qmp"), dir.path().join("target.qmp"));
    let (mut src, dst) = Qemu::pair(
        storage::with_disk(opts.clone(), &src_img).with_qmp(&sq),
        storage::with_disk(opts.as_incoming(), &dst_img).with_qmp(&tq),
    )
    .await
    .unwrap();
    src.assert_running_and_counting().await;
    let daemon = common::daemon::start(dir.path(), &pki).await;
    Setup {
        src,
        dst,
        sq,
        tq,
        src_img,
        dst_img,
        daemon,
        pki,
        _dirs: (dir, pki_t),
    }
}

impl Setup {
    fn migrate(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(["migrate", "--json", "--source-qmp"])
            .arg(format!("unix:{}", s(&self.sq)))
            .args([
                "--target",
                &self.daemon.target(),
                "--x509-dir",
                s(&self.pki),
            ])
            .arg("--target-qmp")
            .arg(format!("unix:{}", s(&self.tq)))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    }
}

/// Writes through the source's disk device while its mirror copies the
/// disk (from the command's "mirroring" step to its "disks copied" one:
/// never near the switch-over, after which the source's disk is handed
/// over and must not be written); returns how many.
async fn write_while_copying(src: &mut Qemu, phase: &mut watch::Receiver<u8>) -> u32 {
    let _ = phase.wait_for(|p| *p >= 1).await;
    let mut n = 0u32;
    while *phase.borrow() == 1 {
        // 64 KiB at one of 200 offsets in turn, pattern = its number.
        let offset = u64::from(n % 200) * (1 << 20) + (5 << 20);
        storage::write_through_device(src, (n % 250 + 1) as u8, offset, 65536).await;
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_storage_moves_a_running_guests_disk_with_its_writes() {
    let mut st = setup().await;
    let cmd = st.migrate(&["--copy-storage"]);
    let (tx, mut rx) = watch::channel(0u8);
    let on_line = move |l: &serde_json::Value, _: &[serde_json::Value], _| {
        let m = l["message"].as_str().unwrap_or_default();
        if m.starts_with("mirroring") {
            tx.send_replace(1);
        } else if m.starts_with("disks copied") || l["type"] == "result" {
            tx.send_replace(2);
        }
    };
    let (run, writes) = tokio::join!(
        run_migrate(cmd, on_line),
        write_while_copying(&mut st.src, &mut rx)
    );
    let (lines, code) = run;
    assert_eq!(code, Some(0), "{lines:#?}");
    assert!(writes > 0, "no write landed during the migration");
    let steps = messages(&lines, "step");
    assert!(
        steps.iter().any(|s| s.starts_with("disks copied")),
        "{steps:#?}"
    );
    assert!(
        steps.iter().any(|s| s.contains("final synchronisation")),
        "{steps:#?}"
    );
    st.dst.assert_running_and_counting().await;
    storage::flush(&mut st.dst).await;
    let (a, b) = (
        storage::image_sha256(&st.src_img),
        storage::image_sha256(&st.dst_img),
    );
    assert_eq!(
        a, b,
        "the target's disk is not the source's ({writes} writes)"
    );
    // The last write is there (pattern = its number).
    let last = writes - 1;
    let img = std::fs::read(&st.dst_img).unwrap();
    let at = (u64::from(last % 200) * (1 << 20) + (5 << 20)) as usize;
    assert!(img[at..at + 65536]
        .iter()
        .all(|&b| b == (last % 250 + 1) as u8));
    println!("{writes} writes during the copy, all on the target");
    // The daemon stopped the target's exports.
    let v = st.dst.cmd("query-block-exports", json!({})).await.unwrap();
    assert_eq!(v, json!([]), "exports left on the target");
    let _ = NODE;
}

/// `--disk` naming a node the source does not have: refused before
/// anything is registered, in one sentence, the VM keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_disk_is_refused_before_anything_starts() {
    let st = setup().await;
    let cmd = st.migrate(&["--disk", "nosuchdisk"]);
    let (lines, code) = run_migrate(cmd, |_, _, _| {}).await;
    assert_eq!(code, Some(1), "{lines:#?}");
    let result = lines.last().unwrap();
    let sentence = result["error"].as_str().unwrap_or_default();
    assert!(
        sentence.contains("--disk nosuchdisk") && sentence.contains(NODE),
        "{result}"
    );
    let list = st.daemon.client().unwrap().migrations().await.unwrap();
    assert!(list.is_empty(), "registered anyway: {list:?}");
}
