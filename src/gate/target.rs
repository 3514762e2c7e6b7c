//! The target gateway: TLS in, plain out to the target QEMU.
//!
//! Per connection: TLS handshake (client certificate required) -> subject
//! DN -> route:
//! - a miggate source presenting a ticket in its hello: the registered
//!   migration decides (its allowed peers, VM UUID, channels, forward);
//! - otherwise the static route (`miggate target` flags; also the only
//!   route for a QEMU with native TLS, which sends no hello): authz on the
//!   DN, expected UUID, forward.
//!
//! Then the QEMU stream's first bytes are sniffed (main channel or multifd
//! init packet, VM UUID), checked, the target QEMU is connected, the verdict
//! sent, and the relay runs. Nothing reaches the target QEMU before every
//! check has passed, so a refused connection leaves it ready for the right
//! migration.
//!
//! Until it is admitted, a connection costs a bounded amount: it holds one
//! of [`Limits::max_pending`] slots (and of the per-address ones; beyond
//! them it is closed at once), its TLS handshake has its own deadline, and
//! the relay's read buffer comes only with the admission.
//!
//! QEMU up to 7.2 takes the *first* connection it accepts as the main
//! channel, while TLS handshakes can finish in any order; multifd channels
//! therefore wait until a main channel of their migration is being
//! forwarded before their own connection to the target QEMU is opened.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{read_until, sniff_decider, Endpoint};
use crate::admit::registry::{ChannelGuard, Migration, Registry};
use crate::admit::ticket::Ticket;
use crate::admit::{self, Expectation, Refusal};
use crate::authz::Authz;
use crate::creds::{dn, tls};
use crate::outcome::{Ending, Outcome, Sink};
use crate::relay::Close;
use crate::wire::frames::{self, Hello, Verdict};
use crate::wire::qemu::{StreamKind, SNIFF_MAX};

/// Where connections without a ticket go, and who may send them.
pub struct StaticRoute {
    pub forward: Endpoint,
    pub authz: Arc<dyn Authz>,
    pub expect: Expectation,
}

/// What an unauthenticated peer may cost: see [`crate::timeouts`] for
/// the defaults and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deadline of the TLS handshake (the stall timeout covers the rest).
    pub handshake: Duration,
    /// Connections not yet admitted, from all sources.
    pub max_pending: usize,
    /// Connections not yet admitted, per source address.
    pub max_pending_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake: crate::timeouts::DEFAULT_HANDSHAKE,
            max_pending: crate::timeouts::DEFAULT_MAX_PENDING,
            max_pending_per_ip: crate::timeouts::DEFAULT_MAX_PENDING_PER_IP,
        }
    }
}

/// Counts connections not yet admitted, globally and per source address.
#[derive(Default)]
struct PendingCount {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// A connection's place among the pending ones; freed on admission (or
/// when the connection ends, whichever is first).
struct Pending {
    target: Arc<Target>,
    ip: IpAddr,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut p = self
            .target
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        p.total -= 1;
        if let Some(n) = p.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.by_ip.remove(&self.ip);
            }
        }
    }
}

/// One target gateway listener's configuration and shared state.
pub struct Target {
    tls: RwLock<Arc<ServerConfig>>,
    route: RwLock<Option<Arc<StaticRoute>>>,
    registry: Option<Arc<Registry>>,
    /// This listener's index in the daemon (`[[target]]` order): a ticket
    /// is only accepted on the listeners its registration names.
    listener: usize,
    stall: Duration,
    sink: Option<Arc<dyn Sink>>,
    /// Main channels being forwarded on the static route.
    mains: watch::Sender<usize>,
    limits: Limits,
    pending: Mutex<PendingCount>,
}

impl Target {
    /// A listener; `registry` (managed mode) with this listener's index
    /// in the daemon's configuration, which registrations are bound to.
    pub fn new(
        tls: Arc<ServerConfig>,
        route: Option<StaticRoute>,
        registry: Option<(Arc<Registry>, usize)>,
        stall: Duration,
        sink: Option<Arc<dyn Sink>>,
        limits: Limits,
    ) -> Arc<Target> {
        let (registry, listener) = match registry {
            Some((r, i)) => (Some(r), i),
            None => (None, 0),
        };
        Arc::new(Target {
            tls: RwLock::new(tls),
            route: RwLock::new(route.map(Arc::new)),
            registry,
            listener,
            stall,
            sink,
            mains: watch::Sender::new(0),
            limits,
            pending: Mutex::default(),
        })
    }

