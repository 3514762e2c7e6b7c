//! Prometheus metrics (text exposition format 0.0.4), fed by the outcome
//! record of every target connection and by the registry.
//!
//! Hand-written: a few counters and one histogram do not need a metrics
//! framework. Every label has a bounded set of values, so a hostile peer
//! cannot grow the series count.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::admit::registry::{Phase, Registry};
use crate::gate::revoke::CAUSES;
use crate::outcome::{Ending, Record, Sink};
use crate::relay::TlsEnd;

/// Upper bounds (seconds) of the handshake + admission latency buckets:
/// a TLS 1.3 handshake on a LAN is ~1 ms, a slow peer or a waiting multifd
/// channel can take seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

const ENDINGS: [Ending; 4] = [
    Ending::Completed,
    Ending::Refused,
    Ending::Failed,
    Ending::Dropped,
];

/// Refusal classes (see `Refusal::class`), `overload` (closed at the
/// pending limit, see `gate::target::Limits`), and `other` for anything else.
const REFUSAL_CLASSES: [&str; 9] = [
    "tls",
    "authz",
    "ticket",
    "binding",
    "uuid",
    "stream",
    "stalled",
    crate::outcome::OVERLOAD,
    "other",
];

/// How the source's TLS stream of an ended target connection ended.
const TLS_ENDS: [TlsEnd; 3] = [TlsEnd::CloseNotify, TlsEnd::Eof, TlsEnd::Reset];

const PHASES: [Phase; 8] = [
    Phase::Registered,
    Phase::Active,
    Phase::Paused,
    Phase::Recovering,
    Phase::Completed,
    Phase::Failed,
    Phase::Cancelled,
    Phase::Expired,
];

#[derive(Default)]
pub struct Metrics {
    endings: [AtomicU64; ENDINGS.len()],
    refusals: [AtomicU64; REFUSAL_CLASSES.len()],
    bytes_to_target: AtomicU64,
    tls_ends: [AtomicU64; TLS_ENDS.len()],
    bytes_to_source: AtomicU64,
    /// Cumulative bucket counts are computed at render time; these are
    /// per-bucket (the last one is +Inf).
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    latency_count: AtomicU64,
    /// Refusals by (class, cause): both labels come from fixed lists
    /// ([`crate::admit::Refusal::cause`]), so the map stays small.
    causes: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// Live channels cut because their peer is no longer allowed, by cause.
    revocations: [AtomicU64; CAUSES.len()],
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn count(&self, r: &Record) {
        let i = ENDINGS.iter().position(|e| *e == r.ending).unwrap_or(0);
        self.endings[i].fetch_add(1, Relaxed);
        self.bytes_to_target.fetch_add(r.bytes_sent, Relaxed);
        if let Some(i) = TLS_ENDS.iter().position(|e| Some(e.as_str()) == r.tls_end) {
            self.tls_ends[i].fetch_add(1, Relaxed);
        }
        self.bytes_to_source.fetch_add(r.bytes_recv, Relaxed);
        if let Some(d) = r.admission {
            let secs = d.as_secs_f64();
            let b = LATENCY_BUCKETS
                .iter()
                .position(|le| secs <= *le)
                .unwrap_or(LATENCY_BUCKETS.len());
            self.latency[b].fetch_add(1, Relaxed);
            self.latency_sum_micros
                .fetch_add(d.as_micros() as u64, Relaxed);
            self.latency_count.fetch_add(1, Relaxed);
        }
    }

