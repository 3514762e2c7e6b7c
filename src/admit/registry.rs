//! Registered incoming migrations (managed mode, `miggate daemon`).
//!
//! A registration says which VM may arrive, from whom, where it goes, with
//! how many channels, until when. It yields a one-shot ticket that a miggate
//! source presents in its hello; every channel of that one migration (the
//! main one and each multifd one) presents the same ticket. It is spent when the
//! migration ends, succeeded or failed: state lives here, in the daemon, and
//! nothing the client hands back is trusted beyond the ticket itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::ticket::{Ticket, TicketHash};
use super::{check_stream, AuthzRefusal, Expectation, NbdRefusal, Refusal, TicketRefusal};
use crate::authz::{Authz, Decision};
use crate::net::Endpoint;
use crate::relay::Counters;
use crate::wire::qemu::StreamKind;

/// How many refusals of one migration are kept for the API.
const KEPT_REFUSALS: usize = 16;

/// What an operator registers.
pub struct IncomingSpec {
    pub vm_uuid: Option<Uuid>,
    /// Who may send it.
    pub allow: Arc<dyn Authz>,
    /// `allow` in words, for the API.
    pub allow_desc: String,
    pub forward: Endpoint,
    /// Channels the migration will open: 1 main + (channels - 1) multifd.
    pub channels: u32,
    /// The daemon's listeners (indices of `[[target]]`) this migration may
    /// arrive on: each has its own CA, so a ticket is only as good as the
    /// CA of the listener it was meant for.
    pub listeners: Vec<usize>,
    /// The ticket is refused after this long if the migration has not started.
    pub ttl: Duration,
    /// Storage migration: the NBD exports its source may open, one
    /// channel each at a time (empty: NBD channels are refused).
    pub disks: Vec<String>,
    /// The target QEMU's NBD server, where those channels go.
    pub nbd_forward: Option<Endpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for its source.
    Registered,
    /// At least one channel admitted, not all ended.
    Active,
    /// Postcopy cut: its channels failed while the target QEMU is
    /// `postcopy-paused`. The guest runs on the target with pages still on
    /// the source; nothing is admitted until `recover` (or the recovery
    /// deadline, which fails it).
    Paused,
    /// `recover` issued a fresh ticket: waiting for the source QEMU's
    /// resumed main channel (then Active again).
    Recovering,
    Completed,
    Failed,
    Cancelled,
    /// Never started before its expiry.
    Expired,
}

impl Phase {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            Phase::Registered | Phase::Active | Phase::Paused | Phase::Recovering
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Registered => "registered",
            Phase::Active => "active",
            Phase::Paused => "paused",
            Phase::Recovering => "recovering",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
            Phase::Expired => "expired",
        }
    }
}

/// The API's view of one migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationView {
    pub id: String,
    pub state: Phase,
    pub vm_uuid: Option<Uuid>,
    pub allow: String,
    pub forward: String,
    pub peer_dn: Option<String>,
    pub channels_expected: u32,
    pub channels_seen: u32,
    pub channels_open: u32,
    /// Bytes from the source to the target QEMU.
    pub bytes_sent: u64,
    /// Bytes back from the target QEMU (return path).
    pub bytes_recv: u64,
    /// Average source->target rate since the first channel was admitted.
    pub rate_bytes_per_sec: u64,
    pub registered_at: String,
    pub expires_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// Why it failed, was cancelled or expired.
    pub reason: Option<String>,
    /// Recent refused connections that presented this migration's ticket.
    pub refusals: Vec<String>,
    /// Paused or recovering: until when it may be recovered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover_by: Option<String>,
    /// Recoveries issued so far (each with its own ticket).
    #[serde(default)]
    pub recoveries: u32,
    /// Storage migration: each registered disk's NBD traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskView>,
}

/// One disk of a storage migration, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    pub export: String,
    /// An NBD channel for it is open now.
    pub open: bool,
    /// NBD channels admitted for it so far (a client may reconnect).
    pub channels_seen: u32,
    /// Bytes from the source's NBD client (writes, mostly).
    pub bytes_sent: u64,
    /// Bytes back from the target QEMU's NBD server (replies).
    pub bytes_recv: u64,
}

/// One registered disk's live state.
struct Disk {
    export: String,
    open: bool,
    seen: u32,
    counters: Arc<Counters>,
}

struct Inner {
    phase: Phase,
    peer_dn: Option<String>,
    seen: u32,
    open: u32,
    main_seen: bool,
    /// Multifd channels admitted (slots taken); at most channels - 1.
    multifd_seen: u32,
    /// The postcopy preempt channel (joined to the main channel) came.
    preempt_seen: bool,
    main_result: Option<Result<(), String>>,
    started: Option<(SystemTime, Instant)>,
    ended: Option<SystemTime>,
    reason: Option<String>,
    counters: Vec<Arc<Counters>>,
    refusals: VecDeque<String>,
    /// The ticket that admits channels now; earlier ones (a recovery
    /// replaces it) are in `spent`.
    ticket: TicketHash,
    spent: Vec<TicketHash>,
    /// Set once paused: the recovery deadline, and the pending recovery.
    recover_by: Option<SystemTime>,
    recovery: Option<Recovery>,
    recoveries: u32,
    /// Failed at its recovery deadline: never paused again.
    given_up: bool,
    /// The registered disks (storage migration), in the spec's order.
    disks: Vec<Disk>,
}

/// A recovery issued by [`Migration::recover`], until its resumed main
/// channel is admitted.
struct Recovery {
    /// The fresh ticket is refused after this.
    expires: SystemTime,
}

/// Why a migration cannot be recovered. `Display` is the API's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoverRefusal {
    #[error("migration {id} is {} and not paused in postcopy: only a migration whose channels were cut while its target QEMU is postcopy-paused can be recovered", .phase.as_str())]
    NotPaused { id: String, phase: Phase },
    #[error("migration {id} is already being recovered (a recovery ticket was issued; it expires at {expires})")]
    Recovering { id: String, expires: String },
    #[error("migration {id} was not recovered before {deadline}")]
    TooLate { id: String, deadline: String },
}

pub struct Migration {
    pub id: String,
    spec: IncomingSpec,
    registered: SystemTime,
    expires: SystemTime,
    inner: Mutex<Inner>,
    cancel: watch::Sender<bool>,
    /// Main channels of this migration being forwarded (QEMU <= 7.2 needs
    /// the main channel connected first; see gate::target).
    pub mains: watch::Sender<usize>,
    /// Becomes true when the phase is final (see [`Migration::ended`]).
    ended: watch::Sender<bool>,
    changed: watch::Sender<u64>,
}

pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".into())
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Migration({})", self.id)
    }
}

impl Migration {
    pub fn forward(&self) -> &Endpoint {
        &self.spec.forward
    }

    /// The daemon's listeners (indices) it may arrive on.
    pub fn listeners(&self) -> &[usize] {
        &self.spec.listeners
    }

    pub fn vm_uuid(&self) -> Option<Uuid> {
        self.spec.vm_uuid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keep_refusal(inner: &mut Inner, what: String) {
        if inner.refusals.len() == KEPT_REFUSALS {
            inner.refusals.pop_front();
        }
        inner.refusals.push_back(what);
    }

    /// Records a refused channel. With `burn`, a registered migration whose
    /// ticket came with the wrong peer or the wrong VM is burnt: whoever
    /// holds the ticket is not who was expected, so it must not be tried
    /// again. An active one keeps going; only the intruding channel is
    /// refused. Refusals that say nothing about who holds the ticket (no
    /// slot left, wrong listener) never burn it.
    fn refuse(&self, inner: &mut Inner, r: Refusal, burn: bool) -> Refusal {
        Self::keep_refusal(inner, r.to_string());
        if burn && inner.phase == Phase::Registered {
            self.end(inner, Phase::Failed, format!("ticket refused: {r}"));
        }
        self.changed.send_modify(|g| *g += 1);
        r
    }

    /// Moves to a final phase and wakes whoever awaits [`Migration::ended`].
    fn end(&self, inner: &mut Inner, phase: Phase, reason: String) {
        debug_assert!(phase.is_final());
        inner.phase = phase;
        inner.ended = Some(SystemTime::now());
        inner.reason = Some(reason);
        self.ended.send_replace(true);
    }

    /// Due for expiry: the time is up and the migration has not really
    /// started (no main channel; multifd channels alone do not count, they
    /// cannot carry a migration without it). A disk being copied (an open
    /// NBD channel: libvirt's order mirrors the disks before the RAM
    /// migration starts) holds the expiry off while it lasts.
    fn expiry_due(&self, inner: &Inner, now: SystemTime) -> bool {
        matches!(inner.phase, Phase::Registered | Phase::Active)
            && !inner.main_seen
            && !inner.disks.iter().any(|d| d.open)
            && now >= self.expires
    }

    fn expired_refusal(&self) -> Refusal {
        TicketRefusal::Expired {
            migration: self.id.clone(),
            at: rfc3339(self.expires),
        }
        .into()
    }

    /// Refuses a ticket presented on a listener it was not registered for.
    /// Recorded for the API, never burnt: the real source may still come
    /// through the right listener.
    pub fn check_listener(&self, listener: usize) -> Result<(), Refusal> {
        if self.spec.listeners.contains(&listener) {
            return Ok(());
        }
        let mut inner = self.lock();
        let r = TicketRefusal::WrongListener {
            migration: self.id.clone(),
        }
        .into();
        Err(self.refuse(&mut inner, r, false))
    }

    /// Resolves once the migration has ended (completed, failed, cancelled
    /// or expired).
    pub async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Admission of one channel that presented this migration's ticket.
    pub fn admit_channel(
        self: &Arc<Self>,
        peer_dn: &str,
        kind: &StreamKind,
    ) -> Result<ChannelGuard, Refusal> {
        self.admit_at(peer_dn, kind, SystemTime::now())
    }

    fn admit_at(
        self: &Arc<Self>,
        peer_dn: &str,
        kind: &StreamKind,
        now: SystemTime,
    ) -> Result<ChannelGuard, Refusal> {
        let mut inner = self.lock();
        let spent = match inner.phase {
            _ if self.expiry_due(&inner, now) => {
                self.end(
                    &mut inner,
                    Phase::Expired,
                    "ticket expired before the migration started".into(),
                );
                Some(self.expired_refusal())
            }
            Phase::Registered | Phase::Active => None,
            Phase::Paused => Some(
                TicketRefusal::Paused {
                    migration: self.id.clone(),
                }
                .into(),
            ),
            Phase::Recovering => match &inner.recovery {
                Some(r) if now >= r.expires => Some(
                    TicketRefusal::Expired {
                        migration: self.id.clone(),
                        at: rfc3339(r.expires),
                    }
                    .into(),
                ),
                _ => None,
            },
            Phase::Expired => Some(self.expired_refusal()),
            Phase::Cancelled => Some(
                TicketRefusal::Cancelled {
                    migration: self.id.clone(),
                }
                .into(),
            ),
            Phase::Completed | Phase::Failed => Some(
                TicketRefusal::Spent {
                    migration: self.id.clone(),
                    phase: inner.phase,
                }
                .into(),
            ),
        };
        // Replays and late channels are kept too: the API shows who tried.
        if let Some(r) = spent {
            return Err(self.refuse(&mut inner, r, true));
        }
        // A recovery admits its resumed main channel first and only; a
        // resumed channel is nothing else's.
        let recovering = inner.phase == Phase::Recovering;
        if recovering != matches!(kind, StreamKind::Resumed) {
            let r = if recovering {
                TicketRefusal::RecoveryOnly {
                    migration: self.id.clone(),
                }
            } else {
                TicketRefusal::NotRecovering {
                    migration: self.id.clone(),
                }
            };
            return Err(self.refuse(&mut inner, r.into(), true));
        }
        if let Decision::Deny { reason } = self.spec.allow.check(peer_dn) {
            let r = AuthzRefusal::Denied(reason).into();
            return Err(self.refuse(&mut inner, r, true));
        }
        if let Some(first) = &inner.peer_dn {
            if first != peer_dn {
                let r = AuthzRefusal::TicketInUse {
                    peer: peer_dn.to_string(),
                    migration: self.id.clone(),
                    first: first.clone(),
                }
                .into();
                return Err(self.refuse(&mut inner, r, true));
            }
        }
        if let StreamKind::Nbd { export } = kind {
            return self.admit_disk(&mut inner, peer_dn, export, now);
        }
        let expect = Expectation {
            uuid: self.spec.vm_uuid,
        };
        if let Err(r) = check_stream(&expect, kind) {
            return Err(self.refuse(&mut inner, r, true));
        }
        // One slot per kind: a multifd channel cannot take the main
        // channel's, nor the other way round. The preempt channel joined
        // a live main channel (see `binding`), so it never comes first.
        let is_main = matches!(kind, StreamKind::Main { .. } | StreamKind::Resumed);
        let is_preempt = matches!(kind, StreamKind::Preempt);
        let multifd_slots = self.spec.channels.saturating_sub(1);
        if is_main && inner.main_seen && !recovering {
            let r = TicketRefusal::MainTaken {
                migration: self.id.clone(),
            }
            .into();
            return Err(self.refuse(&mut inner, r, false));
        }
        if is_preempt && (inner.preempt_seen || !inner.main_seen) {
            let r = TicketRefusal::PreemptTaken {
                migration: self.id.clone(),
            }
            .into();
            return Err(self.refuse(&mut inner, r, false));
        }
        if !is_main && !is_preempt && inner.multifd_seen >= multifd_slots {
            let r = TicketRefusal::SlotsFull {
                migration: self.id.clone(),
                channels: self.spec.channels,
            }
            .into();
            return Err(self.refuse(&mut inner, r, false));
        }
        inner.phase = Phase::Active;
        inner.recovery = None;
        inner.peer_dn = Some(peer_dn.to_string());
        inner.started.get_or_insert((now, Instant::now()));
        inner.seen += 1;
        inner.open += 1;
        inner.main_seen |= is_main;
        inner.preempt_seen |= is_preempt;
        inner.multifd_seen += u32::from(!is_main && !is_preempt);
        let counters = Arc::new(Counters::default());
        inner.counters.push(counters.clone());
        self.changed.send_modify(|g| *g += 1);
        Ok(ChannelGuard {
            mig: self.clone(),
            slot: if is_main {
                Slot::Main
            } else if is_preempt {
                Slot::Preempt
            } else {
                Slot::Multifd
            },
            counters,
            forward: self.spec.forward.clone(),
            result: None,
        })
    }

    /// An NBD channel (the peer and the phase already checked): its
    /// export must be a registered disk without an open channel.
    fn admit_disk(
        self: &Arc<Self>,
        inner: &mut Inner,
        peer_dn: &str,
        export: &str,
        now: SystemTime,
    ) -> Result<ChannelGuard, Refusal> {
        let (Some(forward), false) = (&self.spec.nbd_forward, inner.disks.is_empty()) else {
            let r = NbdRefusal::NoDisks {
                migration: self.id.clone(),
            };
            return Err(self.refuse(inner, r.into(), false));
        };
        let Some(i) = inner.disks.iter().position(|d| d.export == export) else {
            let r = NbdRefusal::NotRegistered {
                export: export.to_owned(),
                migration: Some(self.id.clone()),
            };
            return Err(self.refuse(inner, r.into(), false));
        };
        if inner.disks[i].open {
            let r = NbdRefusal::Busy {
                export: export.to_owned(),
                migration: self.id.clone(),
            };
            return Err(self.refuse(inner, r.into(), false));
        }
        let disk = &mut inner.disks[i];
        disk.open = true;
        disk.seen += 1;
        let counters = disk.counters.clone();
        inner.phase = Phase::Active;
        inner.peer_dn = Some(peer_dn.to_string());
        inner.started.get_or_insert((now, Instant::now()));
        inner.open += 1;
        self.changed.send_modify(|g| *g += 1);
        Ok(ChannelGuard {
            mig: self.clone(),
            slot: Slot::Disk(i),
            counters,
            forward: forward.clone(),
            result: None,
        })
    }

    /// The target QEMU says `postcopy-paused` after the channels failed:
    /// the migration waits for a recovery until `window` has passed,
    /// instead of failing. False (nothing changes) unless it had failed,
    /// after a main channel, and its recovery deadline (set by the first
    /// pause) has not passed.
    pub fn pause(&self, reason: String, window: Duration) -> bool {
        let now = SystemTime::now();
        let mut inner = self.lock();
        let deadline = *inner.recover_by.get_or_insert(now + window);
        // Completed too: a source that pauses (migrate-pause) closes its
        // channels cleanly; the target QEMU knows better.
        let ended = matches!(inner.phase, Phase::Failed | Phase::Completed);
        if !ended || !inner.main_seen || inner.given_up || now >= deadline {
            return false;
        }
        inner.phase = Phase::Paused;
        inner.reason = Some(reason);
        inner.ended = None;
        self.ended.send_replace(false);
        drop(inner);
        tracing::info!(migration = %self.id, "postcopy paused: waiting for a recovery");
        self.changed.send_modify(|g| *g += 1);
        true
    }

    /// Starts the recovery of a paused migration: a fresh one-shot ticket,
    /// valid for the registration's ticket lifetime (within the recovery
    /// deadline), that admits only the resumed main channel (from the
    /// original peer) and then its preempt channel. Earlier tickets stay
    /// spent.
    pub fn recover(&self) -> Result<(Ticket, SystemTime), RecoverRefusal> {
        self.recover_at(SystemTime::now())
    }

    fn recover_at(&self, now: SystemTime) -> Result<(Ticket, SystemTime), RecoverRefusal> {
        let mut inner = self.lock();
        match (inner.phase, &inner.recovery) {
            (Phase::Paused, _) => {}
            (Phase::Recovering, Some(r)) => {
                return Err(RecoverRefusal::Recovering {
                    id: self.id.clone(),
                    expires: rfc3339(r.expires),
                })
            }
            (phase, _) => {
                return Err(RecoverRefusal::NotPaused {
                    id: self.id.clone(),
                    phase,
                })
            }
        }
        let deadline = inner.recover_by.unwrap_or(now);
        if now >= deadline {
            return Err(RecoverRefusal::TooLate {
                id: self.id.clone(),
                deadline: rfc3339(deadline),
            });
        }
        let ticket = Ticket::generate();
        let old = std::mem::replace(&mut inner.ticket, ticket.hash());
        inner.spent.push(old);
        let expires = (now + self.spec.ttl).min(deadline);
        inner.recovery = Some(Recovery { expires });
        inner.recoveries += 1;
        inner.phase = Phase::Recovering;
        inner.reason = None;
        inner.main_result = None;
        inner.preempt_seen = false;
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
        Ok((ticket, expires))
    }

    /// The recovery could not be set up (the target QEMU refused
    /// `migrate-recover`): paused again, its fresh ticket spent.
    pub fn recover_failed(&self, why: String) {
        let mut inner = self.lock();
        if inner.phase == Phase::Recovering {
            Self::spend_ticket(&mut inner);
            inner.phase = Phase::Paused;
            inner.recovery = None;
            inner.reason = Some(why);
        }
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
    }

    /// The current ticket joins the spent ones; an unknown one (never
    /// handed out) replaces it.
    fn spend_ticket(inner: &mut Inner) {
        let old = std::mem::replace(&mut inner.ticket, Ticket::generate().hash());
        inner.spent.push(old);
    }

    /// Whether `hash` is a ticket this migration issued and no longer
    /// takes (the first one after a recovery, or a failed recovery's).
    fn spent_ticket(&self, hash: &TicketHash) -> bool {
        let mut spent = false;
        for h in &self.lock().spent {
            spent |= h.matches(hash);
        }
        spent
    }

    fn current_ticket(&self, hash: &TicketHash) -> bool {
        self.lock().ticket.matches(hash)
    }

    /// Resolves when the operator cancels this migration.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn cancel(&self) {
        let mut inner = self.lock();
        if !inner.phase.is_final() {
            self.end(
                &mut inner,
                Phase::Cancelled,
                "cancelled by the operator".into(),
            );
        }
        drop(inner);
        self.cancel.send_replace(true);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Replaces the outcome the channels suggested with the target QEMU's
    /// own verdict (QMP-forward registrations): the gateway sees sockets
    /// close, only QEMU knows whether it loaded the VM. A cancellation stays.
    pub fn settle(&self, qemu_completed: bool, reason: Option<String>) {
        let mut inner = self.lock();
        // Failed at its recovery deadline: that is the verdict.
        if matches!(inner.phase, Phase::Completed | Phase::Failed) && !inner.given_up {
            let phase = if qemu_completed {
                Phase::Completed
            } else {
                Phase::Failed
            };
            if phase != inner.phase {
                tracing::info!(
                    migration = %self.id,
                    from = inner.phase.as_str(),
                    to = phase.as_str(),
                    "target QEMU's own verdict overrides the channels'"
                );
            }
            inner.phase = phase;
            inner.reason = if qemu_completed { None } else { reason };
        }
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Ends a registration whose main channel has not come, once its time
    /// is up; multifd channels waiting for it are woken and cut.
    fn expire_if_due(&self, now: SystemTime) {
        let mut inner = self.lock();
        let deadline_passed = inner.recover_by.is_some_and(|d| now >= d);
        if matches!(inner.phase, Phase::Paused | Phase::Recovering) && deadline_passed {
            let deadline = rfc3339(inner.recover_by.unwrap_or(now));
            inner.given_up = true;
            self.end(
                &mut inner,
                Phase::Failed,
                format!("postcopy paused and not recovered before {deadline}"),
            );
            self.changed.send_modify(|g| *g += 1);
            return;
        }
        // A recovery ticket unused in time: paused again, for another.
        if inner.phase == Phase::Recovering
            && inner.recovery.as_ref().is_some_and(|r| now >= r.expires)
        {
            Self::spend_ticket(&mut inner);
            inner.phase = Phase::Paused;
            inner.recovery = None;
            inner.reason = Some(
                "the recovery ticket expired before the resumed main channel came; recover again"
                    .into(),
            );
            self.changed.send_modify(|g| *g += 1);
            return;
        }
        if self.expiry_due(&inner, now) {
            self.end(
                &mut inner,
                Phase::Expired,
                "ticket expired before the migration started".into(),
            );
            self.changed.send_modify(|g| *g += 1);
        }
    }

    fn ended_at(&self) -> Option<SystemTime> {
        self.lock().ended
    }

    pub fn view(&self) -> MigrationView {
        let inner = self.lock();
        let sent: u64 = inner.counters.iter().map(|c| c.forward()).sum();
        let recv: u64 = inner.counters.iter().map(|c| c.back()).sum();
        let rate = match (inner.started, inner.ended) {
            (Some((start, _)), Some(end)) => {
                let secs = end.duration_since(start).unwrap_or_default().as_secs_f64();
                (sent as f64 / secs.max(0.001)) as u64
            }
            (Some((_, t0)), None) => (sent as f64 / t0.elapsed().as_secs_f64().max(0.001)) as u64,
            _ => 0,
        };
        MigrationView {
            id: self.id.clone(),
            state: inner.phase,
            vm_uuid: self.spec.vm_uuid,
            allow: self.spec.allow_desc.clone(),
            forward: self.spec.forward.to_string(),
            peer_dn: inner.peer_dn.clone(),
            channels_expected: self.spec.channels,
            channels_seen: inner.seen,
            channels_open: inner.open,
            bytes_sent: sent,
            bytes_recv: recv,
            rate_bytes_per_sec: rate,
            registered_at: rfc3339(self.registered),
            expires_at: rfc3339(self.expires),
            started_at: inner.started.map(|(t, _)| rfc3339(t)),
            ended_at: inner.ended.map(rfc3339),
            reason: inner.reason.clone(),
            refusals: inner.refusals.iter().cloned().collect(),
            recover_by: inner
                .recover_by
                .filter(|_| matches!(inner.phase, Phase::Paused | Phase::Recovering))
                .map(rfc3339),
            recoveries: inner.recoveries,
            disks: inner
                .disks
                .iter()
                .map(|d| DiskView {
                    export: d.export.clone(),
                    open: d.open,
                    channels_seen: d.seen,
                    bytes_sent: d.counters.forward(),
                    bytes_recv: d.counters.back(),
                })
                .collect(),
        }
    }
}

/// One admitted channel. Finish it with its result; dropping it unfinished
/// counts as a failure. When the last channel of a migration whose main
/// channel was seen ends, the migration ends and its ticket is spent. A
/// multifd channel that ends before any main channel came gives its slot
/// back: it carried nothing (multifd channels are forwarded only once the
/// main is), and when it was the only one the registration is waiting for
/// its source again, until it expires.
pub struct ChannelGuard {
    mig: Arc<Migration>,
    slot: Slot,
    counters: Arc<Counters>,
    /// Where it goes: the migration's forward, or its NBD server.
    forward: Endpoint,
    result: Option<Result<(), String>>,
}

/// Which of its migration's slots a channel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Main,
    Multifd,
    Preempt,
    /// An NBD channel of the disk at this index.
    Disk(usize),
}

impl std::fmt::Debug for ChannelGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelGuard({}, {:?})", self.mig.id, self.slot)
    }
}

