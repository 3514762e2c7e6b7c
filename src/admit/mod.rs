//! The admission decision for one connection, whole and in order
//! ([`decide`]): peer identity -> route (ticket or static) -> authz -> the
//! stream's own VM identity; and the registry of expected migrations that
//! a ticket names. No I/O here: the gate reads and asks; the only state a
//! decision changes is a registered migration's (tickets spent, slots
//! taken), under the registry's lock.

pub mod binding;
pub mod binding_state;
pub mod decide;
pub mod registry;
pub mod ticket;

use std::sync::Arc;

use uuid::Uuid;

use self::registry::Phase;
use self::ticket::TicketError;
use crate::authz::{Authz, Decision};
use crate::net::Endpoint;
use crate::wire::frames::FrameError;
use crate::wire::qemu::{SniffError, StreamKind};

/// Why a connection is refused. `Display` is the whole story, for the
/// operator's log and API; [`Refusal::public`] is what the refused peer is
/// told: which check failed, and nothing it could use to try again better
/// (no expected UUID, no ACL path or rule, no other peer's DN, no path of
/// the target QEMU); [`Refusal::class`] and [`Refusal::cause`] are the
/// metrics labels. Causes stay typed until one of those three renders them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Tls(#[from] crate::net::mtls::AcceptError),
    #[error("{0}")]
    NotAuthorized(#[from] AuthzRefusal),
    #[error("VM UUID mismatch: expected {expected}, stream carries {got}")]
    UuidMismatch { expected: Uuid, got: Uuid },
    #[error("VM UUID {expected} expected, but the {channel} carries none (enable the source QEMU's validate-uuid capability and give it -uuid)")]
    UuidMissing {
        expected: Uuid,
        channel: &'static str,
    },
    /// The bytes are not a QEMU migration stream (or could not be read).
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// A multifd channel whose migration's main channel never came.
    #[error("{0}")]
    NoMainChannel(NoMain),
    /// The stream is fine but the target QEMU cannot be reached.
    #[error("cannot reach the target QEMU at {forward}: {error}")]
    TargetUnreachable { forward: Endpoint, error: IoError },
    #[error("{0}")]
    Ticket(#[from] TicketRefusal),
    #[error("peer sent nothing for {0} s")]
    Silent(u64),
    #[error("peer stalled for {secs} s after sending {bytes} bytes")]
    Stalled { secs: u64, bytes: usize },
    #[error("peer closed the connection after {0} bytes, before its stream could be recognised")]
    ClosedEarly(usize),
    /// A channel that joins a main channel (postcopy preempt) it may not.
    #[error("{0}")]
    Join(#[from] binding::JoinRefusal),
    /// The static route forwards per VM (`{uuid}` in `--forward`) and this
    /// channel names no VM.
    #[error(
        "the forward {forward} is chosen by the VM UUID, but the {channel} carries none{hint}"
    )]
    ForwardNeedsUuid {
        forward: Endpoint,
        channel: &'static str,
        hint: &'static str,
    },
    /// An NBD channel (storage migration) this route or migration does
    /// not take.
    #[error("{0}")]
    Nbd(#[from] NbdRefusal),
}

/// Why an NBD channel is not admitted (its opening itself was fine).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdRefusal {
    #[error(
        "this gateway forwards no NBD channels (start it with --forward-nbd and --nbd-export)"
    )]
    NoRoute,
    #[error("migration {migration} was registered without disks: it takes no NBD channel")]
    NoDisks { migration: String },
    /// `migration`: `None` on the static route.
    #[error("NBD export {export:?} is not {}", match .migration { Some(m) => format!("a disk registered for migration {m}"), None => "one this gateway forwards (--nbd-export)".into() })]
    NotRegistered {
        export: String,
        migration: Option<String>,
    },
    #[error("NBD export {export:?} of migration {migration} already has an open channel")]
    Busy { export: String, migration: String },
}

/// A DN the route's or the registration's authz does not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzRefusal {
    /// The authz's own sentence (the DN, the ACL and the rule that decided).
    #[error("{0}")]
    Denied(String),
    /// A second peer with a migration's ticket while the first uses it.
    #[error(
        "peer {peer} presented the ticket of migration {migration}, which {first} is already using"
    )]
    TicketInUse {
        peer: String,
        migration: String,
        first: String,
    },
}

