//! The target gateway: TLS in, plain out to the target QEMU.
//!
//! Per connection: the mTLS accept step ([`crate::net::mtls`]: handshake,
//! client certificate, subject DN), then admission. The gate only reads;
//! [`crate::admit::decide`] decides, in order, from what was read:
//! - a miggate source (ALPN) sends a hello first; a ticket in it names a
//!   registered migration, which decides (its allowed peers, VM UUID,
//!   channels, forward);
//! - otherwise the static route (`miggate target` flags; also the only
//!   route for a QEMU with native TLS, which sends no hello): authz on the
//!   DN before a byte of the stream is read, then the expected UUID.
//!
//! The QEMU stream's first bytes (main channel or multifd init packet, VM
//! UUID) are read under the stall deadline and checked, then the target
//! QEMU is connected, the verdict sent, and the relay runs. Nothing reaches
//! the target QEMU before every check has passed, so a refused connection
//! leaves it ready for the right migration.
//!
//! Until it is admitted, a connection costs a bounded amount: it holds one
//! of [`Limits::max_pending`] slots (and of the per-address ones; beyond
//! them it is closed at once), its TLS handshake has its own deadline, and
//! the relay's read buffer comes only with the admission.
//!
//! A QEMU with native TLS sends no hello: its postcopy preempt channel,
//! which has no header, joins its main channel by DN instead of a token
//! ([`super::native_join`]).
//!
//! QEMU up to 7.2 takes the *first* connection it accepts as the main
//! channel, while TLS handshakes can finish in any order; multifd channels
//! therefore wait until a main channel of their migration is being
//! forwarded before their own connection to the target QEMU is opened.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::native_join::{self, NativeJoin, NativeJoins};
use super::revoke::{self, Cause, Live, LivePeer, Revoked};
use super::{read_more, MainGuard};
// The static route is admission's policy; re-exported because a listener
// is built with one.
use crate::admit::binding::{BindGuard, Bindings, JoinRefusal, Joined, Scope};
use crate::admit::decide::{Admission, Offer, Route, Step};
pub use crate::admit::decide::{NbdRoute, StaticRoute};
use crate::admit::registry::Registry;
use crate::admit::{self, NoMain, Refusal};
use crate::creds::{crl_watch, tls};
use crate::net::mtls;
use crate::outcome::{Ending, Outcome, Sink};
use crate::relay::native::NativeMains;
use crate::relay::rekey::Rekeying;
use crate::relay::Close;
use crate::wire::frames::{self, Verdict};
use crate::wire::nbd;
use crate::wire::qemu::{StreamKind, SNIFF_MAX};

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
    /// The native-TLS ones, by what their machine types say of how their
    /// sources end multifd channels (see `relay::native`).
    native_mains: NativeMains,
    limits: Limits,
    pending: Mutex<PendingCount>,
    /// Main channels a postcopy preempt channel may join.
    bindings: Arc<Bindings>,
    /// The native-TLS ones (no token: see `native_join`).
    native_joins: NativeJoins,
    /// Live channels by peer, re-checked on ACL and CRL changes.
    live: Arc<Live>,
    revocation: Mutex<Revocation>,
    /// Refresh this side's sending keys after every this many bytes sent
    /// on a channel (`--rekey-after-mib`; see `relay::rekey`); 0: never.
    rekey_after: AtomicU64,
}