impl ChannelGuard {
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
    pub fn migration(&self) -> &Arc<Migration> {
        &self.mig
    }
    /// Where the channel goes (the target QEMU, or its NBD server).
    pub fn forward(&self) -> &Endpoint {
        &self.forward
    }
    pub fn finish(mut self, result: Result<(), String>) {
        self.result = Some(result);
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err("channel dropped".into()));
        let mut inner = self.mig.lock();
        inner.open -= 1;
        let is_main = self.slot == Slot::Main;
        if let Slot::Disk(i) = self.slot {
            inner.disks[i].open = false;
            // A disk copy that broke is the migration's failure, whatever
            // its main channel says (unless something said so first).
            if let (Err(e), None) = (&result, &inner.reason) {
                if inner.main_seen && !inner.phase.is_final() {
                    inner.reason = Some(format!("disk {}: {e}", inner.disks[i].export));
                }
            }
        }
        if !is_main && !inner.main_seen {
            match self.slot {
                Slot::Disk(_) => {}
                _ => {
                    inner.seen -= 1;
                    inner.multifd_seen -= 1;
                }
            }
            if let Err(e) = &result {
                Migration::keep_refusal(&mut inner, e.clone());
            }
            if inner.open == 0 && inner.phase == Phase::Active {
                inner.phase = Phase::Registered;
                inner.peer_dn = None;
                inner.started = None;
                inner.counters.clear();
                if self.mig.expiry_due(&inner, SystemTime::now()) {
                    self.mig.end(
                        &mut inner,
                        Phase::Expired,
                        "ticket expired before the migration started".into(),
                    );
                }
            }
            drop(inner);
            self.mig.changed.send_modify(|g| *g += 1);
            return;
        }
        // The main channel decides: QEMU fails the main channel when a
        // multifd channel breaks, while a target QEMU that has finished
        // loading may reset multifd sockets the source has not closed yet,
        // which is no failure. A multifd error stays in that connection's
        // own outcome record.
        if is_main {
            inner.main_result = Some(result.clone());
        }
        if inner.open == 0 && inner.main_seen && !inner.phase.is_final() {
            let failed = match &inner.main_result {
                Some(Err(e)) => Some(e.clone()),
                _ => inner.reason.clone(),
            };
            inner.phase = if failed.is_some() {
                Phase::Failed
            } else {
                Phase::Completed
            };
            inner.reason = failed;
            inner.ended = Some(SystemTime::now());
            self.mig.ended.send_replace(true);
        }
        drop(inner);
        self.mig.changed.send_modify(|g| *g += 1);
    }
}

