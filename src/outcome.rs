//! One outcome record per connection: created at accept, emitted exactly
//! once as a structured log event (target `miggate::outcome`) with fixed
//! field names, and handed to an optional [`Sink`] (metrics, the migrate
//! command's error reporting). A record dropped without `finish` (a panic,
//! a cancelled task) still reports itself, as "dropped".
//!
//! Refusals are logged at most [`LOG_BURST`] per [`LOG_WINDOW`] and class
//! (a flood must not become a flood of log lines); the rest are counted in
//! one summary line (target `miggate::refusals`) per window. Sinks see
//! every record.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::relay::Counters;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The relay ran and both directions ended cleanly.
    Completed,
    /// Admission said no (TLS, authz, ticket, UUID, not a QEMU stream...).
    Refused,
    /// Admitted, then something broke (next hop unreachable, reset, stall,
    /// cancellation).
    Failed,
    Dropped,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Refused => "refused",
            Ending::Failed => "failed",
            Ending::Dropped => "dropped",
        }
    }
}

/// The finished record, as sinks see it.
#[derive(Debug, Clone)]
pub struct Record {
    pub role: &'static str,
    pub peer_addr: String,
    pub peer_dn: Option<String>,
    pub channel: Option<String>,
    pub vm: Option<String>,
    pub migration: Option<String>,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub key_updates: u64,
    /// How the TLS peer's stream ended (`close_notify`, `eof`, `reset`),
    /// if it ended: what a truncation check can rest on.
    pub tls_end: Option<&'static str>,
    pub duration: Duration,
    /// TLS handshake + admission time, when admission completed.
    pub admission: Option<Duration>,
    pub ending: Ending,
    pub reason: Option<String>,
}

/// Receives every finished record.
pub trait Sink: Send + Sync {
    fn record(&self, record: &Record);

    /// A refused connection's record with the refusal's class and cause
    /// ([`Refusal::class`](crate::admit::Refusal::class),
    /// [`Refusal::cause`](crate::admit::Refusal::cause)), for sinks that
    /// count refusals by kind. By default, just the record.
    fn refused(&self, record: &Record, class: &'static str, cause: &'static str) {
        let _ = (class, cause);
        self.record(record);
    }

    /// An admitted channel cut because its peer is no longer allowed
    /// ([`crate::gate::revoke`]; `cause`: `acl`, `crl`, `deleted`). By
    /// default, just the record (a failed one).
    fn revoked(&self, record: &Record, cause: &'static str) {
        let _ = cause;
        self.record(record);
    }
}

pub struct Outcome {
    role: &'static str,
    peer_addr: String,
    pub peer_dn: Option<String>,
    pub channel: Option<String>,
    pub vm: Option<String>,
    /// The registered migration this connection belongs to (managed mode).
    pub migration: Option<String>,
    pub counters: Arc<Counters>,
    pub sink: Option<Arc<dyn Sink>>,
    started: Instant,
    admitted_after: Option<Duration>,
    emitted: bool,
}

impl Outcome {
    pub fn new(role: &'static str, peer_addr: Option<SocketAddr>) -> Self {
        Outcome {
            role,
            peer_addr: peer_addr.map_or_else(|| "local".to_string(), |a| a.to_string()),
            peer_dn: None,
            channel: None,
            vm: None,
            migration: None,
            counters: Arc::default(),
            sink: None,
            started: Instant::now(),
            admitted_after: None,
            emitted: false,
        }
    }

    /// Marks the end of the handshake and admission (for latency metrics).
    pub fn admitted(&mut self) {
        self.admitted_after = Some(self.started.elapsed());
    }

    pub fn finish(mut self, ending: Ending, reason: Option<&str>) {
        self.emit(ending, reason, None);
    }

    /// Ends a refused connection, with the refusal's class for sinks.
    pub fn refuse(mut self, refusal: &crate::admit::Refusal) {
        self.emit(
            Ending::Refused,
            Some(&refusal.to_string()),
            Some((refusal.class(), refusal.cause())),
        );
    }

    /// Ends an admitted channel cut by a revocation (`failed`, with the
    /// reason), with its cause for sinks.
    pub fn revoked(mut self, cause: &'static str, reason: &str) {
        self.emit(Ending::Failed, Some(reason), Some((REVOKED, cause)));
    }

    /// Ends a connection closed unread because the gateway is at its limit
    /// of connections waiting for admission (class `overload`).
    pub fn overloaded(mut self, why: &str) {
        self.emit(Ending::Refused, Some(why), Some((OVERLOAD, OVERLOAD)));
    }

