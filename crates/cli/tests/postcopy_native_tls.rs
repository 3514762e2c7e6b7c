//! Postcopy (and its preempt channel) with QEMU's own TLS on one side, both
//! directions, on QEMU 7.2 and 10.0:
//! - a miggate source gateway into a target QEMU with native TLS and
//!   `tls-authz`: the source gateway connects the preempt channel once the
//!   main channel's handshake completed (`JoinBy::Native`);
//! - a source QEMU with native TLS into a miggate target gateway (DN and VM
//!   UUID checked): its preempt channel sends no hello and no header, and
//!   joins the postcopy main channel of the same DN (`gate::native_join`).
//!
//! As in `postcopy.rs`, precopy and the postcopy push are slowed, so that
//! reading the target's RAM during postcopy faults and requests pages.

mod common;

use common::native::{native_tls_source, native_tls_target, NativeOpts};
use common::postcopy::*;
use common::scenario::*;
use serde_json::Value;

const VM_UUID: &str = "5f0c2a9e-3b1d-4e8f-a6c7-2d9e1b0a7c43";

fn caps(preempt: bool) -> Vec<(&'static str, bool)> {
    let mut caps = vec![("validate-uuid", true), ("postcopy-ram", true)];
    if preempt {
        caps.push(("postcopy-preempt", true));
    }
    caps
}

/// Every record `completed`, the channels those expected; with preempt,
/// the requested pages went through the preempt channel.
fn check_records(records: &[Value], preempt: bool) {
    for r in records {
        assert_eq!(r["outcome"], "completed", "{r}");
    }
    let mut seen: Vec<&str> = records
        .iter()
        .map(|r| r["channel"].as_str().unwrap_or("-"))
        .collect();
    seen.sort();
    let expected: &[&str] = if preempt {
        &["main", "postcopy-preempt"]
    } else {
        &["main"]
    };
    assert_eq!(seen, expected, "{records:?}");
    if preempt {
        // Urgent pages came this way: bytes beyond 7.2's 8-byte EOS marker.
        let p = record(records, "postcopy-preempt");
        assert!(p["bytes_sent"].as_u64().unwrap() > 4096, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_miggate_source_to_qemu_native_tls_target() {
    miggate_source_into_native_target(Versions::Q72, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_miggate_source_to_qemu_native_tls_target_on_qemu10() {
    miggate_source_into_native_target(Versions::Q10, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_miggate_source_to_qemu_native_tls_target() {
    miggate_source_into_native_target(Versions::Q72, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_miggate_source_to_qemu_native_tls_target_on_qemu10() {
    miggate_source_into_native_target(Versions::Q10, true).await;
}

/// Plain source QEMU -> miggate source gateway -> target QEMU with native
/// TLS and tls-authz on the gateway's DN, switching to postcopy: RAM read
/// on the target during postcopy and after it equals the source's.
async fn miggate_source_into_native_target(versions: Versions, preempt: bool) {
    let pki = pki();
    let pki = pki_dir(&pki);
    let caps = caps(preempt);
    let opts = NativeOpts {
        caps: &caps,
        uuid: Some(VM_UUID.parse().unwrap()),
        ..NativeOpts::new(versions)
    };
    let (mut src, mut dst, tls_port) = native_tls_target(&pki, SOURCE_DN, None, opts).await;
    slow_postcopy(&mut src).await;
    let hash = src.ram_sha256().await.unwrap();
    let mut sgw = source_gateway(&pki, &format!("127.0.0.1:{tls_port}"), &[]).await;

    let run = migrate_through_postcopy(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(run.during, hash, "target RAM read during postcopy differs");
    assert_eq!(dst.ram_sha256().await.unwrap(), hash);

    let records = outcomes(&mut sgw, if preempt { 2 } else { 1 }).await;
    check_records(&records, preempt);
    eprintln!(
        "FIGURE postcopy miggate -> native {versions:?} preempt={preempt}: {} pages requested",
        run.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_qemu_native_tls_source_to_miggate_target() {
    native_source_into_miggate_target(Versions::Q72, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_qemu_native_tls_source_to_miggate_target_on_qemu10() {
    native_source_into_miggate_target(Versions::Q10, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_qemu_native_tls_source_to_miggate_target() {
    native_source_into_miggate_target(Versions::Q72, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_qemu_native_tls_source_to_miggate_target_on_qemu10() {
    native_source_into_miggate_target(Versions::Q10, true).await;
}

/// Source QEMU with native TLS -> miggate target gateway (authz on the DN,
/// the VM's UUID expected) -> plain target QEMU, switching to postcopy:
/// the preempt channel, which carries no header, is admitted as the
/// postcopy main channel's of the same DN; RAM read during postcopy and
/// after it equals the source's.
async fn native_source_into_miggate_target(versions: Versions, preempt: bool) {
    let pki = pki();
    let pki = pki_dir(&pki);
    let caps = caps(preempt);
    let uuid: uuid::Uuid = VM_UUID.parse().unwrap();
    let opts = NativeOpts {
        caps: &caps,
        uuid: Some(uuid),
        ..NativeOpts::new(versions)
    };
    let (mut src, mut dst, port) = native_tls_source(&pki, opts).await;
    slow_postcopy(&mut src).await;
    let hash = src.ram_sha256().await.unwrap();
    let mut tgw = checking_target_gateway(&pki, port, uuid).await;

    let run = migrate_through_postcopy(&mut src, &mut dst, &format!("tcp:{}", tgw.addr)).await;
    assert_eq!(run.during, hash, "target RAM read during postcopy differs");
    assert_eq!(dst.ram_sha256().await.unwrap(), hash);

    let records = outcomes(&mut tgw, if preempt { 2 } else { 1 }).await;
    check_records(&records, preempt);
    for r in &records {
        // QEMU's GnuTLS presented the DN miggate authorized, on both.
        assert_eq!(r["peer.dn"], SOURCE_DN, "{r}");
    }
    assert_eq!(record(&records, "main")["vm"], VM_UUID, "{records:?}");
    eprintln!(
        "FIGURE postcopy native -> miggate {versions:?} preempt={preempt}: {} pages requested",
        run.requests
    );
}