/// All registrations of one daemon.
pub struct Registry {
    migrations: Mutex<Vec<Arc<Migration>>>,
    /// Ended migrations stay visible in the API this long.
    retention: Duration,
    changed: watch::Sender<u64>,
}

impl Registry {
    pub fn new(retention: Duration) -> Arc<Registry> {
        Arc::new(Registry {
            migrations: Mutex::new(Vec::new()),
            retention,
            changed: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Migration>>> {
        self.migrations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an incoming migration; the ticket is returned once and
    /// never stored.
    pub fn register(&self, spec: IncomingSpec) -> (Arc<Migration>, Ticket) {
        let ticket = Ticket::generate();
        let now = SystemTime::now();
        let disks = spec
            .disks
            .iter()
            .map(|export| Disk {
                export: export.clone(),
                open: false,
                seen: 0,
                counters: Arc::default(),
            })
            .collect();
        let mig = Arc::new(Migration {
            id: Uuid::new_v4().to_string(),
            registered: now,
            expires: now + spec.ttl,
            spec,
            inner: Mutex::new(Inner {
                phase: Phase::Registered,
                peer_dn: None,
                seen: 0,
                open: 0,
                main_seen: false,
                multifd_seen: 0,
                preempt_seen: false,
                main_result: None,
                started: None,
                ended: None,
                reason: None,
                counters: Vec::new(),
                refusals: VecDeque::new(),
                ticket: ticket.hash(),
                spent: Vec::new(),
                recover_by: None,
                recovery: None,
                recoveries: 0,
                given_up: false,
                disks,
            }),
            cancel: watch::Sender::new(false),
            mains: watch::Sender::new(0),
            ended: watch::Sender::new(false),
            changed: self.changed.clone(),
        });
        self.lock().push(mig.clone());
        self.changed.send_modify(|g| *g += 1);
        (mig, ticket)
    }

    /// The migration a ticket belongs to. Every registration's hash is
    /// compared (in constant time), so the time taken says nothing about
    /// which one, if any, matched.
    pub fn find_by_ticket(&self, ticket: &Ticket) -> Result<Arc<Migration>, Refusal> {
        let hash = ticket.hash();
        let mut found = None;
        let mut spent = None;
        for m in self.lock().iter() {
            if m.current_ticket(&hash) {
                found = Some(m.clone());
            }
            if m.spent_ticket(&hash) {
                spent = Some(m.clone());
            }
        }
        // A ticket a recovery replaced: spent, whatever the phase now.
        if let Some(m) = spent {
            let r = TicketRefusal::Replaced {
                migration: m.id.clone(),
            };
            let mut inner = m.lock();
            return Err(m.refuse(&mut inner, r.into(), false));
        }
        found.ok_or(TicketRefusal::Unknown.into())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Migration>> {
        self.lock().iter().find(|m| m.id == id).cloned()
    }

    pub fn list(&self) -> Vec<MigrationView> {
        self.lock().iter().map(|m| m.view()).collect()
    }

    /// Cancels a migration: its channels are cut, its ticket is spent.
    pub fn cancel(&self, id: &str) -> Option<MigrationView> {
        let m = self.get(id)?;
        m.cancel();
        Some(m.view())
    }

    /// Expires registrations whose time is up and forgets ended ones after
    /// the retention time. Call it periodically.
    pub fn sweep(&self) {
        self.sweep_at(SystemTime::now())
    }

    fn sweep_at(&self, now: SystemTime) {
        let mut list = self.lock();
        for m in list.iter() {
            m.expire_if_due(now);
        }
        list.retain(|m| match m.ended_at() {
            Some(end) => now.duration_since(end).unwrap_or_default() < self.retention,
            None => true,
        });
    }

    /// Counts state changes of any migration; await `changed()` on it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Starts the recovery of paused migration `id` (see
    /// [`Migration::recover`]).
    pub fn recover(&self, id: &str) -> Option<Result<(Ticket, SystemTime), RecoverRefusal>> {
        Some(self.get(id)?.recover())
    }

    /// Migrations not yet ended (for metrics).
    pub fn active(&self) -> usize {
        self.lock()
            .iter()
            .filter(|m| m.lock().phase == Phase::Active)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Simple;

    const DN: &str = "O=t,CN=src";

    fn spec(vm: Option<Uuid>, channels: u32, ttl: Duration) -> IncomingSpec {
        IncomingSpec {
            vm_uuid: vm,
            allow: Arc::new(Simple::new(DN)),
            allow_desc: format!("identity {DN}"),
            forward: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            channels,
            ttl,
            listeners: vec![0],
            disks: Vec::new(),
            nbd_forward: None,
        }
    }

    fn main(vm: Uuid) -> StreamKind {
        StreamKind::Main {
            uuid: Some(vm),
            machine: None,
        }
    }

    #[test]
    fn ticket_admits_its_channels_once_then_is_spent() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let (mig, ticket) = reg.register(spec(Some(vm), 2, Duration::from_secs(60)));
        let found = reg.find_by_ticket(&ticket).unwrap();
        assert_eq!(found.id, mig.id);
        let g1 = found.admit_channel(DN, &main(vm)).unwrap();
        let g2 = found
            .admit_channel(
                DN,
                &StreamKind::Multifd {
                    uuid: vm,
                    channel: 0,
                },
            )
            .unwrap();
        // A third channel, or a second main, is refused.
        let extra = found.admit_channel(
            DN,
            &StreamKind::Multifd {
                uuid: vm,
                channel: 1,
            },
        );
        assert!(extra.unwrap_err().to_string().contains("2 channel(s)"));
        assert_eq!(mig.view().state, Phase::Active);
        g2.finish(Ok(()));
        g1.finish(Ok(()));
        let v = mig.view();
        assert_eq!(v.state, Phase::Completed, "{v:?}");
        assert_eq!(v.refusals.len(), 1);
        let replay = found.admit_channel(DN, &main(vm)).unwrap_err();
        assert!(
            replay.to_string().contains("ticket already used"),
            "{replay}"
        );
    }

    #[test]
    fn wrong_vm_or_peer_burns_a_fresh_ticket() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let r = mig
            .admit_channel(DN, &main(Uuid::from_u128(2)))
            .unwrap_err();
        assert!(r.to_string().starts_with("VM UUID mismatch"), "{r}");
        assert_eq!(mig.view().state, Phase::Failed);
        let again = mig.admit_channel(DN, &main(vm)).unwrap_err();
        assert!(again.to_string().contains("ticket already used"), "{again}");

        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let r = mig.admit_channel("O=t,CN=other", &main(vm)).unwrap_err();
        assert!(matches!(r, Refusal::NotAuthorized(_)), "{r}");
        assert_eq!(mig.view().state, Phase::Failed);
    }

    #[test]
    fn expired_cancelled_unknown() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::ZERO));
        let r = mig.admit_channel(DN, &main(vm)).unwrap_err();
        assert!(r.to_string().contains("expired"), "{r}");
        assert_eq!(mig.view().state, Phase::Expired);

        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let guard = mig.admit_channel(DN, &main(vm)).unwrap();
        reg.cancel(&mig.id).unwrap();
        guard.finish(Err("cut".into()));
        let v = mig.view();
        assert_eq!(v.state, Phase::Cancelled);
        assert_eq!(v.reason.as_deref(), Some("cancelled by the operator"));

        let r = reg.find_by_ticket(&Ticket::generate()).unwrap_err();
        assert!(r.to_string().contains("unknown ticket"), "{r}");
    }

    #[test]
    fn qemu_verdict_settles_the_outcome() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        mig.admit_channel(DN, &main(vm))
            .unwrap()
            .finish(Err("target->source: connection reset".into()));
        assert_eq!(mig.view().state, Phase::Failed);
        mig.settle(true, None);
        let v = mig.view();
        assert_eq!((v.state, v.reason), (Phase::Completed, None));
        mig.settle(false, Some("target QEMU: load failed".into()));
        assert_eq!(mig.view().state, Phase::Failed);
        // Not before the end, and never over a cancellation.
        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        mig.settle(true, None);
        assert_eq!(mig.view().state, Phase::Registered);
        reg.cancel(&mig.id);
        mig.settle(true, None);
        assert_eq!(mig.view().state, Phase::Cancelled);
    }