    fn emit(
        &mut self,
        ending: Ending,
        reason: Option<&str>,
        class: Option<(&'static str, &'static str)>,
    ) {
        if self.emitted {
            return;
        }
        self.emitted = true;
        let record = Record {
            role: self.role,
            peer_addr: self.peer_addr.clone(),
            peer_dn: self.peer_dn.clone(),
            channel: self.channel.clone(),
            vm: self.vm.clone(),
            migration: self.migration.clone(),
            bytes_sent: self.counters.forward(),
            bytes_recv: self.counters.back(),
            key_updates: self.counters.key_updates(),
            tls_end: self.counters.tls_end().map(|e| e.as_str()),
            duration: self.started.elapsed(),
            admission: self.admitted_after,
            ending,
            reason: reason.map(str::to_string),
        };
        if ending != Ending::Refused || log_allowed(class.map_or("other", |(c, _)| c)) {
            log(&record);
        }
        match (&self.sink, class) {
            (Some(sink), Some((REVOKED, cause))) => sink.revoked(&record, cause),
            (Some(sink), Some((class, cause))) => sink.refused(&record, class, cause),
            (Some(sink), None) => sink.record(&record),
            (None, _) => {}
        }
    }
}

/// Marks a revocation among the classes `emit` passes on (never a
/// refusal class: a revoked channel was admitted, and `failed`).
const REVOKED: &str = "revoked";

/// Refusal class of connections closed at the pending limit.
pub const OVERLOAD: &str = "overload";

/// Refusal log lines per class allowed in one [`LOG_WINDOW`]: enough to
/// see what a few bad peers did, with every detail.
pub const LOG_BURST: u32 = 10;
/// Window of the refusal log rate limit, and the delay of its summary line.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A log rate limit: [`LOG_BURST`] events per [`LOG_WINDOW`].
#[derive(Debug)]
pub struct RateLimit {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    pub fn new() -> Self {
        RateLimit {
            start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log this event, `n` events were suppressed since the last
    /// one logged (a new window began); `None`: suppress it.
    pub fn allow(&mut self) -> Option<u64> {
        if self.start.elapsed() >= LOG_WINDOW {
            let n = self.take_suppressed();
            self.start = Instant::now();
            self.logged = 1;
            return Some(n);
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            return Some(0);
        }
        self.suppressed += 1;
        None
    }

    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// One refusal log limit per class, process-wide.
static REFUSAL_LOG: Mutex<BTreeMap<&'static str, RateLimit>> = Mutex::new(BTreeMap::new());

/// Whether a refusal of `class` may be logged now. The first suppressed
/// one of a window schedules the window's summary line.
fn log_allowed(class: &'static str) -> bool {
    let mut limits = REFUSAL_LOG.lock().unwrap_or_else(|p| p.into_inner());
    let limit = limits.entry(class).or_default();
    match limit.allow() {
        Some(0) => true,
        Some(n) => {
            summary(class, n);
            true
        }
        None => {
            if limit.suppressed == 1 {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let due = limit.start + LOG_WINDOW;
                    rt.spawn(async move {
                        tokio::time::sleep_until(due.into()).await;
                        let n = REFUSAL_LOG
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_mut(class)
                            .map_or(0, RateLimit::take_suppressed);
                        if n > 0 {
                            summary(class, n);
                        }
                    });
                }
            }
            false
        }
    }
}

fn summary(class: &'static str, suppressed: u64) {
    tracing::warn!(
        target: "miggate::refusals",
        class,
        suppressed,
        window_s = LOG_WINDOW.as_secs(),
        "{suppressed} more refused connections of class {class} not logged (at most {LOG_BURST} per {} s); the metrics count them all",
        LOG_WINDOW.as_secs()
    );
}

fn log(r: &Record) {
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let (dn, channel, vm, mig, reason) = (
        dash(&r.peer_dn),
        dash(&r.channel),
        dash(&r.vm),
        dash(&r.migration),
        dash(&r.reason),
    );
    let duration_ms = r.duration.as_millis() as u64;
    let tls_end = r.tls_end.unwrap_or("-");
    let msg = match r.ending {
        Ending::Completed => "connection completed",
        Ending::Refused => "connection refused",
        Ending::Failed | Ending::Dropped => "connection failed",
    };
    macro_rules! record {
        ($level:ident) => {
            tracing::$level!(
                target: "miggate::outcome",
                role = r.role,
                peer.addr = %r.peer_addr,
                peer.dn = dn,
                channel,
                vm,
                migration = mig,
                bytes_sent = r.bytes_sent,
                bytes_recv = r.bytes_recv,
                key_updates = r.key_updates,
                tls_end,
                duration_ms,
                outcome = r.ending.as_str(),
                reason,
                "{msg}"
            )
        };
    }
    match r.ending {
        Ending::Completed => record!(info),
        _ => record!(warn),
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.emit(
            Ending::Dropped,
            Some("connection task ended without a result"),
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_logs_a_burst_then_counts() {
        let mut l = RateLimit::new();
        for _ in 0..LOG_BURST {
            assert_eq!(l.allow(), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(l.allow(), None);
        }
        // A new window: logged, with the count of those suppressed.
        l.start -= LOG_WINDOW;
        assert_eq!(l.allow(), Some(5));
        assert_eq!(l.allow(), Some(0));
    }
}