/// Why the first bytes are not a stream the target takes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Sniff(#[from] SniffError),
    #[error("{0}")]
    Hello(Arc<FrameError>),
    #[error("peer's first {0} bytes are not a recognisable stream")]
    Unrecognised(usize),
    #[error("a channel resuming a postcopy migration must start with its recovery (MIG_CMD_RECV_BITMAP)")]
    NotResumed,
    #[error("read error: {0}")]
    Read(IoError),
    /// The opening of an NBD channel (after a hello that declared one).
    #[error("{0}")]
    Nbd(crate::wire::nbd::NbdError),
    #[error(
        "a hello that declares an NBD channel cannot also join, resume or bind a main channel"
    )]
    NbdHello,
}

/// An I/O error that can be cloned with the refusal that carries it;
/// compared by kind and message.
#[derive(Debug, Clone)]
pub struct IoError(pub Arc<std::io::Error>);

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}
impl Eq for IoError {}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError(Arc::new(e))
    }
}

/// Compared by what the operator reads (I/O and JSON errors are not
/// comparable themselves).
impl PartialEq for StreamError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
impl Eq for StreamError {}

impl From<FrameError> for StreamError {
    fn from(e: FrameError) -> Self {
        StreamError::Hello(Arc::new(e))
    }
}

/// A multifd channel that waited for its main channel in vain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoMain {
    #[error(
        "multifd channel arrived but no main channel of its migration was admitted within {0} s"
    )]
    Timeout(u64),
    #[error("multifd channel arrived but its migration ended before its main channel came")]
    MigrationEnded,
}

/// A ticket that does not (or no longer) admit this channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketRefusal {
    #[error("unknown ticket: no migration is registered with it")]
    Unknown,
    #[error("malformed ticket: {0}")]
    Malformed(TicketError),
    #[error("ticket of migration {migration} expired at {at}")]
    Expired {
        migration: String,
        /// RFC 3339, as the API shows it.
        at: String,
    },
    #[error("ticket already used: migration {migration} has ended ({})", .phase.as_str())]
    Spent { migration: String, phase: Phase },
    #[error("migration {migration} was cancelled")]
    Cancelled { migration: String },
    #[error("migration {migration} already has its main channel")]
    MainTaken { migration: String },
    #[error("migration {migration} already has its postcopy preempt channel")]
    PreemptTaken { migration: String },
    #[error("ticket of migration {migration} was replaced by its recovery's (each recovery has a one-shot ticket of its own)")]
    Replaced { migration: String },
    #[error("migration {migration} is paused in postcopy: nothing is admitted until its recovery is asked for (POST /v1/migrations/{migration}/recover), which issues a new ticket")]
    Paused { migration: String },
    #[error("migration {migration} is being recovered: its new ticket admits the source QEMU's resumed main channel first, and nothing else")]
    RecoveryOnly { migration: String },
    #[error("migration {migration} is not being recovered: a resumed main channel is admitted only with the ticket of a recovery (POST /v1/migrations/{migration}/recover)")]
    NotRecovering { migration: String },
    #[error("migration {migration} was registered with {channels} channel(s) (1 main + {} multifd) and all its multifd channels have connected", .channels.saturating_sub(1))]
    SlotsFull { migration: String, channels: u32 },
    #[error("migration {migration} is not registered on this listener")]
    WrongListener { migration: String },
    #[error("this gateway has no registered migrations (tickets are for miggate daemon)")]
    NoRegistry,
    #[error("this gateway admits registered migrations only: the source must present a ticket")]
    RegisteredOnly,
}