    #[test]
    fn failed_main_fails_the_migration_and_sweep_forgets_it() {
        let reg = Registry::new(Duration::ZERO);
        let vm = Uuid::from_u128(1);
        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        mig.admit_channel(DN, &main(vm))
            .unwrap()
            .finish(Err("source->target: connection reset".into()));
        let v = mig.view();
        assert_eq!(v.state, Phase::Failed);
        assert_eq!(
            v.reason.as_deref(),
            Some("source->target: connection reset")
        );
        reg.sweep();
        assert!(reg.get(&mig.id).is_none());
    }

    fn multifd(vm: Uuid, channel: u8) -> StreamKind {
        StreamKind::Multifd { uuid: vm, channel }
    }

    fn has_ended(mig: &Migration) -> bool {
        *mig.ended.borrow()
    }

    #[test]
    fn slots_are_per_kind() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        // channels = 1: no multifd slot at all. A multifd channel is
        // refused without burning the ticket, and the main still gets in.
        let (mig, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let r = mig.admit_channel(DN, &multifd(vm, 0)).unwrap_err();
        assert!(r.to_string().contains("1 main + 0 multifd"), "{r}");
        assert_eq!(mig.view().state, Phase::Registered);
        let main_guard = mig.admit_channel(DN, &main(vm)).unwrap();
        main_guard.finish(Ok(()));
        assert_eq!(mig.view().state, Phase::Completed);

        // channels = 3: 1 main + 2 multifd; a multifd first does not take
        // the main's slot, a third multifd is refused.
        let (mig, _) = reg.register(spec(Some(vm), 3, Duration::from_secs(60)));
        let m0 = mig.admit_channel(DN, &multifd(vm, 0)).unwrap();
        let m1 = mig.admit_channel(DN, &multifd(vm, 1)).unwrap();
        let r = mig.admit_channel(DN, &multifd(vm, 2)).unwrap_err();
        assert!(r.to_string().contains("all its multifd channels"), "{r}");
        let main_guard = mig.admit_channel(DN, &main(vm)).unwrap();
        assert_eq!(mig.view().channels_seen, 3);
        for g in [m0, m1, main_guard] {
            g.finish(Ok(()));
        }
        assert_eq!(mig.view().state, Phase::Completed);
    }

