//! The admission decision for one connection, whole and in order
//! ([`decide`]): peer identity -> route (ticket or static) -> authz -> the
//! stream's own VM identity; and the registry of expected migrations that
//! a ticket names. No I/O here: the gate reads and asks; the only state a
//! decision changes is a registered migration's (tickets spent, slots
//! taken), under the registry's lock.

pub mod decide;
pub mod registry;
pub mod ticket;

use uuid::Uuid;

use crate::authz::{Authz, Decision};
use crate::wire::qemu::StreamKind;

/// Why a connection is refused. `Display` is the whole story, for the
/// operator's log and API; [`Refusal::public`] is what the refused peer is
/// told: which check failed, and nothing it could use to try again better
/// (no expected UUID, no ACL path or rule, no other peer's DN, no path of
/// the target QEMU).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Tls(#[from] crate::net::mtls::AcceptError),
    #[error("{0}")]
    NotAuthorized(String),
    #[error("VM UUID mismatch: expected {expected}, stream carries {got}")]
    UuidMismatch { expected: Uuid, got: Uuid },
    #[error("VM UUID {expected} expected, but the {channel} carries none (enable the source QEMU's validate-uuid capability and give it -uuid)")]
    UuidMissing {
        expected: Uuid,
        channel: &'static str,
    },
    /// The bytes are not a QEMU migration stream (or could not be read).
    #[error("{0}")]
    Stream(String),
    /// The stream is fine but the target cannot take it now (its QEMU is
    /// unreachable, a multifd channel's main channel never came).
    #[error("{detail}")]
    NotReady {
        public: &'static str,
        detail: String,
    },
    #[error("{detail}")]
    Ticket {
        public: &'static str,
        detail: String,
    },
    #[error("peer sent nothing for {0} s")]
    Silent(u64),
    #[error("peer stalled for {secs} s after sending {bytes} bytes")]
    Stalled { secs: u64, bytes: usize },
    #[error("peer closed the connection after {0} bytes, before its stream could be recognised")]
    ClosedEarly(usize),
}

impl Refusal {
    /// A ticket refusal: `public` for the peer, `detail` for the operator.
    pub fn ticket(public: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal::Ticket {
            public,
            detail: detail.into(),
        }
    }

    /// A bounded class of the refusal, for metrics labels: `tls`, `authz`,
    /// `ticket`, `uuid`, `stream` or `stalled`.
    pub fn class(&self) -> &'static str {
        match self {
            Refusal::Tls(_) => "tls",
            Refusal::NotAuthorized(_) => "authz",
            Refusal::Ticket { .. } => "ticket",
            Refusal::UuidMismatch { .. } | Refusal::UuidMissing { .. } => "uuid",
            Refusal::Stream(_) | Refusal::NotReady { .. } | Refusal::ClosedEarly(_) => "stream",
            Refusal::Silent(_) | Refusal::Stalled { .. } => "stalled",
        }
    }

    /// What the refused peer is told (the verdict's reason).
    pub fn public(&self) -> String {
        match self {
            Refusal::Tls(_) => "TLS: certificate not accepted".into(),
            Refusal::NotAuthorized(_) => "certificate DN not authorized".into(),
            Refusal::UuidMismatch { .. } => "wrong VM".into(),
            // Says what to fix on the source, nothing about the VM expected.
            Refusal::UuidMissing { .. } => {
                "wrong VM: the stream carries no VM UUID (enable the source QEMU's validate-uuid capability and give it -uuid)".into()
            }
            Refusal::Stream(_) => "not a QEMU migration stream".into(),
            Refusal::NotReady { public, .. } | Refusal::Ticket { public, .. } => {
                (*public).into()
            }
            // About the peer's own behaviour: nothing to hide.
            Refusal::Silent(_) | Refusal::Stalled { .. } | Refusal::ClosedEarly(_) => {
                self.to_string()
            }
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
        let r = check_stream(&want_a, &b_multifd).unwrap_err();
        assert!(r
            .to_string()
            .starts_with("VM UUID mismatch: expected 00000000-0000-0000-0000-00000000000a"));
        // The peer learns that it is the wrong VM, not which VM is expected.
        assert_eq!(r.public(), "wrong VM");
    }

    #[test]
    fn the_peer_is_told_which_check_failed_and_no_more() {
        let cases = [
            (
                Refusal::NotAuthorized(
                    "DN O=x,CN=y denied by rule 2 (glob \"O=x,*\") of /etc/miggate/acl.json".into(),
                ),
                "certificate DN not authorized",
            ),
            (
                Refusal::ticket(
                    "ticket already used",
                    "peer O=x,CN=y presented the ticket of migration 1, which O=a,CN=b is already using",
                ),
                "ticket already used",
            ),
            (
                Refusal::NotReady {
                    public: "the target is not ready for this migration",
                    detail: "cannot reach the target QEMU at unix:/run/miggate/in.sock: refused".into(),
                },
                "the target is not ready for this migration",
            ),
            (
                Refusal::Stream("peer's first 64 bytes are not a recognisable stream".into()),
                "not a QEMU migration stream",
            ),
            (Refusal::Silent(30), "peer sent nothing for 30 s"),
        ];
        for (r, public) in cases {
            assert_eq!(r.public(), public, "{r}");
        }
    }
}
