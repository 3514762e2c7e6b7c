//! Real QEMU migrations through a source and a target gateway.

mod common;

use common::qemu::{Guest, QemuExt, QemuOpts};
use common::scenario::*;
use serde_json::json;
use std::time::Duration;

/// Test 1: a paused guest with known random RAM; both ends complete and the
/// destination's RAM equals the source's. Also migrates an identical pair
/// directly, and prints both times (the figure for the notes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_ram_arrives_intact() {
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x5eed }, 128);

    let (mut src, mut dst, port) = qemu_pair(&opts).await;
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:127.0.0.1:{port}")).await;
    let direct = src.migration_duration().expect("direct migration duration");
    drop((src, dst));

    let gated = paused_guest_through_gateways(&opts, Versions::Q72).await;
    eprintln!("FIGURE test1 128 MiB paused guest: direct {direct:?}, through gateways {gated:?}");
}

/// Test 1's migration through both gateways on `versions`: RAM arrives
/// bit-identical, the DN is checked, both gateways record `completed`.
/// Returns the migration's duration.
async fn paused_guest_through_gateways(opts: &QemuOpts, versions: Versions) -> Duration {
    let pki = pki();
    let pki = pki_dir(&pki);
    let (mut src, mut dst, port) = qemu_pair_with(opts, versions, &[], None).await;
    let mut tgw = target_gateway(&pki, port, &["--authz-identity", SOURCE_DN]).await;
    let mut sgw = source_gateway(&pki, &tgw.addr, &[]).await;
    let src_hash = src.ram_sha256().await.unwrap();
    assert_ne!(
        src_hash,
        common::qemu::zero_sha256(src.ram_bytes()),
        "the source guest's RAM should hold random bytes"
    );
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    let gated = src.migration_duration().expect("gated migration duration");
    assert_eq!(
        dst.ram_sha256().await.unwrap(),
        src_hash,
        "destination RAM differs from source RAM"
    );

    let t = outcomes(&mut tgw, 1).await.remove(0);
    assert_eq!(t["outcome"], "completed", "{t}");
    assert_eq!(t["peer.dn"], SOURCE_DN);
    assert_eq!(t["channel"], "main");
    assert!(t["bytes_sent"].as_u64().unwrap() > 128 << 20, "{t}");
    let s = outcomes(&mut sgw, 1).await.remove(0);
    assert_eq!(s["outcome"], "completed", "{s}");
    gated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_ram_arrives_intact_on_qemu10() {
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x5eed }, 128);
    paused_guest_through_gateways(&opts, Versions::Q10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_ram_arrives_intact_qemu72_to_qemu10() {
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x5eed }, 128);
    paused_guest_through_gateways(&opts, Versions::Q72ToQ10).await;
}

/// Test 2: a running guest migrates live and keeps running on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_keeps_running_after_migration() {
    running_guest_through_gateways(Versions::Q72).await;
}

/// The upgrade case: a running guest leaves QEMU 7.2 for QEMU 10.0
/// (machine type pc-i440fx-7.2) and keeps counting there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_guest_keeps_running_qemu72_to_qemu10() {
    running_guest_through_gateways(Versions::Q72ToQ10).await;
}

async fn running_guest_through_gateways(versions: Versions) {
    let pki = pki();
    let pki = pki_dir(&pki);
    let opts = QemuOpts::new(Guest::RunningCounter, 64);
    let (mut src, mut dst, port) = qemu_pair_with(&opts, versions, &[], None).await;
    src.assert_running_and_counting().await;
    let mut tgw = target_gateway(&pki, port, &["--allow-any-verified-peer"]).await;
    let sgw = source_gateway(&pki, &tgw.addr, &[]).await;
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    dst.wait_status("running", EVENT_TIMEOUT).await.unwrap();
    dst.assert_running_and_counting().await;
    let t = outcomes(&mut tgw, 1).await.remove(0);
    assert_eq!(t["outcome"], "completed", "{t}");
}

/// Test 3: multifd with 4 channels through the gateways, with the VM UUID
/// checked on every channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_four_channels_with_uuid_check() {
    multifd_four_channels(Versions::Q72).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_four_channels_with_uuid_check_on_qemu10() {
    multifd_four_channels(Versions::Q10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_four_channels_with_uuid_check_qemu72_to_qemu10() {
    multifd_four_channels(Versions::Q72ToQ10).await;
}

async fn multifd_four_channels(versions: Versions) {
    let pki = pki();
    let pki = pki_dir(&pki);
    let uuid = uuid::Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0003);
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 3 }, 128);
    opts.uuid = Some(uuid);
    let caps = [("multifd", true), ("validate-uuid", true)];
    let (mut src, mut dst, port) = qemu_pair_with(&opts, versions, &caps, Some(4)).await;
    let uuid_s = uuid.to_string();
    let mut tgw = checking_target_gateway(&pki, port, uuid).await;
    let sgw = source_gateway(&pki, &tgw.addr, &[]).await;
    let src_hash = src.ram_sha256().await.unwrap();
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(dst.ram_sha256().await.unwrap(), src_hash);

    let records = outcomes(&mut tgw, 5).await;
    let mut channels: Vec<String> = records
        .iter()
        .map(|r| {
            assert_eq!(r["outcome"], "completed", "{r}");
            assert_eq!(r["vm"], uuid_s.as_str(), "{r}");
            r["channel"].as_str().unwrap().to_string()
        })
        .collect();
    channels.sort();
    assert_eq!(
        channels,
        ["main", "multifd/0", "multifd/1", "multifd/2", "multifd/3"]
    );
}

/// TLS 1.3 key updates mid-stream: the source gateway rekeys every MiB
/// (`--rekey-after-mib 1`, each update also asking the target gateway to
/// rekey), at most every 250 ms; the migration is slowed to 32 MiB/s so
/// that it lasts ~2 s and carries several updates. The random RAM still
/// arrives bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_every_mib_keep_the_stream_intact() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0x4e4b }, 64);
    let (mut src, mut dst, port) = qemu_pair(&opts).await;
    src.set_parameters(json!({ "max-bandwidth": 32u64 << 20 }))
        .await
        .unwrap();
    let mut tgw = target_gateway(&pki, port, &["--authz-identity", SOURCE_DN]).await;
    let mut sgw = source_gateway(&pki, &tgw.addr, &["--rekey-after-mib", "1"]).await;
    let src_hash = src.ram_sha256().await.unwrap();
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(
        dst.ram_sha256().await.unwrap(),
        src_hash,
        "RAM differs after key updates"
    );
    let s = outcomes(&mut sgw, 1).await.remove(0);
    assert_eq!(s["outcome"], "completed", "{s}");
    // ~2 s of stream, one key update per 250 ms at most.
    let updates = s["key_updates"].as_u64().unwrap_or(0);
    assert!(
        updates >= 4,
        "expected ~8 key updates, the source sent {updates}: {s}"
    );
    let t = outcomes(&mut tgw, 1).await.remove(0);
    assert_eq!(t["outcome"], "completed", "{t}");
}
