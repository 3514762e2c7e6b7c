//! Postcopy through the gateways, with and without the preempt channel, on
//! QEMU 7.2, 10.0 and 7.2 -> 10.0.
//!
//! Precopy is held back (`max-bandwidth`) so that the switch to postcopy
//! happens early, and the postcopy push too (`max-postcopy-bandwidth`), so
//! that reading the target's RAM during postcopy faults on pages that have
//! not arrived: the target requests them, and with preempt they come on
//! the preempt channel. The target gateway expects the VM's UUID: the
//! preempt channel, which carries none, is admitted by joining its main
//! channel.

mod common;

use common::cut_path::CutPath;
use common::postcopy::*;
use common::qemu::{Guest, QemuOpts};
use common::scenario::*;
use serde_json::{json, Value};

const VM_UUID: &str = "0b5e1c4d-7a2f-4c3e-9d8b-6f1a2e3d4c5b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_through_gateways() {
    postcopy_through_gateways_on(Versions::Q72, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_through_gateways_on_qemu10() {
    postcopy_through_gateways_on(Versions::Q10, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_through_gateways() {
    postcopy_through_gateways_on(Versions::Q72, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_through_gateways_on_qemu10() {
    postcopy_through_gateways_on(Versions::Q10, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_through_gateways_qemu72_to_qemu10() {
    postcopy_through_gateways_on(Versions::Q72ToQ10, true).await;
}

/// A paused guest's random RAM migrates through both gateways, switching
/// to postcopy (with the preempt channel if `preempt`): RAM read on the
/// target *during* postcopy and after it equals the source's, both QEMUs
/// complete, and every channel record says `completed`.
async fn postcopy_through_gateways_on(versions: Versions, preempt: bool) {
    let pki = pki();
    let pki = pki_dir(&pki);
    let uuid: uuid::Uuid = VM_UUID.parse().unwrap();
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x9c0 }, 128);
    opts.uuid = Some(uuid);
    let mut caps = vec![("validate-uuid", true), ("postcopy-ram", true)];
    if preempt {
        caps.push(("postcopy-preempt", true));
    }
    let (mut src, mut dst, port) = qemu_pair_with(&opts, versions, &caps, None).await;
    slow_postcopy(&mut src).await;
    let src_hash = src.ram_sha256().await.unwrap();
    let mut tgw = checking_target_gateway(&pki, port, uuid).await;
    let mut sgw = source_gateway(&pki, &tgw.addr, &[]).await;

    let run = migrate_through_postcopy(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(
        run.during, src_hash,
        "target RAM read during postcopy differs"
    );
    assert_eq!(dst.ram_sha256().await.unwrap(), src_hash);

    let channels = if preempt { 2 } else { 1 };
    let t = outcomes(&mut tgw, channels).await;
    let s = outcomes(&mut sgw, channels).await;
    for r in t.iter().chain(&s) {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    let main = record(&t, "main");
    assert_eq!(main["vm"], VM_UUID, "{main}");
    if preempt {
        // Urgent pages came this way: bytes beyond 7.2's 8-byte EOS marker.
        let p = record(&t, "postcopy-preempt");
        assert_eq!(p["peer.dn"], SOURCE_DN, "{p}");
        assert!(p["bytes_sent"].as_u64().unwrap() > 4096, "{p}");
        record(&s, "postcopy-preempt");
    }
    eprintln!(
        "FIGURE postcopy {versions:?} preempt={preempt}: {} pages requested",
        run.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_recovers_after_the_path_is_cut() {
    recovers_after_the_path_is_cut(Versions::Q72).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_recovers_after_the_path_is_cut_on_qemu10() {
    recovers_after_the_path_is_cut(Versions::Q10).await;
}

/// The path between the gateways is cut mid-postcopy: both QEMUs pause
/// (the VM exists only split across them), the target QEMU recovers on
/// its old address, the source resumes through the same gateways, and the
/// migration completes with the RAM intact. The resumed main channel
/// carries no UUID: the target gateway admits it by the cut main channel's
/// binding, and its preempt channel joins the new one.
async fn recovers_after_the_path_is_cut(versions: Versions) {
    let pki = pki();
    let pki = pki_dir(&pki);
    let uuid: uuid::Uuid = VM_UUID.parse().unwrap();
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x9c1 }, 128);
    opts.uuid = Some(uuid);
    let caps = [
        ("validate-uuid", true),
        ("postcopy-ram", true),
        ("postcopy-preempt", true),
    ];
    let (mut src, mut dst, port) = qemu_pair_with(&opts, versions, &caps, None).await;
    slow_postcopy(&mut src).await;
    let src_hash = src.ram_sha256().await.unwrap();
    let mut tgw = checking_target_gateway(&pki, port, uuid).await;
    let path = CutPath::to(&tgw.addr).await;
    let mut sgw = source_gateway(&pki, &path.addr, &[]).await;

    src.forget_old_events().await.unwrap();
    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    wait_migration_status(&mut src, "active").await;
    src.cmd("migrate-start-postcopy", json!({})).await.unwrap();
    wait_migration_status(&mut src, "postcopy-active").await;
    wait_migration_status(&mut dst, "postcopy-active").await;
    // Past the switch itself: the target pauses on a cut (rather than fail
    // for good: "loadvm failed") only once it has loaded the device state
    // and run the VM (POSTCOPY_INCOMING_RUNNING), which leaves `inmigrate`
    // (here for `paused`: the guest was not running), and pages flow.
    wait_target_runs_the_vm(&mut dst).await;
    wait_postcopy_bytes(&mut src, 4 << 20).await;
    assert_eq!(path.cut(), 2, "main and preempt channels were relayed");
    wait_migration_status(&mut src, "postcopy-paused").await;
    wait_migration_status(&mut dst, "postcopy-paused").await;

    let (recover, resume) = (format!("tcp:127.0.0.1:{port}"), format!("tcp:{}", sgw.addr));
    recover_and_complete(
        &mut src,
        &mut dst,
        &recover,
        &resume,
        &src_hash,
        String::new,
    )
    .await;

    // The cut channels failed; the resumed main channel and its preempt
    // channel completed, on both gateways.
    for gw in [&mut tgw, &mut sgw] {
        let records = outcomes(gw, 4).await;
        let resumed = record(&records, "main-resumed");
        assert_eq!(resumed["outcome"], "completed", "{resumed}");
        let cut = record(&records, "main");
        assert_eq!(cut["outcome"], "failed", "{cut}");
        let preempts: Vec<&Value> = records
            .iter()
            .filter(|r| r["channel"] == "postcopy-preempt")
            .collect();
        assert_eq!(preempts.len(), 2, "{records:?}");
        assert!(
            preempts.iter().any(|r| r["outcome"] == "completed"),
            "{records:?}"
        );
    }
}
