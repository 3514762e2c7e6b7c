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
use super::{check_stream, Expectation, Refusal};
use crate::authz::{Authz, Decision};
use crate::gate::Endpoint;
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
    /// Channels the migration will open: 1 + multifd channels.
    pub channels: u32,
    /// The ticket is refused after this long if the migration has not started.
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for its source.
    Registered,
    /// At least one channel admitted, not all ended.
    Active,
    Completed,
    Failed,
    Cancelled,
    /// Never started before its expiry.
    Expired,
}

impl Phase {
    pub fn is_final(self) -> bool {
        !matches!(self, Phase::Registered | Phase::Active)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Registered => "registered",
            Phase::Active => "active",
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
}

struct Inner {
    phase: Phase,
    peer_dn: Option<String>,
    seen: u32,
    open: u32,
    main_seen: bool,
    main_result: Option<Result<(), String>>,
    started: Option<(SystemTime, Instant)>,
    ended: Option<SystemTime>,
    reason: Option<String>,
    counters: Vec<Arc<Counters>>,
    refusals: VecDeque<String>,
}

pub struct Migration {
    pub id: String,
    spec: IncomingSpec,
    ticket: TicketHash,
    registered: SystemTime,
    expires: SystemTime,
    inner: Mutex<Inner>,
    cancel: watch::Sender<bool>,
    /// Main channels of this migration being forwarded (QEMU <= 7.2 needs
    /// the main channel connected first; see gate::target).
    pub mains: watch::Sender<usize>,
    changed: watch::Sender<u64>,
}

fn rfc3339(t: SystemTime) -> String {
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

    pub fn vm_uuid(&self) -> Option<Uuid> {
        self.spec.vm_uuid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, inner: &mut Inner, r: Refusal) -> Refusal {
        if inner.refusals.len() == KEPT_REFUSALS {
            inner.refusals.pop_front();
        }
        inner.refusals.push_back(r.to_string());
        // A registered migration whose ticket came with the wrong peer or
        // the wrong VM is burnt: whoever holds the ticket is not who was
        // expected, so it must not be tried again. An active one keeps
        // going; only the intruding channel is refused.
        if inner.phase == Phase::Registered {
            inner.phase = Phase::Failed;
            inner.ended = Some(SystemTime::now());
            inner.reason = Some(format!("ticket refused: {r}"));
        }
        self.changed.send_modify(|g| *g += 1);
        r
    }

    /// Admission of one channel that presented this migration's ticket.
    pub fn admit_channel(
        self: &Arc<Self>,
        peer_dn: &str,
        kind: &StreamKind,
    ) -> Result<ChannelGuard, Refusal> {
        let mut inner = self.lock();
        let now = SystemTime::now();
        let spent = match inner.phase {
            Phase::Registered if now >= self.expires => {
                inner.phase = Phase::Expired;
                inner.ended = Some(now);
                inner.reason = Some("ticket expired before the migration started".into());
                Some(Refusal::ticket(
                    "ticket expired",
                    format!(
                        "ticket of migration {} expired at {}",
                        self.id,
                        rfc3339(self.expires)
                    ),
                ))
            }
            Phase::Registered | Phase::Active => None,
            Phase::Expired => Some(Refusal::ticket(
                "ticket expired",
                format!(
                    "ticket of migration {} expired at {}",
                    self.id,
                    rfc3339(self.expires)
                ),
            )),
            Phase::Cancelled => Some(Refusal::ticket(
                "migration cancelled",
                format!("migration {} was cancelled", self.id),
            )),
            Phase::Completed | Phase::Failed => Some(Refusal::ticket(
                "ticket already used",
                format!(
                    "ticket already used: migration {} has ended ({})",
                    self.id,
                    inner.phase.as_str()
                ),
            )),
        };
        // Replays and late channels are kept too: the API shows who tried.
        if let Some(r) = spent {
            return Err(self.refuse(&mut inner, r));
        }
        if let Decision::Deny { reason } = self.spec.allow.check(peer_dn) {
            return Err(self.refuse(&mut inner, Refusal::NotAuthorized(reason)));
        }
        if let Some(first) = &inner.peer_dn {
            if first != peer_dn {
                let r = Refusal::NotAuthorized(format!(
                    "peer {peer_dn} presented the ticket of migration {}, which {first} is already using",
                    self.id
                ));
                return Err(self.refuse(&mut inner, r));
            }
        }
        let expect = Expectation {
            uuid: self.spec.vm_uuid,
        };
        if let Err(r) = check_stream(&expect, kind) {
            return Err(self.refuse(&mut inner, r));
        }
        let is_main = matches!(kind, StreamKind::Main { .. });
        if is_main && inner.main_seen {
            let r = Refusal::ticket(
                "ticket already used",
                format!("migration {} already has its main channel", self.id),
            );
            return Err(self.refuse(&mut inner, r));
        }
        if inner.seen >= self.spec.channels {
            let r = Refusal::ticket(
                "ticket already used",
                format!(
                    "migration {} was registered with {} channel(s) and all have connected",
                    self.id, self.spec.channels
                ),
            );
            return Err(self.refuse(&mut inner, r));
        }
        inner.phase = Phase::Active;
        inner.peer_dn = Some(peer_dn.to_string());
        inner.started.get_or_insert((now, Instant::now()));
        inner.seen += 1;
        inner.open += 1;
        inner.main_seen |= is_main;
        let counters = Arc::new(Counters::default());
        inner.counters.push(counters.clone());
        self.changed.send_modify(|g| *g += 1);
        Ok(ChannelGuard {
            mig: self.clone(),
            is_main,
            counters,
            result: None,
        })
    }

    /// Resolves when the operator cancels this migration.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn cancel(&self) {
        let mut inner = self.lock();
        if !inner.phase.is_final() {
            inner.phase = Phase::Cancelled;
            inner.ended = Some(SystemTime::now());
            inner.reason = Some("cancelled by the operator".into());
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
        if matches!(inner.phase, Phase::Completed | Phase::Failed) {
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

    /// Ends a registration that never started, once its time is up.
    fn expire_if_due(&self, now: SystemTime) {
        let mut inner = self.lock();
        if inner.phase == Phase::Registered && now >= self.expires {
            inner.phase = Phase::Expired;
            inner.ended = Some(now);
            inner.reason = Some("ticket expired before the migration started".into());
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
        }
    }
}

/// One admitted channel. Finish it with its result; dropping it unfinished
/// counts as a failure. When the last channel of a migration whose main
/// channel was seen ends, the migration ends and its ticket is spent.
pub struct ChannelGuard {
    mig: Arc<Migration>,
    is_main: bool,
    counters: Arc<Counters>,
    result: Option<Result<(), String>>,
}

impl std::fmt::Debug for ChannelGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelGuard({}, main={})", self.mig.id, self.is_main)
    }
}

impl ChannelGuard {
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
    pub fn migration(&self) -> &Arc<Migration> {
        &self.mig
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
        // The main channel decides: QEMU fails the main channel when a
        // multifd channel breaks, while a target QEMU that has finished
        // loading may reset multifd sockets the source has not closed yet,
        // which is no failure. A multifd error stays in that connection's
        // own outcome record.
        if self.is_main {
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
        let mig = Arc::new(Migration {
            id: Uuid::new_v4().to_string(),
            ticket: ticket.hash(),
            registered: now,
            expires: now + spec.ttl,
            spec,
            inner: Mutex::new(Inner {
                phase: Phase::Registered,
                peer_dn: None,
                seen: 0,
                open: 0,
                main_seen: false,
                main_result: None,
                started: None,
                ended: None,
                reason: None,
                counters: Vec::new(),
                refusals: VecDeque::new(),
            }),
            cancel: watch::Sender::new(false),
            mains: watch::Sender::new(0),
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
        for m in self.lock().iter() {
            if m.ticket.matches(&hash) {
                found = Some(m.clone());
            }
        }
        found.ok_or_else(|| {
            Refusal::ticket(
                "unknown ticket",
                "unknown ticket: no migration is registered with it",
            )
        })
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
        let now = SystemTime::now();
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
            forward: Endpoint::Tcp("127.0.0.1:1".into()),
            channels,
            ttl,
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
}
