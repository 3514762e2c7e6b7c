//! One sentence for a failed migration, from whichever end knows why.
//!
//! A refused migration leaves traces in several places, most of them
//! consequences: the target gateway refuses the main channel (the cause),
//! the source gateway then closes QEMU's connection, and QEMU reports
//! "Unable to write to socket" (a consequence). The evidence is ranked so
//! that the sentence names the decision, not its echo:
//!
//! 1. a refusal the target sent back in its verdict (source gateway record),
//!    in the daemon's words when it logged one against this migration's
//!    ticket (the verdict says only which check failed);
//! 2. the target daemon's reason for failing the migration (or one of its
//!    channels), else the last refusal it logged against this migration's
//!    ticket;
//! 3. a source gateway connection that failed on its own (TLS handshake,
//!    unreachable target, stall);
//! 4. the target QEMU's `error-desc` (native TLS mode);
//! 5. the source QEMU's `error-desc`.

use crate::control::types::MigrationView;
use crate::outcome::{Ending, Record};

/// Everything known about a failed migration.
#[derive(Debug, Default)]
pub struct Evidence<'a> {
    /// Records of the in-process source gateway, in the order they ended.
    pub gateway: &'a [Record],
    /// The target daemon's view of the registered migration.
    pub daemon: Option<&'a MigrationView>,
    pub target_qemu: Option<&'a str>,
    pub source_qemu: Option<&'a str>,
}

/// The cause, prefixed with the end that reported it.
pub fn cause(ev: &Evidence<'_>) -> String {
    let first = |ending: &[Ending]| {
        ev.gateway
            .iter()
            .find(|r| ending.contains(&r.ending) && r.reason.is_some())
            .and_then(|r| r.reason.as_deref())
    };
    if let Some(reason) = first(&[Ending::Refused]) {
        // The verdict only says which check failed (a refused peer learns
        // no more); the daemon, which this operator may ask, knows why.
        if let Some(detail) = ev.daemon.and_then(|v| v.refusals.last()) {
            return format!("target daemon refused the connection: {}", clean(detail));
        }
        return format!("source gateway: {}", clean(reason));
    }
    if let Some(view) = ev.daemon {
        // A reason may come before the state is final: the first channel
        // to fail names it while the others are still being cut.
        if let Some(reason) = view.reason.as_deref() {
            return format!("target daemon: {}", clean(reason));
        }
        if let Some(refusal) = view.refusals.last() {
            return format!("target daemon refused a connection: {}", clean(refusal));
        }
    }
    if let Some(reason) = first(&[Ending::Failed, Ending::Dropped]) {
        return format!("source gateway: {}", clean(reason));
    }
    if let Some(desc) = ev.target_qemu.filter(|d| !d.trim().is_empty()) {
        return format!("target QEMU: {}", clean(desc));
    }
    if let Some(desc) = ev.source_qemu.filter(|d| !d.trim().is_empty()) {
        return format!("source QEMU: {}", clean(desc));
    }
    "QEMU reported the migration failed without a reason".into()
}

/// What became of the source VM, as the end of the sentence.
/// `before` is its state when the command started; `now` is `query-status`
/// now, or why it could not be asked.
pub fn source_vm(before: &str, now: Result<&str, &str>) -> String {
    match now {
        Ok("running") => "the VM is still running on the source".into(),
        Ok(now) if now == before => format!("the VM is still on the source, {now} as before"),
        Ok(now) => format!("the VM on the source is now {now} (it was {before}): check it"),
        Err(why) => format!(
            "the state of the VM on the source is unknown ({})",
            clean(why)
        ),
    }
}

/// Where the VM is when a migration that switched to postcopy stops
/// short of completing: it runs on the target (or did), and the pages it
/// has not fetched yet exist only on the source. Neither "the VM is still
/// running on the source" nor "lost" is true. `status` is the source
/// QEMU's migration status, when it answered.
pub fn postcopy_vm(status: Option<&str>, recover_with: Option<&str>) -> String {
    const KEEP: &str = "keep both QEMUs running";
    let how = recover_with.map_or_else(
        || "(migrate-recover on the target, then migrate with resume on the source)".to_string(),
        |cmd| format!("with: {cmd}"),
    );
    match status {
        Some("postcopy-paused") => format!(
            "the source QEMU is postcopy-paused: the guest runs on the target and the pages \
             it has not fetched yet are only on the source, so it is split over the two hosts \
             but not lost: {KEEP}, the migration can be recovered {how}"
        ),
        Some(s) => format!(
            "the guest had moved to the target in postcopy and the source QEMU is now {s}: \
             the source cannot take it back, and pages the target has not fetched may exist \
             only on the source: {KEEP} and check the target"
        ),
        None => format!(
            "the guest had moved to the target in postcopy; the source QEMU did not say where \
             the migration stands: {KEEP} and check both"
        ),
    }
}

/// "LEAD: CAUSE; VM." as one line.
pub fn sentence(lead: &str, cause: &str, vm: &str) -> String {
    format!("{lead}: {}; {vm}.", clean(cause))
}

