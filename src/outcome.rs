//! One outcome record per connection: created at accept, emitted exactly
//! once as a structured log event (target `miggate::outcome`) with fixed
//! field names. A record dropped without `finish` (a panic, a cancelled
//! task) still reports itself, as "dropped".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::relay::Counters;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The relay ran and both directions ended cleanly.
    Completed,
    /// Admission said no (TLS, authz, UUID, not a QEMU stream...).
    Refused,
    /// Admitted, then something broke (next hop unreachable, reset, stall).
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

#[derive(Debug)]
pub struct Outcome {
    role: &'static str,
    peer_addr: String,
    pub peer_dn: Option<String>,
    pub channel: Option<String>,
    pub vm: Option<String>,
    pub counters: Arc<Counters>,
    started: Instant,
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
            counters: Arc::default(),
            started: Instant::now(),
            emitted: false,
        }
    }

    pub fn finish(mut self, ending: Ending, reason: Option<&str>) {
        self.emit(ending, reason);
    }

    fn emit(&mut self, ending: Ending, reason: Option<&str>) {
        if self.emitted {
            return;
        }
        self.emitted = true;
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let fields = (
            self.peer_dn.as_deref().unwrap_or("-"),
            self.channel.as_deref().unwrap_or("-"),
            self.vm.as_deref().unwrap_or("-"),
            reason.unwrap_or("-"),
        );
        let msg = match ending {
            Ending::Completed => "connection completed",
            Ending::Refused => "connection refused",
            Ending::Failed | Ending::Dropped => "connection failed",
        };
        macro_rules! record {
            ($level:ident) => {
                tracing::$level!(
                    target: "miggate::outcome",
                    role = self.role,
                    peer.addr = %self.peer_addr,
                    peer.dn = fields.0,
                    channel = fields.1,
                    vm = fields.2,
                    bytes_sent = self.counters.forward(),
                    bytes_recv = self.counters.back(),
                    duration_ms,
                    outcome = ending.as_str(),
                    reason = fields.3,
                    "{msg}"
                )
            };
        }
        match ending {
            Ending::Completed => record!(info),
            _ => record!(warn),
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.emit(
            Ending::Dropped,
            Some("connection task ended without a result"),
        );
    }
}