impl TicketRefusal {
    /// What the peer is told.
    pub fn public(&self) -> &'static str {
        match self {
            TicketRefusal::Unknown => "unknown ticket",
            TicketRefusal::Malformed(_) => "malformed ticket",
            TicketRefusal::Expired { .. } => "ticket expired",
            TicketRefusal::Spent { .. }
            | TicketRefusal::Replaced { .. }
            | TicketRefusal::MainTaken { .. }
            | TicketRefusal::PreemptTaken { .. }
            | TicketRefusal::SlotsFull { .. } => "ticket already used",
            TicketRefusal::Paused { .. } => "migration paused: recover it first",
            TicketRefusal::RecoveryOnly { .. } => "recovery ticket: resumed main channel first",
            TicketRefusal::NotRecovering { .. } => "migration not being recovered",
            TicketRefusal::Cancelled { .. } => "migration cancelled",
            TicketRefusal::WrongListener { .. } => "ticket not valid on this listener",
            TicketRefusal::NoRegistry => "this gateway does not take tickets",
            TicketRefusal::RegisteredOnly => {
                "this gateway admits registered migrations only: present a ticket"
            }
        }
    }

    /// A bounded label: which ticket check failed.
    pub fn cause(&self) -> &'static str {
        match self {
            TicketRefusal::Unknown => "unknown",
            TicketRefusal::Malformed(_) => "malformed",
            TicketRefusal::Expired { .. } => "expired",
            TicketRefusal::Spent { .. } | TicketRefusal::Replaced { .. } => "spent",
            TicketRefusal::Cancelled { .. } => "cancelled",
            TicketRefusal::MainTaken { .. } => "main_taken",
            TicketRefusal::PreemptTaken { .. } => "preempt_taken",
            TicketRefusal::Paused { .. } => "paused",
            TicketRefusal::RecoveryOnly { .. } => "recovery_only",
            TicketRefusal::NotRecovering { .. } => "not_recovering",
            TicketRefusal::SlotsFull { .. } => "slots_full",
            TicketRefusal::WrongListener { .. } => "wrong_listener",
            TicketRefusal::NoRegistry => "no_registry",
            TicketRefusal::RegisteredOnly => "registered_only",
        }
    }
}

impl Refusal {
    /// A bounded class of the refusal, for metrics labels: `tls`, `authz`,
    /// `ticket`, `binding`, `uuid`, `stream` or `stalled`.
    pub fn class(&self) -> &'static str {
        match self {
            Refusal::Tls(_) => "tls",
            Refusal::NotAuthorized(_) => "authz",
            Refusal::Ticket(_) => "ticket",
            Refusal::Join(_) => "binding",
            Refusal::UuidMismatch { .. }
            | Refusal::UuidMissing { .. }
            | Refusal::ForwardNeedsUuid { .. } => "uuid",
            Refusal::Stream(_)
            | Refusal::NoMainChannel(_)
            | Refusal::TargetUnreachable { .. }
            | Refusal::ClosedEarly(_) => "stream",
            Refusal::Silent(_) | Refusal::Stalled { .. } => "stalled",
            Refusal::Nbd(_) => "nbd",
        }
    }

    /// A bounded label within the class: which check failed (for tickets:
    /// `unknown`, `expired`, `spent`...).
    pub fn cause(&self) -> &'static str {
        match self {
            Refusal::Tls(e) => match e {
                crate::net::mtls::AcceptError::Timeout(_) => "handshake_timeout",
                crate::net::mtls::AcceptError::Handshake(_) => "handshake",
                crate::net::mtls::AcceptError::NoCertificate => "no_certificate",
                crate::net::mtls::AcceptError::Subject(_) => "subject",
            },
            Refusal::NotAuthorized(AuthzRefusal::Denied(_)) => "denied",
            Refusal::NotAuthorized(AuthzRefusal::TicketInUse { .. }) => "ticket_in_use",
            Refusal::UuidMismatch { .. } => "mismatch",
            Refusal::UuidMissing { .. } => "missing",
            Refusal::ForwardNeedsUuid { .. } => "missing_for_forward",
            Refusal::Stream(StreamError::Read(_)) => "read_error",
            Refusal::Stream(StreamError::Nbd(_) | StreamError::NbdHello) => "not_nbd",
            Refusal::Stream(_) => "not_qemu",
            Refusal::NoMainChannel(_) => "no_main_channel",
            Refusal::TargetUnreachable { .. } => "target_unreachable",
            Refusal::ClosedEarly(_) => "closed_early",
            Refusal::Ticket(t) => t.cause(),
            Refusal::Join(j) => j.cause(),
            Refusal::Silent(_) => "silent",
            Refusal::Stalled { .. } => "stalled",
            Refusal::Nbd(NbdRefusal::NoRoute | NbdRefusal::NoDisks { .. }) => "no_nbd_route",
            Refusal::Nbd(NbdRefusal::NotRegistered { .. }) => "export_not_registered",
            Refusal::Nbd(NbdRefusal::Busy { .. }) => "export_busy",
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
            Refusal::ForwardNeedsUuid { channel, hint, .. } => {
                format!("wrong VM: the {channel} carries no VM UUID{hint}")
            }
            Refusal::Stream(StreamError::Nbd(e)) => format!("not an NBD opening miggate takes: {e}"),
            Refusal::Stream(_) => "not a QEMU migration stream".into(),
            Refusal::NoMainChannel(_) => "multifd channel without an admitted main channel".into(),
            Refusal::TargetUnreachable { .. } => "the target is not ready for this migration".into(),
            Refusal::Ticket(t) => t.public().into(),
            // The export is the peer's own word; the others are not told.
            Refusal::Nbd(NbdRefusal::NotRegistered { export, migration }) => match migration {
                Some(_) => format!("NBD export {export:?} is not registered for this migration"),
                None => format!("NBD export {export:?} is not one this gateway forwards"),
            },
            Refusal::Nbd(NbdRefusal::Busy { export, .. }) => {
                format!("NBD export {export:?} is already in use")
            }
            Refusal::Nbd(_) => "this target takes no NBD channel for this migration".into(),
            Refusal::Join(j) => j.public().into(),
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
        Decision::Deny { reason } => Err(AuthzRefusal::Denied(reason).into()),
    }
}