/// How ACL and CRL changes reach live channels ([`Target::watch_revocations`]).
#[derive(Default)]
struct Revocation {
    /// `--keep-live-on-acl-change`: changes apply to new connections only.
    keep_live: bool,
    /// The PKI directory whose `ca-crl.pem` is watched.
    x509_dir: Option<std::path::PathBuf>,
    _crl_watcher: Option<notify::RecommendedWatcher>,
    /// The last reason a new CRL was not taken, to say it once.
    crl_error: Option<String>,
    /// The CRL taken last, and how many were taken since the start: a
    /// channel whose handshake used an older one is re-checked with it.
    crl_check: Option<Arc<crl_watch::PeerCheck>>,
    crl_generation: u64,
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
            native_mains: NativeMains::default(),
            limits,
            pending: Mutex::default(),
            bindings: Arc::default(),
            native_joins: NativeJoins::default(),
            live: Arc::default(),
            revocation: Mutex::default(),
            rekey_after: AtomicU64::new(0),
        })
    }

    /// Makes ACL and CRL changes reach live channels: watches
    /// `x509_dir/ca-crl.pem` (new CRLs apply to new handshakes, and
    /// re-verify live peers) and follows the static route's ACL file
    /// reloads; unless `keep_live`, a live channel whose peer is no longer
    /// allowed is cut ([`super::revoke`]). Called again on a daemon reload
    /// (with the reloaded settings), it re-checks every live channel.
    pub fn watch_revocations(
        self: &Arc<Self>,
        x509_dir: &std::path::Path,
        keep_live: bool,
    ) -> Result<(), crate::authz::AuthzError> {
        let weak = Arc::downgrade(self);
        let watcher = crl_watch::watch(x509_dir, move |loaded| {
            if let Some(t) = weak.upgrade() {
                t.crl_changed(loaded);
            }
        })?;
        let mut r = self.revocation();
        let first = r.x509_dir.is_none();
        r.keep_live = keep_live;
        r.x509_dir = Some(x509_dir.to_path_buf());
        r._crl_watcher = Some(watcher);
        drop(r);
        if first {
            self.follow_acl();
        } else {
            self.recheck_all("configuration reloaded");
        }
        Ok(())
    }

    fn revocation(&self) -> std::sync::MutexGuard<'_, Revocation> {
        self.revocation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the current static route's ACL file: after each reload
    /// that loaded, live channels of the static route are re-checked.
    fn follow_acl(self: &Arc<Self>) {
        let Some(mut rx) = self.current_route().and_then(|r| r.authz.reloads()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            rx.borrow_and_update();
            // Ends when the ACL file is dropped (replaced by a reload, and
            // its last live channel gone).
            while rx.changed().await.is_ok() {
                let state = rx.borrow_and_update().clone();
                let Some(t) = weak.upgrade() else { return };
                t.acl_reloaded(&state);
            }
        });
    }

    fn acl_reloaded(&self, state: &crate::authz::ReloadState) {
        let live = self.live.len();
        if let Err(why) = &state.result {
            tracing::error!(
                generation = state.generation, error = %why, live,
                "ACL file cannot be loaded: new connections are denied, live channels are kept (fix the file)"
            );
            return;
        }
        if self.revocation().keep_live {
            tracing::info!(
                live,
                "ACL file reloaded: live channels kept (keep-live-on-acl-change)"
            );
            return;
        }
        let route = self.current_route();
        let cut = self
            .live
            .recheck(|p| revoke::judge_acl(route.as_deref(), p));
        tracing::info!(
            live,
            closed = cut,
            "ACL file reloaded: live channels re-checked"
        );
    }

    /// A new `ca-crl.pem`, or why it cannot be used (then nothing
    /// changes). Runs on the watcher's thread.
    fn crl_changed(&self, loaded: Result<crl_watch::Crls, crate::creds::tls::CredsError>) {
        let Some(dir) = self.revocation().x509_dir.clone() else {
            return;
        };
        let built = loaded.and_then(|crls| {
            let tls = tls::server_config_with(&dir, &[tls::ALPN_MIGGATE], crls.clone())?;
            let check = crl_watch::PeerCheck::clients(&dir, crls)?;
            Ok((tls, check))
        });
        let (tls, check) = match built {
            Ok(x) => x,
            Err(e) => {
                let why = crate::error::chain(&e);
                let mut r = self.revocation();
                if r.crl_error.as_deref() != Some(why.as_str()) {
                    tracing::error!(
                        error = %why, live = self.live.len(),
                        "the new ca-crl.pem cannot be used: the previous CRL stays in force for new handshakes and no live channel is re-checked (fix the file)"
                    );
                    r.crl_error = Some(why);
                }
                return;
            }
        };
        let check = Arc::new(check);
        {
            let mut r = self.revocation();
            r.crl_error = None;
            r.crl_check = Some(check.clone());
            r.crl_generation += 1;
            // Under the lock: a handshake that reads the generation
            // before the swap is re-checked after its admission.
            self.set_tls(tls);
        }
        let live = self.live.len();
        if self.revocation().keep_live {
            tracing::info!(
                live,
                "CRL reloaded: live channels kept (keep-live-on-acl-change)"
            );
            return;
        }
        let cut = self.live.recheck(|p| crl_judge(&check, p));
        tracing::info!(live, closed = cut, "CRL reloaded: live channels re-checked");
    }

    /// Re-checks every live channel against the ACL and the CRL in
    /// force (a daemon reload: both may have changed).
    fn recheck_all(&self, why: &str) {
        let r = self.revocation();
        let (keep_live, dir) = (r.keep_live, r.x509_dir.clone());
        drop(r);
        let live = self.live.len();
        if keep_live {
            tracing::info!(live, "{why}: live channels kept (keep-live-on-acl-change)");
            return;
        }
        let route = self.current_route();
        let check = dir.and_then(|d| {
            let crls = crl_watch::load(&d).ok()?;
            crl_watch::PeerCheck::clients(&d, crls).ok().map(Arc::new)
        });
        if let Some(c) = &check {
            let mut r = self.revocation();
            r.crl_check = Some(c.clone());
            r.crl_generation += 1;
        }
        let cut = self.live.recheck(|p| {
            revoke::judge_acl(route.as_deref(), p)
                .or_else(|| check.as_ref().and_then(|c| crl_judge(c, p)))
        });
        tracing::info!(live, closed = cut, "{why}: live channels re-checked");
    }

    /// The TLS configuration for a new handshake, and the CRL generation
    /// it carries.
    fn tls_for_handshake(&self) -> (Arc<ServerConfig>, u64) {
        let r = self.revocation();
        (self.current_tls(), r.crl_generation)
    }

    /// A channel just registered as live, judged by what is in force now:
    /// a change between its admission's checks and its registration would
    /// otherwise be missed. `crl_generation`: the CRL its handshake used.
    fn judge_now(&self, p: &LivePeer, crl_generation: u64) -> Option<Revoked> {
        let r = self.revocation();
        if r.keep_live {
            return None;
        }
        let check = (r.crl_generation != crl_generation)
            .then(|| r.crl_check.clone())
            .flatten();
        drop(r);
        revoke::judge_acl(self.current_route().as_deref(), p)
            .or_else(|| check.and_then(|c| crl_judge(&c, p)))
    }

    /// Key updates on this side's sending direction after every `bytes`
    /// sent on a channel (`None`: only the answers to the source's
    /// requests, at rustls' pace). For channels admitted from now on.
    pub fn set_rekey_after(&self, bytes: Option<u64>) {
        self.rekey_after
            .store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    fn rekey_after(&self) -> Option<u64> {
        Some(self.rekey_after.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// Its bindings: the daemon rekeys a paused one for a recovery.
    pub fn bindings(&self) -> &Arc<Bindings> {
        &self.bindings
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

    /// Replaces the static route for new connections (and follows its
    /// ACL file's reloads, if [`Target::watch_revocations`] was called).
    pub fn set_route(self: &Arc<Self>, route: Option<StaticRoute>) {
        *self.route.write().unwrap_or_else(|p| p.into_inner()) = route.map(Arc::new);
        if self.revocation().x509_dir.is_some() {
            self.follow_acl();
        }
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
            crate::net::tune(&sock);
            match handle(sock, addr, &target, pending, &mut out).await {
                Ok(()) => out.finish(Ending::Completed, None),
                Err(End::Refused(r)) => out.refuse(&r),
                Err(End::Failed(Failure::Revoked(r))) => out.revoked(r.cause.as_str(), &r.reason),
                Err(End::Failed(f)) => out.finish(Ending::Failed, Some(&f.to_string())),
            }
        });
    }
}

enum End {
    Refused(Refusal),
    Failed(Failure),
}

/// Why an admitted channel failed. `Display` is the outcome's reason.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The source is told (see [`Refusal::TargetUnreachable`]), but it was
    /// admitted: a failure of the migration, not a refusal of the peer.
    #[error("{0}")]
    Unreachable(Refusal),
    #[error("cannot send the verdict to the source: {0}")]
    Verdict(std::io::Error),
    #[error("cannot write to the target QEMU at {forward}: {error}")]
    Write {
        forward: crate::net::Endpoint,
        error: std::io::Error,
    },
    #[error("{0}")]
    Relay(crate::relay::RelayError),
    /// Its peer is no longer allowed, or its registration was deleted.
    #[error("{}", .0.reason)]
    Revoked(Revoked),
    #[error("its main channel ended {} s ago and this channel is still open", .0.as_secs())]
    MainEnded(Duration),
    #[error("NBD: {0}")]
    Nbd(nbd::NbdError),
}

