//! Soak (issue 11, item 3), short version: back-to-back migrations of one
//! running guest, each into a fresh target QEMU (ping-pong), through a
//! long-lived standalone gateway pair and through a long-lived daemon
//! with a one-shot ticket each (`miggate migrate`). Every migration must
//! complete with the guest counting on in the target and the right UUID;
//! the miggate processes' RSS and open descriptors are printed after each
//! one and must stay flat from the 4th on (RSS growth under 2 MiB,
//! descriptors within ±2: see `common::soak`).
//!
//! `MIGGATE_SOAK_COUNT=N` sets the number of migrations per path (the
//! checked range then starts at the 10th when N ≥ 20);
//! `scripts/soak.sh` runs the full 100 and prints the table.

mod common;

use common::soak::{count_from_env, run, Via};

/// Enough for the short version to show a per-migration leak of a relay
/// buffer (256 KiB) within the checked range; ~1 s per migration here.
const DEFAULT_COUNT: usize = 15;

/// The first migration whose figures count: the first ones warm the
/// allocator and the TLS session caches up.
fn check_from(count: usize) -> usize {
    if count >= 20 {
        10
    } else {
        4.min(count)
    }
}

async fn soak(via: Via) {
    common::qemu::qemu_binary().unwrap();
    let count = count_from_env(DEFAULT_COUNT);
    let report = run(via, count).await;
    report.assert_flat_from(check_from(count));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_through_gateway_pair_stays_flat() {
    soak(Via::Gateways).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_through_daemon_with_tickets_stays_flat() {
    soak(Via::Daemon).await;
}
