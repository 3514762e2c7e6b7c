//! A switch to postcopy and what to read of it, shared by the postcopy
//! scenarios (through two gateways, and with QEMU's own TLS on one side).

use serde_json::{json, Value};

use super::qemu::Qemu;
use super::scenario::{EVENT_TIMEOUT, MIGRATION_TIMEOUT};

/// Holds precopy back so that the switch to postcopy happens early, and
/// the postcopy push too, so that reading the target's RAM during postcopy
/// faults on pages that have not arrived (the target requests them).
pub async fn slow_postcopy(src: &mut Qemu) {
    src.set_parameters(json!({
        "max-bandwidth": 32u64 << 20,
        "max-postcopy-bandwidth": 16u64 << 20,
    }))
    .await
    .unwrap();
}

/// What [`migrate_through_postcopy`] saw.
pub struct PostcopyRun {
    /// The target's RAM hash, read while it was in postcopy.
    pub during: String,
    /// Pages the target requested from the source (`postcopy-requests`).
    pub requests: u64,
}

/// Migrates `src` to `uri`, switches to postcopy as soon as the migration
/// is active, reads the target's RAM during postcopy, and asserts that
/// both QEMUs complete.
pub async fn migrate_through_postcopy(src: &mut Qemu, dst: &mut Qemu, uri: &str) -> PostcopyRun {
    src.forget_old_events().await.unwrap();
    src.migrate(uri).await.unwrap();
    wait_migration_status(src, "active").await;
    src.cmd("migrate-start-postcopy", json!({})).await.unwrap();
    wait_migration_status(src, "postcopy-active").await;
    // The target reads its RAM through userfaultfd only once it listens.
    wait_migration_status(dst, "postcopy-active").await;
    // Faults on every page not pushed yet: each is requested from the source.
    let during = dst.ram_sha256().await.unwrap();

    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(
        (s.status.as_deref(), d.status.as_deref()),
        (Some("completed"), Some("completed")),
        "source: {:?}\ntarget: {:?}\nsource stderr:\n{}\ntarget stderr:\n{}",
        s.raw,
        d.error_desc,
        src.stderr_text(),
        dst.stderr_text()
    );
    let requests = s.raw["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
    assert!(requests > 0, "the target requested no page: {}", s.raw);
    PostcopyRun { during, requests }
}

/// Polls the target until its VM has left `inmigrate` (QEMU has no event
/// for a guest that stays paused): it then runs postcopy as
/// `POSTCOPY_INCOMING_RUNNING`, the only state in which a cut pauses it
/// rather than failing it for good.
pub async fn wait_target_runs_the_vm(dst: &mut Qemu) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let status = dst.query_status().await.unwrap();
        if status != "inmigrate" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the target VM is still {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Polls the source until it has sent `n` bytes of RAM in postcopy (QEMU
/// has no event for it).
pub async fn wait_postcopy_bytes(src: &mut Qemu, n: u64) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let info = src.query_migrate().await.unwrap();
        let sent = info.raw["ram"]["postcopy-bytes"].as_u64().unwrap_or(0);
        if sent >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {sent} bytes sent in postcopy: {}",
            info.raw
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The outcome record of `channel` among `records`.
pub fn record<'a>(records: &'a [Value], channel: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["channel"] == channel)
        .unwrap_or_else(|| panic!("no {channel} record in {records:?}"))
}

/// Waits for the MIGRATION event with `status` (the source emits one per
/// state change); a terminal state first is a failure.
pub async fn wait_migration_status(q: &mut Qemu, status: &str) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, q.qmp.next_event())
            .await
            .unwrap_or_else(|_| panic!("no MIGRATION {status} event\n{}", q.stderr_text()))
            .unwrap();
        if ev.name != "MIGRATION" {
            continue;
        }
        let now = ev.data["status"].as_str().unwrap_or_default().to_string();
        if now == status {
            return;
        }
        assert!(
            !matches!(now.as_str(), "completed" | "failed" | "cancelled"),
            "migration ended ({now}) before {status}\n{}",
            q.stderr_text()
        );
    }
}

/// The operator's recovery after a cut mid-postcopy: the target QEMU
/// listens again on `recover_uri`, the source resumes to `resume_uri`, and
/// both ends must complete with the target's RAM hashing to `src_hash`.
/// `logs` adds what explains a failure (a gateway's log).
pub async fn recover_and_complete(
    src: &mut Qemu,
    dst: &mut Qemu,
    recover_uri: &str,
    resume_uri: &str,
    src_hash: &str,
    logs: impl Fn() -> String,
) {
    dst.cmd("migrate-recover", json!({ "uri": recover_uri }))
        .await
        .unwrap();
    src.cmd("migrate", json!({ "uri": resume_uri, "resume": true }))
        .await
        .unwrap();
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(
        (s.status.as_deref(), d.status.as_deref()),
        (Some("completed"), Some("completed")),
        "source: {:?}\ntarget: {:?}\nsource stderr:\n{}\ntarget stderr:\n{}\n{}",
        s.raw,
        d.error_desc,
        src.stderr_text(),
        dst.stderr_text(),
        logs()
    );
    assert_eq!(dst.ram_sha256().await.unwrap(), src_hash);
}