    /// The exposition, with the registry's gauges.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# HELP miggate_connections_total Target connections by how they ended."
        );
        let _ = writeln!(w, "# TYPE miggate_connections_total counter");
        for (e, n) in ENDINGS.iter().zip(&self.endings) {
            let _ = writeln!(
                w,
                "miggate_connections_total{{outcome=\"{}\"}} {}",
                e.as_str(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            w,
            "# HELP miggate_refusals_total Refused target connections by reason class."
        );
        let _ = writeln!(w, "# TYPE miggate_refusals_total counter");
        for (c, n) in REFUSAL_CLASSES.iter().zip(&self.refusals) {
            let _ = writeln!(
                w,
                "miggate_refusals_total{{reason=\"{c}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            w,
            "# HELP miggate_refusal_causes_total Refused target connections by reason class and the check that failed (e.g. ticket: unknown, expired, spent)."
        );
        let _ = writeln!(w, "# TYPE miggate_refusal_causes_total counter");
        for ((c, cause), n) in self.causes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                w,
                "miggate_refusal_causes_total{{reason=\"{c}\",cause=\"{cause}\"}} {n}"
            );
        }
        let _ = writeln!(
            w,
            "# HELP miggate_revocations_total Admitted target connections closed because their peer is no longer allowed: acl (the ACL now denies its DN), crl (ca-crl.pem revokes its certificate), deleted (its registration was deleted). Also counted in miggate_connections_total{{outcome=\"failed\"}}."
        );
        let _ = writeln!(w, "# TYPE miggate_revocations_total counter");
        for (c, n) in CAUSES.iter().zip(&self.revocations) {
            let _ = writeln!(
                w,
                "miggate_revocations_total{{cause=\"{}\"}} {}",
                c.as_str(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            w,
            "# HELP miggate_bytes_total Bytes relayed by ended connections."
        );
        let _ = writeln!(w, "# TYPE miggate_bytes_total counter");
        let _ = writeln!(
            w,
            "miggate_bytes_total{{direction=\"source_to_target\"}} {}",
            self.bytes_to_target.load(Relaxed)
        );
        let _ = writeln!(
            w,
            "miggate_bytes_total{{direction=\"target_to_source\"}} {}",
            self.bytes_to_source.load(Relaxed)
        );
        let _ = writeln!(
            w,
            "# HELP miggate_tls_ends_total Admitted target connections by how the source's TLS stream ended: close_notify, eof (a TCP EOF without close_notify: QEMU's main channel, QEMU before 10.0, or a cut), reset."
        );
        let _ = writeln!(w, "# TYPE miggate_tls_ends_total counter");
        for (e, n) in TLS_ENDS.iter().zip(&self.tls_ends) {
            let _ = writeln!(
                w,
                "miggate_tls_ends_total{{end=\"{}\"}} {}",
                e.as_str(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            w,
            "# HELP miggate_active_migrations Registered migrations with channels open."
        );
        let _ = writeln!(w, "# TYPE miggate_active_migrations gauge");
        let _ = writeln!(w, "miggate_active_migrations {}", registry.active());
        let mut by_phase = [0u64; PHASES.len()];
        for v in registry.list() {
            if let Some(i) = PHASES.iter().position(|p| *p == v.state) {
                by_phase[i] += 1;
            }
        }
        let _ = writeln!(w, "# HELP miggate_migrations Migrations known to the daemon (ended ones until forgotten), by state.");
        let _ = writeln!(w, "# TYPE miggate_migrations gauge");
        for (p, n) in PHASES.iter().zip(by_phase) {
            let _ = writeln!(w, "miggate_migrations{{state=\"{}\"}} {n}", p.as_str());
        }
        let _ = writeln!(w, "# HELP miggate_admission_seconds TLS handshake + admission time of admitted connections.");
        let _ = writeln!(w, "# TYPE miggate_admission_seconds histogram");
        let mut cumulative = 0;
        for (i, n) in self.latency.iter().enumerate() {
            cumulative += n.load(Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                w,
                "miggate_admission_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            w,
            "miggate_admission_seconds_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            w,
            "miggate_admission_seconds_count {}",
            self.latency_count.load(Relaxed)
        );
        out
    }
}

impl Sink for Metrics {
    fn record(&self, record: &Record) {
        self.count(record);
        if record.ending == Ending::Refused {
            // A refusal that came without its class.
            self.refusals[REFUSAL_CLASSES.len() - 1].fetch_add(1, Relaxed);
        }
    }

    fn revoked(&self, record: &Record, cause: &'static str) {
        self.count(record);
        if let Some(i) = CAUSES.iter().position(|c| c.as_str() == cause) {
            self.revocations[i].fetch_add(1, Relaxed);
        }
    }

    fn refused(&self, record: &Record, class: &'static str, cause: &'static str) {
        self.count(record);
        *self
            .causes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((class, cause))
            .or_default() += 1;
        let i = REFUSAL_CLASSES
            .iter()
            .position(|c| *c == class)
            .unwrap_or(REFUSAL_CLASSES.len() - 1);
        self.refusals[i].fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(ending: Ending, admission: Option<Duration>) -> Record {
        Record {
            role: "target",
            peer_addr: "127.0.0.1:1".into(),
            peer_dn: None,
            channel: None,
            vm: None,
            migration: None,
            bytes_sent: 100,
            bytes_recv: 7,
            key_updates: 0,
            tls_end: None,
            duration: Duration::from_secs(1),
            admission,
            ending,
            reason: None,
        }
    }

    #[test]
    fn counts_and_histogram() {
        let m = Metrics::new();
        m.record(&record(Ending::Completed, Some(Duration::from_millis(3))));
        let clean = Record {
            tls_end: Some("close_notify"),
            ..record(Ending::Completed, None)
        };
        m.record(&clean);
        m.refused(&record(Ending::Refused, None), "ticket", "expired");
        m.refused(&record(Ending::Refused, None), "nonsense", "nonsense");
        let overload = crate::outcome::OVERLOAD;
        m.refused(&record(Ending::Refused, None), overload, overload);
        let text = m.render(&Registry::new(Duration::from_secs(1)));
        for line in [
            "miggate_connections_total{outcome=\"completed\"} 2",
            "miggate_tls_ends_total{end=\"close_notify\"} 1",
            "miggate_tls_ends_total{end=\"eof\"} 0",
            "miggate_connections_total{outcome=\"refused\"} 3",
            "miggate_refusals_total{reason=\"overload\"} 1",
            "miggate_refusals_total{reason=\"ticket\"} 1",
            "miggate_refusals_total{reason=\"other\"} 1",
            "miggate_refusal_causes_total{reason=\"ticket\",cause=\"expired\"} 1",
            "miggate_bytes_total{direction=\"source_to_target\"} 500",
            "miggate_admission_seconds_bucket{le=\"0.0025\"} 0",
            "miggate_admission_seconds_bucket{le=\"0.005\"} 1",
            "miggate_admission_seconds_bucket{le=\"+Inf\"} 1",
            "miggate_admission_seconds_count 1",
            "miggate_active_migrations 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    /// A revoked channel counts as failed, and by its cause; a cause not
    /// in the list is only a failure.
    #[test]
    fn revocations_by_cause() {
        let m = Metrics::new();
        m.revoked(&record(Ending::Failed, None), "acl");
        m.revoked(&record(Ending::Failed, None), "crl");
        m.revoked(&record(Ending::Failed, None), "crl");
        m.revoked(&record(Ending::Failed, None), "nonsense");
        let text = m.render(&Registry::new(Duration::from_secs(1)));
        for line in [
            "miggate_connections_total{outcome=\"failed\"} 4",
            "miggate_revocations_total{cause=\"acl\"} 1",
            "miggate_revocations_total{cause=\"crl\"} 2",
            "miggate_revocations_total{cause=\"deleted\"} 0",
            "miggate_refusals_total{reason=\"other\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