pub fn check_stream(expect: &Expectation, kind: &StreamKind) -> Result<(), Refusal> {
    let Some(expected) = expect.uuid else {
        return Ok(());
    };
    // QEMU puts the nil UUID in multifd packets when it has no -uuid.
    let (got, channel) = match kind {
        // Its VM is the main channel's it joined or resumes, checked there.
        StreamKind::Preempt | StreamKind::Resumed | StreamKind::Nbd { .. } => return Ok(()),
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

/// What a per-VM forward (`--forward unix:/run/vms/{uuid}.sock`) puts in
/// place of [`UUID_PLACEHOLDER`]: the stream's VM UUID, hyphenated lower
/// hex (nothing else can reach the path: no `/`, no `..`).
pub const UUID_PLACEHOLDER: &str = "{uuid}";

/// Whether `forward` is chosen per VM ([`UUID_PLACEHOLDER`] in its path).
pub fn forward_is_per_vm(forward: &Endpoint) -> bool {
    matches!(forward, Endpoint::Unix(p) if p.to_string_lossy().contains(UUID_PLACEHOLDER))
}

/// The endpoint a channel of `kind` goes to on a per-VM forward, or `None`
/// when `forward` is a fixed one. Channels without a UUID of their own
/// (postcopy preempt, a resumed main channel) are refused there: their VM
/// is their main channel's, which a per-VM route does not track (yet).
pub fn forward_for(forward: &Endpoint, kind: &StreamKind) -> Result<Option<Endpoint>, Refusal> {
    let Endpoint::Unix(path) = forward else {
        return Ok(None);
    };
    let template = path.to_string_lossy();
    if !template.contains(UUID_PLACEHOLDER) {
        return Ok(None);
    }
    const NO_UUID: &str = " (enable the source QEMU's validate-uuid capability and give it -uuid)";
    const NO_POSTCOPY: &str = " (postcopy is not supported on a per-VM forward: use one target gateway per VM, or the daemon)";
    let missing = |channel, hint| Refusal::ForwardNeedsUuid {
        forward: forward.clone(),
        channel,
        hint,
    };
    let uuid = match kind {
        StreamKind::Main { uuid, .. } => uuid
            .filter(|u| !u.is_nil())
            .ok_or(missing("main channel", NO_UUID))?,
        StreamKind::Multifd { uuid, .. } => Some(*uuid)
            .filter(|u| !u.is_nil())
            .ok_or(missing("multifd channel", NO_UUID))?,
        StreamKind::Preempt => return Err(missing("postcopy preempt channel", NO_POSTCOPY)),
        StreamKind::Resumed => return Err(missing("resumed main channel", NO_POSTCOPY)),
        // Routed by `--forward-nbd`, never by this template.
        StreamKind::Nbd { .. } => {
            return Err(missing(
                "NBD channel",
                " (an NBD channel carries no VM UUID)",
            ))
        }
    };
    let path = template.replace(UUID_PLACEHOLDER, &uuid.hyphenated().to_string());
    Ok(Some(Endpoint::Unix(path.into())))
}

/// A short label of the channel for logs: `main` or `multifd/N`.
pub fn channel_label(kind: &StreamKind) -> String {
    match kind {
        StreamKind::Main { .. } => "main".into(),
        StreamKind::Multifd { channel, .. } => format!("multifd/{channel}"),
        StreamKind::Preempt => "postcopy-preempt".into(),
        StreamKind::Resumed => "main-resumed".into(),
        // The export name is the client's: printable, bounded.
        StreamKind::Nbd { export } => {
            let shown: String = export.escape_debug().take(64).collect();
            format!("nbd:{shown}")
        }
    }
}

pub fn stream_uuid(kind: &StreamKind) -> Option<Uuid> {
    match kind {
        StreamKind::Main { uuid, .. } => *uuid,
        StreamKind::Multifd { uuid, .. } => Some(*uuid),
        StreamKind::Preempt | StreamKind::Resumed | StreamKind::Nbd { .. } => None,
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
    fn a_per_vm_forward_takes_the_streams_uuid_and_nothing_else() {
        let fixed: Endpoint = "unix:/run/in.sock".parse().unwrap();
        assert!(!forward_is_per_vm(&fixed));
        let a = Uuid::parse_str("5e1b9bd3-64e2-4d6a-8c3a-0d2a4a7f2b11").unwrap();
        assert_eq!(forward_for(&fixed, &main(Some(a))), Ok(None));
        let tcp: Endpoint = "tcp:127.0.0.1:4444".parse().unwrap();
        assert_eq!(forward_for(&tcp, &main(None)), Ok(None));

        let per_vm: Endpoint = "unix:/run/vms/{uuid}/in.sock".parse().unwrap();
        assert!(forward_is_per_vm(&per_vm));
        let want = Endpoint::Unix("/run/vms/5e1b9bd3-64e2-4d6a-8c3a-0d2a4a7f2b11/in.sock".into());
        assert_eq!(forward_for(&per_vm, &main(Some(a))), Ok(Some(want.clone())));
        let multifd = StreamKind::Multifd {
            uuid: a,
            channel: 1,
        };
        assert_eq!(forward_for(&per_vm, &multifd), Ok(Some(want)));
        for kind in [
            main(None),
            main(Some(Uuid::nil())),
            StreamKind::Multifd {
                uuid: Uuid::nil(),
                channel: 0,
            },
            StreamKind::Preempt,
            StreamKind::Resumed,
        ] {
            let r = forward_for(&per_vm, &kind).unwrap_err();
            assert_eq!(
                (r.class(), r.cause()),
                ("uuid", "missing_for_forward"),
                "{r}"
            );
            assert!(r.public().starts_with("wrong VM"), "{}", r.public());
            assert!(!r.public().contains("/run/vms"), "the path stays private");
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
                Refusal::NotAuthorized(AuthzRefusal::Denied(
                    "DN O=x,CN=y denied by rule 2 (glob \"O=x,*\") of /etc/miggate/acl.json".into(),
                )),
                "certificate DN not authorized",
            ),
            (
                Refusal::Ticket(TicketRefusal::MainTaken {
                    migration: "1".into(),
                }),
                "ticket already used",
            ),
            (
                Refusal::TargetUnreachable {
                    forward: Endpoint::Unix("/run/miggate/in.sock".into()),
                    error: std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
                },
                "the target is not ready for this migration",
            ),
            (
                Refusal::Stream(StreamError::Unrecognised(64)),
                "not a QEMU migration stream",
            ),
            (Refusal::Silent(30), "peer sent nothing for 30 s"),
        ];
        for (r, public) in cases {
            assert_eq!(r.public(), public, "{r}");
        }
    }
}
