//! One outcome record per connection: created at accept, emitted exactly
//! once as a structured log event (target `miggate::outcome`) with fixed
//! field names, and handed to an optional [`Sink`] (metrics, the migrate
//! command's error reporting). A record dropped without `finish` (a panic,
//! a cancelled task) still reports itself, as "dropped".

use std::net::SocketAddr;
use std::sync::Arc;
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
    pub duration: Duration,
    /// TLS handshake + admission time, when admission completed.
    pub admission: Option<Duration>,
    pub ending: Ending,
    pub reason: Option<String>,
}

/// Receives every finished record.
pub trait Sink: Send + Sync {
    fn record(&self, record: &Record);

    /// A refused connection's record with the refusal's class
    /// ([`Refusal::class`](crate::admit::Refusal::class)), for sinks that
    /// count refusals by kind. By default, just the record.
    fn refused(&self, record: &Record, class: &'static str) {
        let _ = class;
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
            Some(refusal.class()),
        );
    }

    fn emit(&mut self, ending: Ending, reason: Option<&str>, class: Option<&'static str>) {
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
            duration: self.started.elapsed(),
            admission: self.admitted_after,
            ending,
            reason: reason.map(str::to_string),
        };
        log(&record);
        match (&self.sink, class) {
            (Some(sink), Some(class)) => sink.refused(&record, class),
            (Some(sink), None) => sink.record(&record),
            (None, _) => {}
        }
    }
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