    #[test]
    fn expiry_holds_until_the_main_channel_arrives() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let ttl = Duration::from_secs(60);
        let (mig, _) = reg.register(spec(Some(vm), 2, ttl));
        let late = mig.expires + Duration::from_secs(1);
        // A multifd channel alone does not start the migration: the main
        // is refused after the expiry, which ends the registration.
        let stray = mig.admit_channel(DN, &multifd(vm, 0)).unwrap();
        assert_eq!(mig.view().state, Phase::Active);
        let r = mig.admit_at(DN, &main(vm), late).unwrap_err();
        assert!(r.to_string().contains("expired at"), "{r}");
        assert_eq!(mig.view().state, Phase::Expired);
        assert!(has_ended(&mig), "waiters of the end are woken");
        stray.finish(Err("cut".into()));
        let v = mig.view();
        assert_eq!((v.state, v.channels_open), (Phase::Expired, 0), "{v:?}");

        // The sweep expires it too, with nothing presented after the expiry.
        let (mig, _) = reg.register(spec(Some(vm), 2, ttl));
        let stray = mig.admit_channel(DN, &multifd(vm, 0)).unwrap();
        reg.sweep_at(mig.expires + Duration::from_secs(1));
        assert_eq!(mig.view().state, Phase::Expired);
        assert!(has_ended(&mig));
        drop(stray);
        assert_eq!(mig.view().state, Phase::Expired);

