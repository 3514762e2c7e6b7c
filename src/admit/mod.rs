//! The admission decision for one connection: peer identity -> authz ->
//! the stream's own VM identity. Pure functions: no I/O here.

pub mod registry;
pub mod ticket;

use uuid::Uuid;

use crate::authz::{Authz, Decision};
use crate::wire::qemu::StreamKind;

/// Why a connection is refused; the message is what both ends log and what
/// a miggate source receives in its verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    NotAuthorized(String),
    #[error("VM UUID mismatch: expected {expected}, stream carries {got}")]
    UuidMismatch { expected: Uuid, got: Uuid },
    #[error("VM UUID {expected} expected, but the {channel} carries none (enable the source QEMU's validate-uuid capability and give it -uuid)")]
    UuidMissing {
        expected: Uuid,
        channel: &'static str,
    },
    #[error("{0}")]
    Stream(String),
    #[error("{0}")]
    Ticket(String),
    #[error("peer sent nothing for {0} s")]
    Silent(u64),
    #[error("peer stalled for {secs} s after sending {bytes} bytes")]
    Stalled { secs: u64, bytes: usize },
    #[error("peer closed the connection after {0} bytes, before its stream could be recognised")]
    ClosedEarly(usize),
}

impl Refusal {
    /// A bounded class of the refusal, for metrics labels: `tls`, `authz`,
    /// `ticket`, `uuid`, `stream` or `stalled`.
    pub fn class(&self) -> &'static str {
        match self {
            Refusal::Tls(_) => "tls",
            Refusal::NotAuthorized(_) => "authz",
            Refusal::Ticket(_) => "ticket",
            Refusal::UuidMismatch { .. } | Refusal::UuidMissing { .. } => "uuid",
            Refusal::Stream(_) | Refusal::ClosedEarly(_) => "stream",
            Refusal::Silent(_) | Refusal::Stalled { .. } => "stalled",
        }
    }
}

/// What the target expects of an incoming migration.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    pub uuid: Option<Uuid>,
}

pub fn check_identity(authz: &dyn Authz, dn: &str) -> Result<(), Refusal> {
    match authz.check(dn) {
        Decision::Allow => Ok(()),
        Decision::Deny { reason } => Err(Refusal::NotAuthorized(reason)),
    }
}

pub fn check_stream(expect: &Expectation, kind: &StreamKind) -> Result<(), Refusal> {
    let Some(expected) = expect.uuid else {
        return Ok(());
    };
    // QEMU puts the nil UUID in multifd packets when it has no -uuid.
    let (got, channel) = match kind {
        StreamKind::Main { uuid, .. } => (uuid.filter(|u| !u.is_nil()), "main channel"),
        StreamKind::Multifd { uuid, .. } => {
            (Some(*uuid).filter(|u| !u.is_nil()), "multifd channel")
        }
    };
    match got {
        None => Err(Refusal::UuidMissing { expected, channel }),
        Some(got) if got != expected => Err(Refusal::UuidMismatch { expected, got }),
        Some(_) => Ok(()),
    }
}

/// A short label of the channel for logs: `main` or `multifd/N`.
pub fn channel_label(kind: &StreamKind) -> String {
    match kind {
        StreamKind::Main { .. } => "main".into(),
        StreamKind::Multifd { channel, .. } => format!("multifd/{channel}"),
    }
}

pub fn stream_uuid(kind: &StreamKind) -> Option<Uuid> {
    match kind {
        StreamKind::Main { uuid, .. } => *uuid,
        StreamKind::Multifd { uuid, .. } => Some(*uuid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn main(uuid: Option<Uuid>) -> StreamKind {
        StreamKind::Main {
            uuid,
            machine: None,
        }
    }

    #[test]
    fn uuid_rules() {
        let a = Uuid::from_u128(0xa);
        let b = Uuid::from_u128(0xb);
        let none = Expectation::default();
        let want_a = Expectation { uuid: Some(a) };
        assert_eq!(check_stream(&none, &main(None)), Ok(()));
        assert_eq!(check_stream(&want_a, &main(Some(a))), Ok(()));
        assert_eq!(
            check_stream(&want_a, &main(Some(b))),
            Err(Refusal::UuidMismatch {
                expected: a,
                got: b
            })
        );
        assert!(matches!(
            check_stream(&want_a, &main(None)),
            Err(Refusal::UuidMissing { .. })
        ));
        let nil_multifd = StreamKind::Multifd {
            uuid: Uuid::nil(),
            channel: 0,
        };
        assert!(matches!(
            check_stream(&want_a, &nil_multifd),
            Err(Refusal::UuidMissing { .. })
        ));
        let b_multifd = StreamKind::Multifd {
            uuid: b,
            channel: 1,
        };
        assert!(check_stream(&want_a, &b_multifd)
            .unwrap_err()
            .to_string()
            .starts_with("VM UUID mismatch: expected 00000000-0000-0000-0000-00000000000a"));
    }
}