    /// Takes a pending slot for a connection from `ip`, or says which
    /// limit is reached.
    fn try_pending(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, String> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.total >= self.limits.max_pending {
            return Err(format!(
                "overload: {} connections are already waiting for admission (max_pending)",
                p.total
            ));
        }
        let n = p.by_ip.entry(ip).or_insert(0);
        if *n >= self.limits.max_pending_per_ip {
            return Err(format!(
                "overload: {n} connections from {ip} are already waiting for admission (max_pending_per_ip)"
            ));
        }
        *n += 1;
        p.total += 1;
        Ok(Pending {
            target: self.clone(),
            ip,
        })
    }

    /// Replaces the TLS configuration (reloaded certificates) for new connections.
    pub fn set_tls(&self, tls: Arc<ServerConfig>) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    /// Replaces the static route for new connections.
    pub fn set_route(&self, route: Option<StaticRoute>) {
        *self.route.write().unwrap_or_else(|p| p.into_inner()) = route.map(Arc::new);
    }

    fn current_tls(&self) -> Arc<ServerConfig> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn current_route(&self) -> Option<Arc<StaticRoute>> {
        self.route.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Accepts connections forever. Beyond the pending limits a connection is
/// closed at once (and counted as an `overload` refusal); admitted
/// channels hold no pending slot, so they are never refused for it.
pub async fn serve(listener: TcpListener, target: Arc<Target>) -> std::io::Result<()> {
    let mut accept_errors = crate::outcome::RateLimit::new();
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(suppressed) = accept_errors.allow() {
                    tracing::error!(error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(crate::timeouts::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let mut out = Outcome::new("target", Some(addr));
        out.sink = target.sink.clone();
        // Here, not in the task: a flood must not pile up descriptors
        // waiting for a task to close them.
        let pending = match target.try_pending(addr.ip()) {
            Ok(p) => p,
            Err(why) => {
                drop(sock);
                out.overloaded(&why);
                continue;
            }
        };
        let target = target.clone();
        tokio::spawn(async move {
            crate::timeouts::tune(&sock);
            match handle(sock, addr, &target, pending, &mut out).await {
                Ok(()) => out.finish(Ending::Completed, None),
                Err(End::Refused(r)) => out.refuse(&r),
                Err(End::Failed(msg)) => out.finish(Ending::Failed, Some(&msg)),
            }
        });
    }
}

enum End {
    Refused(Refusal),
    Failed(String),
}

impl From<Refusal> for End {
    fn from(r: Refusal) -> Self {
        End::Refused(r)
    }
}

/// Keeps the count of forwarded main channels while it lives.
struct MainGuard(watch::Sender<usize>);

impl MainGuard {
    fn new(tx: &watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        MainGuard(tx.clone())
    }
}

impl Drop for MainGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Where an admitted channel goes.
enum Admitted {
    Static(Arc<StaticRoute>),
    Ticket(ChannelGuard),
}

impl Admitted {
    fn forward(&self) -> &Endpoint {
        match self {
            Admitted::Static(r) => &r.forward,
            Admitted::Ticket(g) => g.migration().forward(),
        }
    }
}

async fn handle(
    sock: TcpStream,
    _addr: SocketAddr,
    target: &Target,
    pending: Pending,
    out: &mut Outcome,
) -> Result<(), End> {
    let stall = target.stall;
    let handshake = target.limits.handshake;
    let acceptor = TlsAcceptor::from(target.current_tls());
    // No read buffer until admission: see `TlsSocket`.
    let sock = crate::timeouts::tls_socket_unbuffered(sock);
    let mut tls = match tokio::time::timeout(handshake, acceptor.accept(sock)).await {
        Err(_) => {
            return Err(Refusal::Tls(format!(
                "TLS handshake did not complete within {} s",
                handshake.as_secs()
            ))
            .into())
        }
        Ok(Err(e)) => return Err(Refusal::Tls(tls::describe_tls_error(&e, None)).into()),
        Ok(Ok(s)) => s,
    };
    let (miggate_peer, leaf) = {
        let conn = tls.get_ref().1;
        let leaf = tls::peer_leaf(conn.peer_certificates()).map(<[u8]>::to_vec);
        (conn.alpn_protocol() == Some(tls::ALPN_MIGGATE), leaf)
    };
    let Some(leaf) = leaf else {
        // The verifier requires a certificate; this is a defence in depth.
        return Err(Refusal::Tls("peer presented no client certificate".into()).into());
    };
    // The stall timeout covers the hello and the stream's first bytes.
    let deadline = Instant::now() + stall;
    let (prefix, kind, admitted) =
        match admit(&mut tls, &leaf, miggate_peer, target, deadline, out).await {
            Ok(x) => x,
            Err(refusal) => {
                refuse(&mut tls, miggate_peer, &refusal).await;
                return Err(refusal.into());
            }
        };
    // Admitted: the relay's read buffer now, and the pending slot is free.
    tls.get_mut().0.grow();
    drop(pending);

    // Main first: see the module comment.
    let mains = match &admitted {
        Admitted::Static(_) => target.mains.clone(),
        Admitted::Ticket(g) => g.migration().mains.clone(),
    };
    let is_main = matches!(kind, StreamKind::Main { .. });
    match kind {
        StreamKind::Main { .. } => {}
        StreamKind::Multifd { .. } => {
            let mut rx = mains.subscribe();
            let wait = tokio::time::timeout_at(deadline, rx.wait_for(|n| *n > 0));
            // A registered migration can also end (expire, be cancelled)
            // while its multifd channel waits: nothing may wait past that.
            let ended = async {
                match &admitted {
                    Admitted::Ticket(g) => g.migration().ended().await,
                    Admitted::Static(_) => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                r = wait => r.is_err().then(|| format!(
                    "multifd channel arrived but no main channel of its migration was admitted within {} s",
                    stall.as_secs()
                )),
                () = ended => Some("multifd channel arrived but its migration ended before its main channel came".to_string()),
            };
            if let Some(detail) = why {
                let r = Refusal::NotReady {
                    public: "multifd channel without an admitted main channel",
                    detail,
                };
                refuse(&mut tls, miggate_peer, &r).await;
                // Gives the channel's slot back (see ChannelGuard).
                finish_channel(admitted, Err(r.to_string()));
                return Err(r.into());
            }
        }
    }

    let forward = admitted.forward().clone();
    let mut backend = match forward.connect().await {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("cannot reach the target QEMU at {forward}: {e}");
            let r = Refusal::NotReady {
                public: "the target is not ready for this migration",
                detail: msg.clone(),
            };
            refuse(&mut tls, miggate_peer, &r).await;
            return Err(finish_channel(admitted, Err(msg)));
        }
    };
    // Only now that the main channel's connection to the target QEMU is
    // established (first in its accept queue) may multifd channels connect.
    let _main_guard = is_main.then(|| MainGuard::new(&mains));
    if miggate_peer {
        if let Err(e) = frames::write_verdict(&mut tls, &Verdict::Admitted).await {
            let msg = format!("cannot send the verdict to the source: {e}");
            return Err(finish_channel(admitted, Err(msg)));
        }
    }
    out.admitted();
    tracing::info!(
        peer.dn = out.peer_dn.as_deref().unwrap_or("-"),
        channel = out.channel.as_deref().unwrap_or("-"),
        migration = out.migration.as_deref().unwrap_or("-"),
        forward = %forward,
        "admitted"
    );
    if let Err(e) = backend.write_all(&prefix).await {
        let msg = format!("cannot write to the target QEMU at {forward}: {e}");
        return Err(finish_channel(admitted, Err(msg)));
    }
    out.counters
        .forward
        .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let relay = crate::relay::relay(
        tls,
        backend,
        ("source->target", "target->source"),
        (Close::tls_peer(miggate_peer, "source"), Close::AnyEof),
        stall,
        out.counters.clone(),
    );
    let result = match &admitted {
        Admitted::Static(_) => relay.await.map_err(|e| e.to_string()),
        Admitted::Ticket(g) => {
            let mig = g.migration().clone();
            tokio::select! {
                r = relay => r.map_err(|e| e.to_string()),
                // Dropping the relay closes both sockets: both QEMUs see
                // the migration fail; the source VM keeps running.
                _ = mig.cancelled() => Err("migration cancelled by the operator".to_string()),
            }
        }
    };
    match result {
        Ok(()) => {
            if let Admitted::Ticket(g) = admitted {
                g.finish(Ok(()));
            }
            Ok(())
        }
        Err(e) => Err(finish_channel(admitted, Err(e))),
    }
}

/// Records a channel's failure on its migration (managed mode).
fn finish_channel(admitted: Admitted, result: Result<(), String>) -> End {
    let msg = match &result {
        Err(e) => e.clone(),
        Ok(()) => String::new(),
    };
    if let Admitted::Ticket(g) = admitted {
        g.finish(result);
    }
    End::Failed(msg)
}

/// Identity, route, hello and stream checks. Returns the bytes read from
/// the QEMU stream so far (to replay), what the stream is, and its route.
async fn admit(
    tls: &mut TlsStream<crate::timeouts::TlsSocket>,
    leaf: &[u8],
    miggate_peer: bool,
    target: &Target,
    deadline: Instant,
    out: &mut Outcome,
) -> Result<(Vec<u8>, StreamKind, Admitted), Refusal> {
    let stall = target.stall;
    let peer_dn = dn::subject_dn(leaf)
        .map_err(|e| Refusal::Tls(format!("peer certificate subject unreadable: {e}")))?;
    out.peer_dn = Some(peer_dn.clone());

    let mut buf = Vec::with_capacity(SNIFF_MAX);
    let mut hello = None;
    if miggate_peer {
        let max = frames::MAX_FRAME + 6;
        let (h, used) = read_until(tls, &mut buf, deadline, stall, max, |b| {
            frames::parse_hello(b).transpose()
        })
        .await?
        .map_err(|e| Refusal::Stream(e.to_string()))?;
        buf.drain(..used);
        hello = Some(h);
    }
    let migration = match hello
        .as_ref()
        .and_then(|h: &Hello| h.ticket.as_ref().map(frames::HelloTicket::expose))
    {
        Some(t) => Some(find_migration(target, t)?),
        None => None,
    };
    let route = match &migration {
        Some(m) => {
            out.migration = Some(m.id.clone());
            None
        }
        None => {
            let route = target.current_route().ok_or_else(|| {
                Refusal::ticket(
                    "this gateway admits registered migrations only: present a ticket",
                    "this gateway admits registered migrations only: the source must present a ticket",
                )
            })?;
            // Before reading the stream: an unauthorized peer gets nothing in.
            admit::check_identity(route.authz.as_ref(), &peer_dn)?;
            Some(route)
        }
    };

    let kind = read_until(tls, &mut buf, deadline, stall, SNIFF_MAX, sniff_decider(0)).await??;
    out.channel = Some(admit::channel_label(&kind));
    out.vm = admit::stream_uuid(&kind).map(|u| u.to_string());
    let admitted = match (route, migration) {
        (Some(route), _) => {
            admit::check_stream(&route.expect, &kind)?;
            Admitted::Static(route)
        }
        (None, Some(m)) => {
            let guard = m.admit_channel(&peer_dn, &kind)?;
            out.counters = guard.counters();
            Admitted::Ticket(guard)
        }
        (None, None) => unreachable!("a connection has a route or a migration"),
    };
    Ok((buf, kind, admitted))
}

fn find_migration(target: &Target, ticket: &str) -> Result<Arc<Migration>, Refusal> {
    let registry = target.registry.as_ref().ok_or_else(|| {
        Refusal::ticket(
            "this gateway does not take tickets",
            "this gateway has no registered migrations (tickets are for miggate daemon)",
        )
    })?;
    let ticket = Ticket::parse(ticket)
        .map_err(|e| Refusal::ticket("malformed ticket", format!("malformed ticket: {e}")))?;
    let mig = registry.find_by_ticket(&ticket)?;
    mig.check_listener(target.listener)?;
    Ok(mig)
}

/// Tells the peer which check failed ([`Refusal::public`]; a miggate
/// source gets a verdict frame, QEMU's own TLS has no channel for it and
/// just sees the connection close), then closes with close_notify.
/// Bounded: a peer that does not read is not waited for.
async fn refuse(
    tls: &mut TlsStream<crate::timeouts::TlsSocket>,
    miggate_peer: bool,
    why: &Refusal,
) {
    let send = async {
        if miggate_peer {
            let v = Verdict::Refused {
                reason: why.public(),
            };
            frames::write_verdict(tls, &v).await?;
        }
        tls.shutdown().await
    };
    let _ = tokio::time::timeout(crate::timeouts::VERDICT_WRITE, send).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_limits_per_address_and_in_all() {
        let dir = tempfile::tempdir().unwrap();
        crate::creds::pki::init(dir.path(), &Default::default()).unwrap();
        let tls = tls::server_config(dir.path(), &[]).unwrap();
        let limits = Limits {
            max_pending: 3,
            max_pending_per_ip: 2,
            ..Limits::default()
        };
        let t = Target::new(tls, None, None, Duration::from_secs(1), None, limits);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        let a1 = t.try_pending(a).unwrap();
        let _a2 = t.try_pending(a).unwrap();
        let e = t.try_pending(a).err().unwrap();
        assert!(
            e.contains("from 192.0.2.1") && e.contains("max_pending_per_ip"),
            "{e}"
        );
        let _b1 = t.try_pending(b).unwrap();
        let e = t.try_pending(c).err().unwrap();
        assert!(e.contains("max_pending)"), "{e}");
        // An admitted (or ended) connection frees its slot.
        drop(a1);
        let _c1 = t.try_pending(c).unwrap();
        assert_eq!(t.pending.lock().unwrap().by_ip.len(), 3);
    }
}