impl From<Refusal> for End {
    fn from(r: Refusal) -> Self {
        End::Refused(r)
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
    let (tls_config, crl_generation) = target.tls_for_handshake();
    let acceptor = TlsAcceptor::from(tls_config);
    // No read buffer until admission: see `TlsSocket`.
    let sock = crate::net::socket::tls_socket_unbuffered(sock);
    let (mut tls, peer) = mtls::accept(&acceptor, sock, handshake)
        .await
        .map_err(Refusal::Tls)?;
    out.peer_dn = Some(peer.dn.clone());
    let miggate_peer = peer.is_miggate();
    // The stall timeout covers the hello and the stream's first bytes.
    let deadline = Instant::now() + stall;
    let Admitted {
        prefix,
        kind,
        route: admitted,
        bind,
        joined,
    } = match admit(&mut tls, &peer.dn, miggate_peer, target, deadline, out).await {
        Ok(x) => x,
        Err(refusal) => {
            refuse(&mut tls, miggate_peer, &refusal).await;
            return Err(refusal.into());
        }
    };
    // Admitted: the relay's read buffer now, and the pending slot is free.
    tls.get_mut().0.grow();
    drop(pending);
    // From now on an ACL or CRL change that no longer allows the peer
    // cuts this channel (see `revoke`).
    let live_peer = LivePeer {
        dn: peer.dn.clone(),
        chain: tls
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default(),
        static_route: matches!(admitted, Route::Static(_)),
    };
    // Registered first, judged second: a change in between is seen by
    // one or the other.
    let mut live = target.live.register(live_peer.clone());
    if let Some(why) = target.judge_now(&live_peer, crl_generation) {
        // Not forwarded yet: nothing reached the target QEMU. A miggate
        // source is told, as for a refusal.
        tracing::warn!(peer.dn = %crate::authz::shown(&peer.dn), reason = %why.reason, "closing a channel admitted under the previous ACL or CRL");
        let send = async {
            if miggate_peer {
                let reason = "peer no longer allowed (revoked while admitted)".to_string();
                frames::write_verdict(&mut tls, &Verdict::Refused { reason }).await?;
            }
            tls.shutdown().await
        };
        let _ = tokio::time::timeout(crate::timeouts::VERDICT_WRITE, send).await;
        return Err(fail(admitted, Failure::Revoked(why)));
    }

    // Main first: see the module comment.
    let mains = match &admitted {
        Route::Static(_) => target.mains.clone(),
        Route::Ticket(g) => g.migration().mains.clone(),
    };
    // A resumed main channel is one too: its preempt channel joins it.
    let is_main = matches!(kind, StreamKind::Main { .. } | StreamKind::Resumed);
    match kind {
        // A joined channel's main channel is already forwarded: it got
        // its token with its verdict, sent once the target was connected.
        // And a disk's NBD channel may come before any (libvirt mirrors
        // the disks first).
        StreamKind::Main { .. }
        | StreamKind::Preempt
        | StreamKind::Resumed
        | StreamKind::Nbd { .. } => {}
        StreamKind::Multifd { .. } => {
            let mut rx = mains.subscribe();
            let wait = tokio::time::timeout_at(deadline, rx.wait_for(|n| *n > 0));
            // A registered migration can also end (expire, be cancelled)
            // while its multifd channel waits: nothing may wait past that.
            let ended = async {
                match &admitted {
                    Route::Ticket(g) => g.migration().ended().await,
                    Route::Static(_) => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                r = wait => r.is_err().then_some(NoMain::Timeout(stall.as_secs())),
                () = ended => Some(NoMain::MigrationEnded),
            };
            if let Some(why) = why {
                let r = Refusal::NoMainChannel(why);
                refuse(&mut tls, miggate_peer, &r).await;
                // Gives the channel's slot back (see ChannelGuard).
                finish_channel(admitted, &r);
                return Err(r.into());
            }
        }
    }

    let forward = admitted.forward().clone();
    let mut backend = match forward.connect().await {
        Ok(b) => b,
        Err(e) => {
            let r = Refusal::TargetUnreachable {
                forward: forward.clone(),
                error: e.into(),
            };
            refuse(&mut tls, miggate_peer, &r).await;
            // Counted as a failure, not a refusal: the source was admitted.
            return Err(fail(admitted, Failure::Unreachable(r)));
        }
    };
    // An NBD channel: the target QEMU's NBD server gets the client's
    // opening before the verdict (see `wire::nbd`); what the client sent
    // after its export-naming option is checked with the rest.
    let mut prefix = prefix;
    let mut nbd_export = None;
    if let StreamKind::Nbd { export } = &kind {
        let opened = match nbd::sniff_client(&prefix) {
            Ok(Some(o)) => {
                let open = nbd::open_server(&mut backend, &o);
                match tokio::time::timeout(stall, open).await {
                    Ok(r) => r.map(|()| o.used),
                    Err(_) => Err(nbd::NbdError::Io(format!(
                        "the NBD server did not answer within {} s",
                        stall.as_secs()
                    ))),
                }
            }
            // Admission parsed the very same bytes.
            _ => unreachable!("an admitted NBD channel has an opening"),
        };
        match opened {
            Ok(used) => {
                // Written to the NBD server by `open_server`: counted as
                // the source gateway counts them, and as a main channel's
                // prefix is.
                out.counters
                    .forward
                    .fetch_add(used as u64, std::sync::atomic::Ordering::Relaxed);
                prefix.drain(..used);
                nbd_export = Some(export.clone());
            }
            Err(e) => {
                let r = Refusal::TargetUnreachable {
                    forward: forward.clone(),
                    error: std::io::Error::other(e.to_string()).into(),
                };
                refuse(&mut tls, miggate_peer, &r).await;
                return Err(fail(admitted, Failure::Unreachable(r)));
            }
        }
    }
    // How this channel's TLS must end (see `relay::native`); a native main
    // channel counts before its multifd channels may connect.
    let (_native_main, close) = match &kind {
        _ if miggate_peer => (None, Close::tls_peer(true, "source")),
        StreamKind::Main { machine, .. } => (
            Some(target.native_mains.main_channel(machine.as_deref())),
            Close::tls_peer(false, "source QEMU"),
        ),
        StreamKind::Multifd { .. } => (None, target.native_mains.multifd_close()),
        // A native source's preempt channel (`native_join`): how QEMU
        // ends it is not known to be clean, so any EOF, as its main's.
        StreamKind::Preempt | StreamKind::Resumed => (None, Close::tls_peer(false, "source QEMU")),
        // Only a miggate source declares one (first arm).
        StreamKind::Nbd { .. } => (None, Close::tls_peer(true, "source")),
    };
    // Only now that the main channel's connection to the target QEMU is
    // established (first in its accept queue) may multifd channels connect.
    let _main_guard = is_main.then(|| MainGuard::new(&mains));
    // ... and a native-TLS source's postcopy preempt channel join it.
    let native_main = match (&kind, &admitted) {
        (StreamKind::Main { .. }, Route::Static(route)) if !miggate_peer => Some(
            target
                .native_joins
                .main_channel(&peer.dn, route.clone(), &prefix),
        ),
        _ => None,
    };
    // Lives as long as the main channel: see `admit::binding`.
    let mut binding: Option<BindGuard> = None;
    let verdict = if is_main && bind {
        let scope = match &admitted {
            Route::Static(_) => Scope::Static,
            Route::Ticket(g) => Scope::Migration(g.migration().id.clone()),
        };
        let (token, guard) = target.bindings.bind(&peer.dn, scope);
        binding = Some(guard);
        Verdict::Bound { token }
    } else {
        Verdict::Admitted
    };
    if miggate_peer {
        if let Err(e) = frames::write_verdict(&mut tls, &verdict).await {
            return Err(fail(admitted, Failure::Verdict(e)));
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
    // An NBD channel's leftover is the checked reader's, below.
    if nbd_export.is_none() {
        if let Err(error) = backend.write_all(&prefix).await {
            return Err(fail(admitted, Failure::Write { forward, error }));
        }
        out.counters
            .forward
            .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let idle = if joined.is_some() {
        crate::timeouts::JOINED_IDLE
    } else if nbd_export.is_some() {
        crate::timeouts::NBD_IDLE
    } else {
        stall
    };
    // A TLS 1.2 peer (a native QEMU may negotiate it) has no key update:
    // its channel runs without, and says so.
    let rekey = target.rekey_after().filter(|_| {
        let v = tls.get_ref().1.protocol_version();
        let tls13 = v == Some(rustls::ProtocolVersion::TLSv1_3);
        if !tls13 {
            tracing::warn!(
                peer.dn = out.peer_dn.as_deref().unwrap_or("-"),
                "--rekey-after-mib: the peer negotiated {v:?}, which has no key update; this channel is not rekeyed"
            );
        }
        tls13
    });
    let tls = Rekeying::optional(
        tls,
        rekey,
        crate::timeouts::MIN_REKEY_GAP,
        out.counters.clone(),
    );
    let tls = match &nbd_export {
        Some(export) => match nbd::CheckedReads::new(tls, export, &prefix) {
            Ok(t) => t,
            Err(e) => return Err(fail(admitted, Failure::Nbd(e))),
        },
        None => nbd::CheckedReads::passthrough(tls),
    };
    let relay = crate::relay::relay(
        native_join::tap(tls, &prefix, native_main.as_ref()),
        backend,
        ("source->target", "target->source"),
        (close, Close::AnyEof),
        idle,
        out.counters.clone(),
    );
    let relay = super::bounded_by_main(relay, joined.as_ref().map(Joined::main_ended), stall);
    // Dropping the relay closes both sockets: both QEMUs see the
    // migration fail; the source VM keeps running.
    let result = match &admitted {
        Route::Static(_) => tokio::select! {
            r = relay => r.map_err(Failure::from),
            why = live.revoked() => Err(Failure::Revoked(why)),
        },
        Route::Ticket(g) => {
            let mig = g.migration().clone();
            tokio::select! {
                r = relay => r.map_err(Failure::from),
                why = live.revoked() => Err(Failure::Revoked(why)),
                _ = mig.cancelled() => Err(Failure::Revoked(Revoked {
                    cause: Cause::Deleted,
                    reason: format!(
                        "revoked: registration {} deleted (DELETE /v1/migrations/{}): migration cancelled by the operator",
                        mig.id, mig.id
                    ),
                })),
            }
        }
    };
    match result {
        Ok(()) => {
            if let Route::Ticket(g) = admitted {
                g.finish(Ok(()));
            }
            Ok(())
        }
        Err(e) => {
            // A cut main channel: a postcopy migration may resume it.
            if let Some(b) = binding.as_mut() {
                b.failed();
            }
            Err(fail(admitted, e))
        }
    }
}

/// The CRL judgement of a live peer: its presented chain re-verified.
fn crl_judge(check: &crl_watch::PeerCheck, p: &LivePeer) -> Option<Revoked> {
    check.revoked(&p.chain).map(|reason| Revoked {
        cause: Cause::Crl,
        reason,
    })
}

/// Records a channel's end on its migration (managed mode): the API
/// shows the reason, so it is rendered here.
fn finish_channel(admitted: Route, why: &dyn std::fmt::Display) {
    if let Route::Ticket(g) = admitted {
        g.finish(Err(why.to_string()));
    }
}

/// A channel that failed after its admission: recorded on its migration.
fn fail(admitted: Route, failure: Failure) -> End {
    finish_channel(admitted, &failure);
    End::Failed(failure)
}

impl From<super::JoinedEnd> for Failure {
    fn from(e: super::JoinedEnd) -> Self {
        match e {
            super::JoinedEnd::Relay(e) => Failure::Relay(e),
            super::JoinedEnd::MainEnded(grace) => Failure::MainEnded(grace),
        }
    }
}

/// An admitted channel, as [`admit`] read it.
struct Admitted {
    /// The bytes read from the QEMU stream so far (to replay).
    prefix: Vec<u8>,
    kind: StreamKind,
    route: Route,
    /// The source asked for a binding token (a main channel's).
    bind: bool,
    /// The main channel this channel joined (postcopy preempt).
    joined: Option<Joined>,
}

/// Reads what admission needs (the hello, the stream's first bytes) and
/// asks [`Admission`] at each step.
async fn admit(
    tls: &mut TlsStream<crate::net::TlsSocket>,
    peer_dn: &str,
    miggate_peer: bool,
    target: &Target,
    deadline: Instant,
    out: &mut Outcome,
) -> Result<Admitted, Refusal> {
    let offer = Offer {
        route: target.current_route(),
        registry: target.registry.as_deref(),
        listener: target.listener,
        bindings: Some(&target.bindings),
    };
    let mut admission = Admission::new(peer_dn, miggate_peer, offer);
    let mut buf = Vec::with_capacity(SNIFF_MAX);
    let step = loop {
        match admission.decide(&buf) {
            Step::Read { from, max } => {
                let silent = buf.len() == from;
                let read = read_more(tls, &mut buf, from, max, deadline, target.stall);
                if miggate_peer {
                    if let Err(r) = read.await {
                        break Err(r);
                    }
                    continue;
                }
                // QEMU's own TLS: a silent connection may be a postcopy
                // preempt channel (see `native_join`).
                let joins = &target.native_joins;
                match joins.read_or_join(read, silent, peer_dn).await {
                    Ok(None) => {}
                    Ok(Some(j)) => return Ok(native_joined(j, buf, out)),
                    Err(r) => break Err(r),
                }
            }
            // ... and so may one whose first bytes are no QEMU stream.
            Step::Refused(r) if !miggate_peer => {
                match target.native_joins.headerless(r, peer_dn, deadline).await {
                    Ok(j) => return Ok(native_joined(j, buf, out)),
                    Err(r) => break Err(r),
                }
            }
            Step::Refused(r) => break Err(r),
            Step::Admitted { from, kind, route } => break Ok((from, kind, route)),
        }
    };
    out.migration = admission.migration().map(|m| m.id.clone());
    if let Some(kind) = admission.stream() {
        out.channel = Some(admit::channel_label(kind));
        out.vm = admit::stream_uuid(kind).map(|u| u.to_string());
    }
    // Taken for a native preempt channel, but its main channel is not
    // one to join.
    if let Err(Refusal::Join(JoinRefusal::AlreadyJoined | JoinRefusal::Ambiguous { .. })) = &step {
        out.channel = Some(admit::channel_label(&StreamKind::Preempt));
    }
    let (from, kind, route) = step?;
    if let Route::Ticket(g) = &route {
        out.counters = g.counters();
    }
    buf.drain(..from);
    Ok(Admitted {
        prefix: buf,
        kind,
        route,
        bind: admission.bind_requested(),
        joined: admission.take_joined(),
    })
}

/// A native-TLS connection admitted as its main channel's postcopy
/// preempt channel; `prefix`: what it sent so far (7.2's EOS marker).
fn native_joined(j: NativeJoin, prefix: Vec<u8>, out: &mut Outcome) -> Admitted {
    out.channel = Some(admit::channel_label(&StreamKind::Preempt));
    Admitted {
        prefix,
        kind: StreamKind::Preempt,
        route: Route::Static(j.route),
        bind: false,
        joined: Some(j.joined),
    }
}

/// Tells the peer which check failed ([`Refusal::public`]; a miggate
/// source gets a verdict frame, QEMU's own TLS has no channel for it and
/// just sees the connection close), then closes with close_notify.
/// Bounded: a peer that does not read is not waited for.
async fn refuse(tls: &mut TlsStream<crate::net::TlsSocket>, miggate_peer: bool, why: &Refusal) {
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
        let tls = crate::creds::tls::server_config(dir.path(), &[]).unwrap();
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

    /// A channel whose handshake used the CRL before the one now in force
    /// is judged by the new one once registered; one whose handshake used
    /// the current CRL is not re-verified; the static route's ACL always
    /// judges; `keep_live` spares both.
    #[test]
    fn judged_again_once_registered() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        crate::creds::pki::init(d, &Default::default()).unwrap();
        let tls = tls::server_config(d, &[]).unwrap();
        let route = StaticRoute {
            forward: "tcp:127.0.0.1:1".parse().unwrap(),
            authz: Arc::new(crate::authz::Simple::new("CN=someone else")),
            expect: Default::default(),
            nbd: None,
        };
        let t = Target::new(
            tls,
            None,
            None,
            Duration::from_secs(1),
            None,
            Limits::default(),
        );
        // No watcher: the test makes the changes happen, one at a time.
        t.revocation().x509_dir = Some(d.to_path_buf());
        let chain = tls::certs(&d.join(tls::CLIENT_CERT)).unwrap();
        let ticket = LivePeer {
            dn: "CN=x".into(),
            chain,
            static_route: false,
        };
        let (_, before) = t.tls_for_handshake();
        assert_eq!(t.judge_now(&ticket, before), None);

        crate::creds::pki::revoke(d, &d.join(tls::CLIENT_CERT), 30).unwrap();
        t.crl_changed(crl_watch::load(d));
        let (_, now) = t.tls_for_handshake();
        assert!(now > before);
        let why = t.judge_now(&ticket, before).expect("revoked since");
        assert_eq!(why.cause, Cause::Crl);
        assert_eq!(t.judge_now(&ticket, now), None, "its handshake saw the CRL");

        *t.route.write().unwrap() = Some(Arc::new(route));
        let on_route = LivePeer {
            static_route: true,
            ..ticket
        };
        assert_eq!(t.judge_now(&on_route, now).unwrap().cause, Cause::Acl);
        t.revocation().keep_live = true;
        assert_eq!(t.judge_now(&on_route, before), None);
    }
}