/// One line, without a trailing full stop: QEMU's descriptions and stderr
/// excerpts may span lines.
fn clean(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::Phase;
    use std::time::Duration;

    fn record(ending: Ending, reason: &str) -> Record {
        Record {
            role: "source",
            peer_addr: "127.0.0.1:1".into(),
            peer_dn: None,
            channel: Some("main".into()),
            vm: None,
            migration: None,
            bytes_sent: 0,
            bytes_recv: 0,
            key_updates: 0,
            tls_end: None,
            duration: Duration::ZERO,
            admission: None,
            ending,
            reason: Some(reason.into()),
        }
    }

    fn view(state: Phase, reason: Option<&str>, refusals: &[&str]) -> MigrationView {
        MigrationView {
            id: "m1".into(),
            state,
            vm_uuid: None,
            allow: "identity".into(),
            forward: "tcp:127.0.0.1:1".into(),
            peer_dn: None,
            channels_expected: 1,
            channels_seen: 0,
            channels_open: 0,
            bytes_sent: 0,
            bytes_recv: 0,
            rate_bytes_per_sec: 0,
            registered_at: String::new(),
            expires_at: String::new(),
            started_at: None,
            ended_at: None,
            reason: reason.map(Into::into),
            refusals: refusals.iter().map(|s| s.to_string()).collect(),
            recover_by: None,
            recoveries: 0,
            disks: Vec::new(),
        }
    }

    #[test]
    fn the_verdict_beats_its_echoes() {
        let gw = [
            record(
                Ending::Failed,
                "target gateway closed the connection without a verdict",
            ),
            record(Ending::Refused, "target refused: wrong VM"),
        ];
        let v = view(Phase::Failed, Some("main channel refused"), &[]);
        let ev = Evidence {
            gateway: &gw,
            daemon: Some(&v),
            source_qemu: Some("Unable to write to socket: Connection reset by peer"),
            ..Default::default()
        };
        assert_eq!(cause(&ev), "source gateway: target refused: wrong VM");
        // The daemon's record of the same refusal says why in full.
        let v = view(
            Phase::Failed,
            Some("ticket refused"),
            &["VM UUID mismatch: expected a, stream carries b"],
        );
        let ev = Evidence {
            gateway: &gw,
            daemon: Some(&v),
            ..Default::default()
        };
        assert_eq!(
            cause(&ev),
            "target daemon refused the connection: VM UUID mismatch: expected a, stream carries b"
        );
    }

    #[test]
    fn daemon_reason_then_refusals_then_gateway_failures() {
        let gw = [record(
            Ending::Failed,
            "relay: target->source: connection reset",
        )];
        let v = view(
            Phase::Failed,
            Some("target QEMU failed to load the stream."),
            &[],
        );
        let ev = Evidence {
            gateway: &gw,
            daemon: Some(&v),
            ..Default::default()
        };
        assert_eq!(
            cause(&ev),
            "target daemon: target QEMU failed to load the stream"
        );

        let v = view(Phase::Registered, None, &["ticket replayed", "DN denied"]);
        let ev = Evidence {
            gateway: &gw,
            daemon: Some(&v),
            ..Default::default()
        };
        assert_eq!(cause(&ev), "target daemon refused a connection: DN denied");

        let v = view(Phase::Active, None, &[]);
        let ev = Evidence {
            gateway: &gw,
            daemon: Some(&v),
            source_qemu: Some("x"),
            ..Default::default()
        };
        assert_eq!(
            cause(&ev),
            "source gateway: relay: target->source: connection reset"
        );
    }

    #[test]
    fn qemu_when_nobody_else_knows() {
        let ev = Evidence {
            target_qemu: Some("  "),
            source_qemu: Some("Unable to write to socket:\nBroken pipe."),
            ..Default::default()
        };
        assert_eq!(
            cause(&ev),
            "source QEMU: Unable to write to socket: Broken pipe"
        );
        let ev = Evidence {
            target_qemu: Some("TLS handshake failed"),
            source_qemu: Some("Broken pipe"),
            ..Default::default()
        };
        assert_eq!(cause(&ev), "target QEMU: TLS handshake failed");
        assert!(cause(&Evidence::default()).contains("without a reason"));
    }

    #[test]
    fn postcopy_never_says_the_vm_is_on_the_source() {
        let paused = postcopy_vm(Some("postcopy-paused"), None);
        let s = sentence(
            "migration paused in postcopy",
            "target daemon: cut",
            &paused,
        );
        assert!(
            s.starts_with("migration paused in postcopy: target daemon: cut; the source QEMU is postcopy-paused: "),
            "{s}"
        );
        assert!(s.contains("split over the two hosts but not lost"), "{s}");
        assert!(s.contains("can be recovered"), "{s}");
        assert!(s.ends_with(")."), "{s}");
        // Through a daemon: the exact command.
        let v = postcopy_vm(
            Some("postcopy-paused"),
            Some("miggate migrate --recover m1"),
        );
        assert!(
            v.ends_with("can be recovered with: miggate migrate --recover m1"),
            "{v}"
        );
        for other in [Some("failed"), None] {
            let v = postcopy_vm(other, None);
            assert!(v.contains("keep both QEMUs running"), "{v}");
            assert!(!v.contains("still running on the source"), "{v}");
        }
    }

    #[test]
    fn one_sentence_ending_with_the_vm() {
        let vm = source_vm("running", Ok("running"));
        assert_eq!(
            sentence("migration failed", "source QEMU: Broken pipe.", &vm),
            "migration failed: source QEMU: Broken pipe; the VM is still running on the source."
        );
        assert_eq!(
            source_vm("paused", Ok("paused")),
            "the VM is still on the source, paused as before"
        );
        assert!(source_vm("running", Ok("paused")).contains("now paused (it was running)"));
        assert!(source_vm("running", Err("QMP connection closed")).contains("unknown"));
    }
}