        // Once the main channel is in, the ticket's expiry no longer
        // matters: the migration has started.
        let (mig, _) = reg.register(spec(Some(vm), 2, ttl));
        let main_guard = mig.admit_channel(DN, &main(vm)).unwrap();
        let late = mig.expires + Duration::from_secs(1);
        let m0 = mig.admit_at(DN, &multifd(vm, 0), late).unwrap();
        reg.sweep_at(late);
        assert_eq!(mig.view().state, Phase::Active);
        m0.finish(Ok(()));
        main_guard.finish(Ok(()));
        assert_eq!(mig.view().state, Phase::Completed);
        assert!(has_ended(&mig));
    }

    #[test]
    fn a_multifd_channel_cut_before_its_main_gives_the_slot_back() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let (mig, _) = reg.register(spec(Some(vm), 2, Duration::from_secs(60)));
        let stray = mig.admit_channel(DN, &multifd(vm, 0)).unwrap();
        stray.finish(Err("no main channel within 10 s".into()));
        let v = mig.view();
        assert_eq!(v.state, Phase::Registered, "{v:?}");
        assert_eq!((v.channels_seen, v.channels_open), (0, 0), "{v:?}");
        assert_eq!(v.peer_dn, None);
        assert_eq!(v.started_at, None);
        assert_eq!(v.refusals, ["no main channel within 10 s"]);
        assert!(!has_ended(&mig));
        // Usable again: the real migration, main and multifd.
        let main_guard = mig.admit_channel(DN, &main(vm)).unwrap();
        let m0 = mig.admit_channel(DN, &multifd(vm, 0)).unwrap();
        m0.finish(Ok(()));
        main_guard.finish(Ok(()));
        assert_eq!(mig.view().state, Phase::Completed);

        // Cut after the ticket's time is up: it expires at once.
        let (mig, _) = reg.register(spec(Some(vm), 2, Duration::ZERO));
        let before_expiry = mig.expires - Duration::from_secs(1);
        let stray = mig.admit_at(DN, &multifd(vm, 0), before_expiry).unwrap();
        drop(stray);
        assert_eq!(mig.view().state, Phase::Expired);
        assert!(has_ended(&mig));
    }

    #[tokio::test]
    async fn ended_wakes_its_waiters_in_every_final_phase() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let wait = |m: Arc<Migration>| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), m.ended())
                    .await
                    .is_ok()
            })
        };
        let (cancelled, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let (expired, _) = reg.register(spec(Some(vm), 2, Duration::from_secs(60)));
        let (burnt, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let (done, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        let waiters: Vec<_> = [&cancelled, &expired, &burnt, &done]
            .into_iter()
            .map(|m| wait(m.clone()))
            .collect();
        reg.cancel(&cancelled.id);
        let _stray = expired.admit_channel(DN, &multifd(vm, 0)).unwrap();
        expired.expire_if_due(expired.expires);
        burnt
            .admit_channel(DN, &main(Uuid::from_u128(2)))
            .unwrap_err();
        done.admit_channel(DN, &main(vm)).unwrap().finish(Ok(()));
        for w in waiters {
            assert!(w.await.unwrap(), "a waiter of the end was left waiting");
        }
    }

    /// A postcopy migration cut (channels failed, target QEMU paused):
    /// paused, not final, nothing admitted; `recover` issues a new ticket
    /// that admits the resumed main channel of the same peer, then its
    /// preempt channel, once; the first ticket stays spent.
    #[test]
    fn a_paused_migration_is_recovered_with_a_new_ticket_once() {
        let reg = Registry::new(Duration::ZERO);
        let vm = Uuid::from_u128(1);
        let (mig, first) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        // Not paused yet: nothing to recover.
        let r = mig.recover().unwrap_err();
        assert!(
            matches!(
                r,
                RecoverRefusal::NotPaused {
                    phase: Phase::Registered,
                    ..
                }
            ),
            "{r}"
        );
        let main_guard = mig.admit_channel(DN, &main(vm)).unwrap();
        let preempt = mig.admit_channel(DN, &StreamKind::Preempt).unwrap();
        // A resumed main channel needs a recovery.
        let r = mig.admit_channel(DN, &StreamKind::Resumed).unwrap_err();
        assert!(r.to_string().contains("not being recovered"), "{r}");
        main_guard.finish(Err("source->target: connection reset".into()));
        preempt.finish(Err("main channel ended".into()));
        assert_eq!(mig.view().state, Phase::Failed);
        assert!(mig.pause(
            "target QEMU: postcopy-paused".into(),
            Duration::from_secs(3600)
        ));
        let v = mig.view();
        assert_eq!(v.state, Phase::Paused);
        assert!(!v.state.is_final());
        assert_eq!(v.reason.as_deref(), Some("target QEMU: postcopy-paused"));
        assert!(v.recover_by.is_some());
        assert!(!has_ended(&mig), "a paused migration has not ended");
        // Paused is not swept, and admits nothing, the first ticket least.
        reg.sweep();
        assert!(reg.get(&mig.id).is_some());
        let r = reg
            .find_by_ticket(&first)
            .unwrap()
            .admit_channel(DN, &StreamKind::Resumed)
            .unwrap_err();
        assert!(r.to_string().contains("is paused in postcopy"), "{r}");

        let (ticket, _) = reg.recover(&mig.id).unwrap().unwrap();
        assert_eq!(mig.view().state, Phase::Recovering);
        assert_eq!(mig.view().recoveries, 1);
        let r = mig.recover().unwrap_err();
        assert!(matches!(r, RecoverRefusal::Recovering { .. }), "{r}");
        // The first ticket is spent; the new one is this migration's.
        let r = reg.find_by_ticket(&first).unwrap_err();
        assert!(
            r.to_string().contains("was replaced by its recovery's"),
            "{r}"
        );
        assert_eq!(r.public(), "ticket already used");
        assert_eq!(mig.view().refusals.len(), 3, "the replay is shown");
        let found = reg.find_by_ticket(&ticket).unwrap();
        assert_eq!(found.id, mig.id);
        // Only the resumed main channel, from the original peer.
        let r = found.admit_channel(DN, &main(vm)).unwrap_err();
        assert!(r.to_string().contains("resumed main channel first"), "{r}");
        let r = found.admit_channel(DN, &StreamKind::Preempt).unwrap_err();
        assert!(r.to_string().contains("resumed main channel first"), "{r}");
        let r = found
            .admit_channel("O=t,CN=other", &StreamKind::Resumed)
            .unwrap_err();
        assert!(matches!(r, Refusal::NotAuthorized(_)), "{r}");
        assert_eq!(
            mig.view().state,
            Phase::Recovering,
            "an intruder burns no recovery"
        );
        let resumed = found.admit_channel(DN, &StreamKind::Resumed).unwrap();
        assert_eq!(mig.view().state, Phase::Active);
        let r = found.admit_channel(DN, &StreamKind::Resumed).unwrap_err();
        assert!(r.to_string().contains("not being recovered"), "{r}");
        let preempt = found.admit_channel(DN, &StreamKind::Preempt).unwrap();
        let r = found.admit_channel(DN, &StreamKind::Preempt).unwrap_err();
        assert!(r.to_string().contains("preempt channel"), "{r}");
        preempt.finish(Ok(()));
        resumed.finish(Ok(()));
        let v = mig.view();
        assert_eq!((v.state, v.reason), (Phase::Completed, None));
        assert!(has_ended(&mig));
        // Spent, both tickets; completed is not recoverable.
        let r = found.admit_channel(DN, &StreamKind::Resumed).unwrap_err();
        assert!(r.to_string().contains("ticket already used"), "{r}");
        assert!(matches!(
            mig.recover().unwrap_err(),
            RecoverRefusal::NotPaused {
                phase: Phase::Completed,
                ..
            }
        ));
        assert!(reg.recover("no-such-id").is_none());
    }

    #[test]
    fn a_recovery_ends_by_its_deadlines() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let cut = |ttl| {
            let (mig, _) = reg.register(spec(Some(vm), 1, ttl));
            mig.admit_channel(DN, &main(vm))
                .unwrap()
                .finish(Err("cut".into()));
            mig
        };
        // A recovery ticket unused in time: paused again, recoverable again.
        let mig = cut(Duration::from_secs(60));
        assert!(mig.pause("paused".into(), Duration::from_secs(3600)));
        let (ticket, expires) = mig.recover().unwrap();
        let r = reg
            .find_by_ticket(&ticket)
            .unwrap()
            .admit_at(DN, &StreamKind::Resumed, expires)
            .unwrap_err();
        assert!(r.to_string().contains("expired at"), "{r}");
        reg.sweep_at(expires);
        let v = mig.view();
        assert_eq!(v.state, Phase::Paused);
        assert!(v.reason.unwrap().contains("recovery ticket expired"));
        let r = reg.find_by_ticket(&ticket).unwrap_err();
        assert!(r.to_string().contains("replaced"), "{r}");
        // A failed set-up (QEMU refused migrate-recover): paused again.
        let (ticket, _) = mig.recover().unwrap();
        mig.recover_failed("target QEMU refused".into());
        assert_eq!(mig.view().state, Phase::Paused);
        assert!(reg.find_by_ticket(&ticket).is_err());
        // Past the recovery deadline: failed for good, not paused again.
        let deadline = SystemTime::now() + Duration::from_secs(3601);
        reg.sweep_at(deadline);
        let v = mig.view();
        assert_eq!(v.state, Phase::Failed);
        assert!(v.reason.unwrap().contains("not recovered before"));
        assert!(!mig.pause("paused".into(), Duration::from_secs(3600)));
        mig.settle(false, Some("target QEMU: postcopy-paused".into()));
        assert!(mig.view().reason.unwrap().contains("not recovered before"));
        // A source that paused (migrate-pause) closed its channels
        // cleanly: the target QEMU's postcopy-paused still pauses it.
        let (clean, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        clean.admit_channel(DN, &main(vm)).unwrap().finish(Ok(()));
        assert_eq!(clean.view().state, Phase::Completed);
        assert!(clean.pause("paused".into(), Duration::from_secs(3600)));
        assert_eq!(clean.view().state, Phase::Paused);
        // Only a migration that had its main channel pauses.
        let (fresh, _) = reg.register(spec(Some(vm), 1, Duration::from_secs(60)));
        assert!(!fresh.pause("paused".into(), Duration::from_secs(3600)));
        assert_eq!(fresh.view().state, Phase::Registered);
    }

    #[test]
    fn a_ticket_is_refused_on_a_listener_it_is_not_bound_to() {
        let reg = Registry::new(Duration::from_secs(60));
        let vm = Uuid::from_u128(1);
        let mut s = spec(Some(vm), 1, Duration::from_secs(60));
        s.listeners = vec![0, 2];
        let (mig, _) = reg.register(s);
        mig.check_listener(0).unwrap();
        mig.check_listener(2).unwrap();
        let r = mig.check_listener(1).unwrap_err();
        assert!(
            r.to_string().contains("not registered on this listener"),
            "{r}"
        );
        // Recorded, not burnt: the real source may use the right listener.
        let v = mig.view();
        assert_eq!(v.state, Phase::Registered);
        assert_eq!(v.refusals.len(), 1);
        mig.admit_channel(DN, &main(vm)).unwrap().finish(Ok(()));
        assert_eq!(mig.view().state, Phase::Completed);
    }
}
