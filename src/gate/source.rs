//! The source gateway: plain in from the source QEMU, TLS out to the
//! target gateway (or to a target QEMU with native TLS).
//!
//! Per local connection (the main channel and each multifd channel are
//! separate connections): read the first bytes of the QEMU stream (to know
//! which channel it is), connect and handshake with the target, then
//! - target is a miggate gateway (ALPN `miggate/1`): send hello + those
//!   bytes, wait for the verdict; on refusal log the reason and close the
//!   local connection, so that the source QEMU's migration fails and its VM
//!   keeps running;
//! - target is QEMU's native TLS (no ALPN): send the bytes and relay.
//!
//! On a unix listener bound to one process ([`LocalPeer`]), a connection
//! from any other pid is refused at accept, before a byte is read: the
//! ticket and the client certificate are the operator's, and only the
//! source QEMU of this migration may use them.
//!
//! ## Main channel first, into a target QEMU with native TLS
//!
//! A target QEMU with TLS (7.2 and 10.0.2 alike) takes the first channel
//! whose TLS handshake completes as the main channel and every later one
//! as a multifd (or postcopy preempt) channel:
//! `migration_ioc_process_incoming()` in migration/migration.c, reached
//! from the handshake callback `migration_tls_incoming_handshake()`
//! (migration/tls.c), decides by `!mis->from_src_file`. 7.2 knows nothing
//! else; 8.0 to 10.0 peek the channel's magic (QEVM or multifd) only when
//! it has `QIO_CHANNEL_FEATURE_READ_MSG_PEEK`, which plain sockets have
//! (io/channel-socket.c) and `QIOChannelTLS` does not. A multifd channel
//! that becomes "main" fails the migration; a main stream read as a
//! multifd init packet is 7.2's "multifd: received packet magic 5145564d
//! expected 11223344" (`multifd_recv_initial_packet()`, migration/multifd.c).
//!
//! And the handshakes do not overlap: `qio_channel_socket_accept()` leaves
//! the accepted socket blocking, and `qio_channel_tls_handshake()` starts
//! at once, so GnuTLS's reads block QEMU's main loop (QMP included) from
//! the accept until the handshake is done. Tried on 7.2 and 10.0.2: while
//! a TCP client that sends nothing is connected, QMP does not answer; and
//! a multifd channel held after its ClientHello kept the main channel's
//! handshake from ever running. So nothing may connect early "just to be
//! ready", nor pause in a handshake.
//!
//! The source QEMU may send a multifd channel's first bytes before the main
//! channel's (7.2 without `return-path` flushes the main stream's header
//! only after every multifd channel sent its sync packet: `ram_save_setup()`
//! in migration/ram.c). So a multifd channel connects to the target only
//! once a main channel's TLS handshake with it has completed: our client
//! Finished is then in QEMU's socket (loopback and a LAN keep the order),
//! and QEMU, blocked in that handshake until it reads it, registers the
//! main channel before it accepts the next connection. Whether the target
//! is a miggate gateway (which orders channels itself) is known only from
//! a handshake (ALPN), so the rule holds for both: it costs a multifd
//! channel one TCP + TLS handshake at the start of a migration (about a
//! millisecond on loopback, two round trips across a WAN), during which
//! the target gateway would have kept it waiting for the main channel's
//! admission anyway.
//!
//! The wait ends at the stall timeout, with the reason in the outcome
//! record; the local connection is then closed, so the source QEMU's
//! migration fails and its VM keeps running. A main channel counts while
//! its connection lives, as on the target gateway. A local process that
//! could open connections here could fake a main channel (to release the
//! multifd channels, or to keep one open so that the next migration's are
//! not held), but it could also feed the target anything with the
//! operator's certificate: `--source-qmp` leaves only the source QEMU's
//! own connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::joinable::{JoinBy, Joinable, MainInfo, NoJoin, PostcopyTap};
use super::revoke::LivePeer;
pub use super::revoke::SourceRevocation;
use super::{bounded_by_main, read_until, JoinedEnd, MainGuard};
use crate::admit::decide::sniff_decider;
use crate::admit::ticket::Ticket;
use crate::admit::{self, Refusal};
use crate::creds::{dn, tls};
use crate::net::Plain;
use crate::outcome::{Ending, Outcome, Sink};
use crate::relay::rekey::Rekeying;
use crate::relay::Close;
use crate::wire::frames::{self, FrameError, Hello, Secret, Verdict};
use crate::wire::nbd;
use crate::wire::qemu::{postcopy_advised, resume_stream, StreamKind, SNIFF_MAX};

pub struct SourceConfig {
    pub tls: Arc<ClientConfig>,
    /// The target gateway, HOST:PORT.
    pub connect: String,
    /// The name the target's certificate must carry (`--tls-hostname`).
    pub server_name: ServerName<'static>,
    pub stall: Duration,
    /// Refresh the TLS keys after every this many bytes sent on a channel
    /// (`--rekey-after-mib`); `None`: only at rustls' own limits.
    pub rekey_after: Option<u64>,
    /// Presented in the hello to a target daemon (managed mode).
    pub ticket: Option<Ticket>,
    pub sink: Option<Arc<dyn Sink>>,
    /// A recovery this gateway carries without having seen the cut
    /// (`miggate migrate --recover`): the binding token that resumes the
    /// cut main channel of the one local peer (`LocalListener::Unix`'s
    /// `only`), from the target daemon.
    pub resume: Option<Secret>,
}

/// The one process allowed to feed a gateway over its unix socket: the
/// source QEMU. Its multifd threads connect from the same process, and
/// `SO_PEERCRED` reports the process (thread group) id, so one pid covers
/// every channel of the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer {
    pub pid: i32,
    /// How the pid was learned, for the refusal reason
    /// (e.g. "the QEMU of QMP socket /run/vm1.qmp").
    pub known_as: String,
}

impl LocalPeer {
    /// `Err(reason)` unless `cred` is this peer's.
    pub fn check(&self, cred: &tokio::net::unix::UCred) -> Result<(), String> {
        match cred.pid() {
            Some(pid) if pid == self.pid => Ok(()),
            Some(pid) => Err(format!(
                "local peer pid {pid} (uid {}) is not the source QEMU (pid {}, {}); closed before anything was sent to the target",
                cred.uid(),
                self.pid,
                self.known_as
            )),
            None => Err(format!(
                "the kernel did not tell the local peer's pid (uid {}); only the source QEMU (pid {}) may connect",
                cred.uid(),
                self.pid
            )),
        }
    }
}

pub enum LocalListener {
    Tcp(TcpListener),
    /// `only`: the one process that may connect; `None`: whoever the
    /// socket file's mode lets in.
    Unix {
        listener: UnixListener,
        path: PathBuf,
        only: Option<LocalPeer>,
    },
}

impl LocalListener {
    /// An accepted connection, or `Err(reason)` for one from a process
    /// that may not feed this gateway (already closed).
    async fn accept(
        &self,
    ) -> std::io::Result<Result<(Plain, Option<std::net::SocketAddr>), String>> {
        match self {
            LocalListener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                crate::net::tune(&s);
                Ok(Ok((Plain::Tcp(s), Some(a))))
            }
            LocalListener::Unix { listener, only, .. } => {
                let (s, _) = listener.accept().await?;
                if let Some(peer) = only {
                    let checked = s.peer_cred().map_err(|e| {
                        format!("cannot read the local peer's credentials (SO_PEERCRED): {e}")
                    });
                    if let Err(reason) = checked.and_then(|cred| peer.check(&cred)) {
                        return Ok(Err(reason));
                    }
                }
                Ok(Ok((Plain::Unix(s), None)))
            }
        }
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if let LocalListener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub async fn serve(listener: LocalListener, cfg: SourceConfig) -> std::io::Result<()> {
    serve_with(listener, Arc::new(cfg), None).await
}

/// [`serve`], with `ca-crl.pem` watched (`miggate source`): new CRLs apply
/// to new handshakes, and unless `--keep-live-on-acl-change` a live
/// channel whose target's certificate a new CRL revokes is cut.
pub async fn serve_with(
    listener: LocalListener,
    cfg: Arc<SourceConfig>,
    revocation: Option<Arc<SourceRevocation>>,
) -> std::io::Result<()> {
    let mains = watch::Sender::new(0usize);
    let joinable = match (&cfg.resume, &listener) {
        (
            Some(token),
            LocalListener::Unix {
                only: Some(peer), ..
            },
        ) => Joinable::with_paused(peer.pid, token.clone()),
        _ => Joinable::default(),
    };
    accept_each(&listener, cfg.sink.clone(), move |local, mut out| {
        let (cfg, mains, joinable) = (cfg.clone(), mains.clone(), joinable.clone());
        let revocation = revocation.clone();
        async move {
            let rev = revocation.as_deref();
            let r = handle(local, &cfg, rev, &mains, &joinable, &mut out).await;
            finish(out, r);
        }
    })
    .await
}

/// Accepts forever; a connection from a process that may not feed this
/// gateway is recorded as refused before one byte is read (no ticket, no
/// target); every other one runs `handle` in a task of its own, with its
/// outcome record.
async fn accept_each<F, Fut>(
    listener: &LocalListener,
    sink: Option<Arc<dyn Sink>>,
    handle: F,
) -> std::io::Result<()>
where
    F: Fn(Plain, Outcome) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (local, addr) = match accepted {
            Ok(x) => x,
            Err(reason) => {
                let mut out = Outcome::new("source", None);
                out.sink = sink.clone();
                out.finish(Ending::Refused, Some(&reason));
                continue;
            }
        };
        let mut out = Outcome::new("source", addr);
        out.sink = sink.clone();
        tokio::spawn(handle(local, out));
    }
}

/// A connection's record, from how its handler ended.
fn finish(out: Outcome, result: Result<(), (Ending, String)>) {
    match result {
        Ok(()) => out.finish(Ending::Completed, None),
        Err((ending, reason)) => out.finish(ending, Some(&reason)),
    }
}

/// Accepts the source QEMU's NBD connections (storage migration: its
/// `nbd` block node points here) and carries each to the target gateway
/// as an NBD channel of this gateway's migration ([`crate::wire::nbd`]).
pub async fn serve_nbd(
    listener: LocalListener,
    cfg: Arc<SourceConfig>,
    revocation: Option<Arc<SourceRevocation>>,
) -> std::io::Result<()> {
    accept_each(&listener, cfg.sink.clone(), move |local, mut out| {
        let (cfg, revocation) = (cfg.clone(), revocation.clone());
        async move {
            let r = handle_nbd(local, &cfg, revocation.as_deref(), &mut out).await;
            finish(out, r);
        }
    })
    .await
}

/// One NBD connection: greet the client as its server would, up to the
/// option that names its export; then hello + its opening to the target
/// gateway, and its verdict; then relay. A refusal reaches the source
/// QEMU as the error of its pending option (its block job shows it).
async fn handle_nbd(
    mut local: Plain,
    cfg: &SourceConfig,
    revocation: Option<&SourceRevocation>,
    out: &mut Outcome,
) -> Result<(), (Ending, String)> {
    let failed = |msg: String| (Ending::Failed, msg);
    let deadline = Instant::now() + cfg.stall;
    let opening = match tokio::time::timeout_at(deadline, nbd::greet_client(&mut local)).await {
        Err(_) => {
            return Err(failed(format!(
                "source QEMU's NBD client named no export within {} s",
                cfg.stall.as_secs()
            )))
        }
        Ok(Err(e)) => return Err(failed(format!("source QEMU's NBD client: {e}"))),
        Ok(Ok(o)) => o,
    };
    out.channel = Some(admit::channel_label(&StreamKind::Nbd {
        export: opening.export.clone(),
    }));
    let deadline = Instant::now() + cfg.stall;
    let (mut tls, config, host) = match connect_target(cfg, revocation, deadline).await {
        Ok(x) => x,
        Err(e) => {
            refuse_nbd(&mut local, &opening.naming, &e.1, cfg.stall).await;
            return Err(e);
        }
    };
    let conn = tls.get_ref().1;
    out.peer_dn = tls::peer_leaf(conn.peer_certificates()).and_then(|c| dn::subject_dn(c).ok());
    if conn.alpn_protocol() != Some(tls::ALPN_MIGGATE) {
        let why = format!(
            "{} is not a miggate gateway: an NBD channel needs one (QEMU's own NBD TLS starts inside the NBD negotiation, with NBD_OPT_STARTTLS)",
            cfg.connect
        );
        refuse_nbd(&mut local, &opening.naming, &why, cfg.stall).await;
        return Err(failed(why));
    }
    let hello = Hello {
        ticket: cfg.ticket.as_ref().map(|t| frames::Secret::new(t.expose())),
        nbd: true,
        ..Hello::default()
    };
    let mut first = frames::encode_hello(&hello);
    first.extend_from_slice(&opening.prefix);
    let sent = async {
        tls.write_all(&first).await?;
        tls.flush().await
    };
    if let Err(e) = sent.await {
        let why = format!(
            "cannot send to {}: {}",
            cfg.connect,
            tls::describe_tls_error(&e, Some(&host))
        );
        refuse_nbd(&mut local, &opening.naming, &why, cfg.stall).await;
        return Err(failed(why));
    }
    out.counters.forward.fetch_add(
        opening.prefix.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let verdict = tokio::time::timeout(cfg.stall, frames::read_verdict(&mut tls)).await;
    let refused = match verdict {
        Ok(Ok(Verdict::Admitted)) => None,
        Ok(Ok(Verdict::Refused { reason })) => {
            Some((Ending::Refused, format!("target refused: {reason}")))
        }
        Ok(Ok(Verdict::Bound { .. })) => Some(failed(
            "target gateway bound an NBD channel as a main channel".into(),
        )),
        Err(_) => Some(failed(format!(
            "target gateway gave no verdict within {} s",
            cfg.stall.as_secs()
        ))),
        Ok(Err(FrameError::Closed { .. })) => Some(failed(
            "target gateway closed the connection without a verdict".into(),
        )),
        Ok(Err(e)) => Some(failed(format!("target gateway: {e}"))),
    };
    if let Some((ending, why)) = refused {
        refuse_nbd(&mut local, &opening.naming, &why, cfg.stall).await;
        return Err((ending, why));
    }
    out.admitted();
    let mut live = None;
    if let Some(r) = revocation {
        let peer = LivePeer {
            dn: out.peer_dn.clone().unwrap_or_default(),
            chain: tls
                .get_ref()
                .1
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            static_route: false,
        };
        live = Some(r.live.register(peer.clone()));
        if let Some(why) = r.judge_since(&config, &peer) {
            return Err(failed(why.reason));
        }
    }
    let names = ("source->target", "target->source");
    let closes = (Close::AnyEof, Close::tls_peer(true, "target"));
    let idle = crate::timeouts::NBD_IDLE;
    let counters = out.counters.clone();
    let tls = Rekeying::optional(
        tls,
        cfg.rekey_after,
        crate::timeouts::MIN_REKEY_GAP,
        counters.clone(),
    );
    let relay = crate::relay::relay(local, tls, names, closes, idle, counters);
    let relayed = match live.as_mut() {
        Some(g) => tokio::select! {
            r = relay => r,
            why = g.revoked() => return Err(failed(why.reason)),
        },
        None => relay.await,
    };
    relayed.map_err(|e| failed(e.to_string()))
}

/// [`nbd::refuse_client`], for at most `stall`.
async fn refuse_nbd(local: &mut Plain, naming: &nbd::OptFrame, why: &str, stall: Duration) {
    let _ = tokio::time::timeout(stall, nbd::refuse_client(local, naming, why)).await;
}

fn hostname(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "(unknown)".into(),
    }
}

/// What a local connection is.
enum Class {
    /// Recognised from its first bytes (`None`: unrecognised, passed on
    /// for the target to judge).
    Stream(Option<StreamKind>),
    /// The postcopy preempt channel of this main channel: see `joinable`.
    Preempt(MainInfo),
    /// A main channel resuming a cut postcopy migration, as the cut main
    /// channel was admitted.
    Resume(JoinBy),
}

/// Reads the first bytes of a local connection until they say what it is,
/// or until it turns out to be the silent preempt channel of a postcopy
/// main channel from the same process.
async fn classify(
    local: &mut Plain,
    prefix: &mut Vec<u8>,
    pid: Option<i32>,
    joinable: &Joinable,
    cfg: &SourceConfig,
    deadline: Instant,
) -> Result<Class, (Ending, String)> {
    let failed = |msg: String| (Ending::Failed, msg);
    enum First {
        Read(Result<Result<StreamKind, Refusal>, Refusal>),
        Main(Result<MainInfo, NoJoin>),
    }
    let first = tokio::select! {
        r = read_until(local, prefix, deadline, cfg.stall, SNIFF_MAX, sniff_decider(0)) => First::Read(r),
        m = joinable.wait_for_main(pid) => First::Main(m),
    };
    // A command where a header would be: a postcopy recovery's main channel.
    let resumed = |prefix: &[u8]| prefix.first() == Some(&0x08);
    match first {
        First::Read(Ok(Ok(kind))) => Ok(Class::Stream(Some(kind))),
        First::Read(Ok(Err(_)) | Err(Refusal::Stream(_))) if resumed(prefix) => {
            resume(local, prefix, pid, joinable, cfg, deadline).await
        }
        // Not a QEMU header: 7.2's preempt channel sends a bare RAM_SAVE_FLAG_EOS
        // when postcopy starts, maybe before its main channel was admitted.
        First::Read(Ok(Err(_)) | Err(Refusal::Stream(_))) => {
            match tokio::time::timeout_at(deadline, joinable.wait_for_main(pid)).await {
                Ok(Ok(main)) => Ok(Class::Preempt(main)),
                Ok(Err(e)) => Err(failed(format!("source QEMU: {e}"))),
                Err(_) => Ok(Class::Stream(None)),
            }
        }
        First::Read(Err(r)) => Err(failed(format!("source QEMU: {r}"))),
        First::Main(_) if resumed(prefix) => {
            resume(local, prefix, pid, joinable, cfg, deadline).await
        }
        First::Main(found) => match crate::wire::qemu::sniff(prefix) {
            // Part of a QEMU header arrived: it is not the preempt channel.
            Err(crate::wire::qemu::SniffError::Incomplete) if !prefix.is_empty() => {
                let decide = sniff_decider(0);
                match read_until(local, prefix, deadline, cfg.stall, SNIFF_MAX, decide).await {
                    Ok(Ok(kind)) => Ok(Class::Stream(Some(kind))),
                    Ok(Err(_)) | Err(Refusal::Stream(_)) => Ok(Class::Stream(None)),
                    Err(r) => Err(failed(format!("source QEMU: {r}"))),
                }
            }
            Ok(kind) => Ok(Class::Stream(Some(kind))),
            Err(_) => found
                .map(Class::Preempt)
                .map_err(|e| failed(format!("source QEMU: {e}"))),
        },
    }
}

/// A connection that starts with a command: if it is a recovery's main
/// channel, it resumes this process's cut postcopy main channel.
async fn resume(
    local: &mut Plain,
    prefix: &mut Vec<u8>,
    pid: Option<i32>,
    joinable: &Joinable,
    cfg: &SourceConfig,
    deadline: Instant,
) -> Result<Class, (Ending, String)> {
    match read_until(local, prefix, deadline, cfg.stall, 64, resume_stream).await {
        Ok(true) => joinable
            .take_paused(pid)
            .map(Class::Resume)
            .map_err(|e| (Ending::Failed, format!("source QEMU: {e}"))),
        // Passed on for the target to judge, like any unrecognised stream.
        Ok(false) | Err(Refusal::Stream(_)) => Ok(Class::Stream(None)),
        Err(r) => Err((Ending::Failed, format!("source QEMU: {r}"))),
    }
}

/// Connects to the target and completes the TLS handshake by `deadline`;
/// returns the stream, the client configuration it used (the CRL in
/// force) and the target's name for messages.
async fn connect_target(
    cfg: &SourceConfig,
    revocation: Option<&SourceRevocation>,
    deadline: Instant,
) -> Result<(Tls, Arc<ClientConfig>, String), (Ending, String)> {
    let failed = |msg: String| (Ending::Failed, msg);
    let sock = match tokio::time::timeout_at(deadline, TcpStream::connect(&cfg.connect)).await {
        Err(_) => {
            return Err(failed(format!(
                "cannot connect to {}: no answer in {} s",
                cfg.connect,
                cfg.stall.as_secs()
            )))
        }
        Ok(Err(e)) => return Err(failed(format!("cannot connect to {}: {e}", cfg.connect))),
        Ok(Ok(s)) => s,
    };
    crate::net::tune(&sock);
    let host = hostname(&cfg.server_name);
    let config = revocation.map_or_else(|| cfg.tls.clone(), SourceRevocation::tls);
    let connector = TlsConnector::from(config.clone());
    let tls = match tokio::time::timeout_at(
        deadline,
        connector.connect(
            cfg.server_name.clone(),
            crate::net::socket::tls_socket(sock),
        ),
    )
    .await
    {
        Err(_) => {
            return Err(failed(format!(
                "TLS handshake with {} did not complete within {} s",
                cfg.connect,
                cfg.stall.as_secs()
            )))
        }
        Ok(Err(e)) => return Err(failed(tls::describe_tls_error(&e, Some(&host)))),
        Ok(Ok(s)) => s,
    };
    // A key update is a TLS 1.3 message: refuse before sending anything
    // rather than fail the migration after N MiB.
    if cfg.rekey_after.is_some()
        && tls.get_ref().1.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
    {
        return Err(failed(format!(
            "--rekey-after-mib needs TLS 1.3, but {} negotiated {:?}",
            cfg.connect,
            tls.get_ref().1.protocol_version()
        )));
    }
    Ok((tls, config, host))
}

type Tls = tokio_rustls::client::TlsStream<crate::net::TlsSocket>;

async fn handle(
    mut local: Plain,
    cfg: &SourceConfig,
    revocation: Option<&SourceRevocation>,
    mains: &watch::Sender<usize>,
    joinable: &Joinable,
    out: &mut Outcome,
) -> Result<(), (Ending, String)> {
    let failed = |msg: String| (Ending::Failed, msg);
    let deadline = Instant::now() + cfg.stall;
    let pid = match &local {
        Plain::Unix(s) => s.peer_cred().ok().and_then(|c| c.pid()),
        Plain::Tcp(_) => None,
    };
    let mut prefix = Vec::with_capacity(SNIFF_MAX);
    // Knowing the channel is for the log (and the preempt channel); the
    // target makes the decision, so a stream we do not recognise is still
    // passed on for it to judge.
    let (kind, preempt_of, resume) =
        match classify(&mut local, &mut prefix, pid, joinable, cfg, deadline).await? {
            Class::Stream(kind) => (kind, None, None),
            Class::Preempt(main) => (Some(StreamKind::Preempt), Some(main), None),
            Class::Resume(join) => (Some(StreamKind::Resumed), None, Some(join)),
        };
    if let Some(kind) = &kind {
        out.channel = Some(admit::channel_label(kind));
        out.vm = admit::stream_uuid(kind).map(|u| u.to_string());
    }
    // A main channel a preempt channel may join, while it lives; a
    // resumed one is postcopy by definition.
    let entry = match kind {
        Some(StreamKind::Main { .. }) => Some(postcopy_advised(&prefix)),
        Some(StreamKind::Resumed) => Some(Some(true)),
        _ => None,
    }
    .map(|postcopy| Arc::new(joinable.register(pid, postcopy)));

    // Main channel first: see the module comment.
    if let Some(StreamKind::Multifd { .. }) = kind {
        let mut rx = mains.subscribe();
        let main = rx.wait_for(|n| *n > 0);
        if tokio::time::timeout(cfg.stall, main).await.is_err() {
            return Err(failed(format!(
                "multifd channel: no main channel of the migration was connected to {} within {} s, \
                 and a multifd channel may not connect before it",
                cfg.connect,
                cfg.stall.as_secs()
            )));
        }
    }

    let deadline = Instant::now() + cfg.stall;
    let (mut tls, config, host) = connect_target(cfg, revocation, deadline).await?;
    // Lives until the channel ends.
    let _main = matches!(kind, Some(StreamKind::Main { .. })).then(|| MainGuard::new(mains));
    let miggate_peer = {
        let conn = tls.get_ref().1;
        out.peer_dn = tls::peer_leaf(conn.peer_certificates()).and_then(|c| dn::subject_dn(c).ok());
        conn.alpn_protocol() == Some(tls::ALPN_MIGGATE)
    };

    // A preempt channel joins its main channel the way the target took it.
    let join = match (&preempt_of, miggate_peer) {
        (None, _) => None,
        (Some(main), _) => match (main.join(), miggate_peer) {
            (Some(JoinBy::Token(t)), true) => Some(t.clone()),
            (Some(JoinBy::Native), false) => None,
            (Some(JoinBy::Unsupported), _) => {
                return Err(failed(format!(
                    "postcopy preempt channel: the target gateway at {} admitted the main channel without a binding token (an older miggate); it cannot take a preempt channel",
                    cfg.connect
                )))
            }
            (_, true) => {
                return Err(failed(format!(
                    "postcopy preempt channel: {} is a miggate gateway but its main channel went to a QEMU with native TLS",
                    cfg.connect
                )))
            }
            (_, false) => {
                return Err(failed(format!(
                    "postcopy preempt channel: {} is a QEMU with native TLS but its main channel went to a miggate gateway",
                    cfg.connect
                )))
            }
        },
    };
    // A resumed main channel presents the cut one's token to a miggate
    // target; a target QEMU with native TLS just takes the connection.
    let resume = match (resume, miggate_peer) {
        (None, _) | (Some(JoinBy::Native), false) => None,
        (Some(JoinBy::Token(t)), true) => Some(t),
        (Some(_), true) => {
            return Err(failed(format!(
                "postcopy recovery: {} is a miggate gateway, but the cut main channel went to a QEMU with native TLS",
                cfg.connect
            )))
        }
        (Some(_), false) => {
            return Err(failed(format!(
                "postcopy recovery: {} is a QEMU with native TLS, but the cut main channel went to a miggate gateway",
                cfg.connect
            )))
        }
    };
    let mut first = Vec::with_capacity(prefix.len() + 64);
    if miggate_peer {
        let hello = Hello {
            ticket: cfg.ticket.as_ref().map(|t| frames::Secret::new(t.expose())),
            // Every main channel: whether a preempt channel will follow is
            // known only from the stream, maybe after the verdict.
            bind: entry.is_some(),
            join,
            resume,
            ..Hello::default()
        };
        first.extend_from_slice(&frames::encode_hello(&hello));
    } else if let Some(e) = &entry {
        e.admitted(JoinBy::Native);
    }
    first.extend_from_slice(&prefix);
    tls.write_all(&first).await.map_err(|e| {
        failed(format!(
            "cannot send to {}: {}",
            cfg.connect,
            tls::describe_tls_error(&e, Some(&host))
        ))
    })?;
    tls.flush()
        .await
        .map_err(|e| failed(format!("cannot send to {}: {e}", cfg.connect)))?;
    out.counters
        .forward
        .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);

    if miggate_peer {
        let verdict = tokio::time::timeout(cfg.stall, frames::read_verdict(&mut tls)).await;
        match verdict {
            Err(_) => {
                return Err(failed(format!(
                    "target gateway gave no verdict within {} s",
                    cfg.stall.as_secs()
                )))
            }
            Ok(Ok(Verdict::Admitted)) => {
                if let Some(e) = &entry {
                    e.admitted(JoinBy::Unsupported);
                }
                out.admitted()
            }
            Ok(Ok(Verdict::Bound { token })) => {
                if let Some(e) = &entry {
                    e.admitted(JoinBy::Token(token));
                }
                out.admitted()
            }
            Ok(Ok(Verdict::Refused { reason })) => {
                return Err((Ending::Refused, format!("target refused: {reason}")))
            }
            Ok(Err(FrameError::Io { source, .. })) => {
                return Err((
                    Ending::Refused,
                    tls::describe_tls_error(&source, Some(&host)),
                ))
            }
            Ok(Err(FrameError::Closed { .. })) => {
                return Err(failed(
                    "target gateway closed the connection without a verdict".into(),
                ))
            }
            Ok(Err(e)) => return Err(failed(format!("target gateway: {e}"))),
        }
    }
    if let Plain::Tcp(s) = &local {
        crate::net::socket::open_window(s);
    }
    // From now on a CRL revoking the target's certificate cuts this
    // channel (see `revoke`).
    let mut live = None;
    if let Some(r) = revocation {
        let chain = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
        let peer = LivePeer {
            dn: out.peer_dn.clone().unwrap_or_default(),
            chain: chain.unwrap_or_default(),
            static_route: false,
        };
        // Registered first, judged second: a CRL taken in between is
        // seen by one or the other.
        live = Some(r.live.register(peer.clone()));
        if let Some(why) = r.judge_since(&config, &peer) {
            if let Some(e) = &entry {
                e.failed();
            }
            return Err(failed(why.reason));
        }
    }
    let names = ("source->target", "target->source");
    let closes = (Close::AnyEof, Close::tls_peer(miggate_peer, "target"));
    // A main channel's stream says whether a preempt channel may join it;
    // `entry` itself lives until the channel ends.
    let local = match &entry {
        // A resumed one was registered as postcopy, and has no header.
        Some(e) if kind != Some(StreamKind::Resumed) => PostcopyTap::new(local, &prefix, e.clone()),
        _ => PostcopyTap::passthrough(local),
    };
    // A preempt channel is idle whenever the target faults on no page: it
    // lives as long as its main channel instead.
    let idle = match &preempt_of {
        Some(_) => crate::timeouts::JOINED_IDLE,
        None => cfg.stall,
    };
    let main_ended = preempt_of.as_ref().map(|m| joinable.ended(m));
    let counters = out.counters.clone();
    let relay = async move {
        match cfg.rekey_after {
            Some(every) => {
                let tls =
                    Rekeying::new(tls, every, crate::timeouts::MIN_REKEY_GAP, counters.clone());
                let relay = crate::relay::relay(local, tls, names, closes, idle, counters);
                bounded_by_main(relay, main_ended, cfg.stall).await
            }
            None => {
                let relay = crate::relay::relay(local, tls, names, closes, idle, counters);
                bounded_by_main(relay, main_ended, cfg.stall).await
            }
        }
    };
    // Dropping the relay closes both sockets: the source QEMU's migration
    // fails, its VM keeps running.
    let (relayed, revoked) = match live.as_mut() {
        Some(g) => tokio::select! {
            r = relay => (r, None),
            why = g.revoked() => (Ok(()), Some(why)),
        },
        None => (relay.await, None),
    };
    if let Some(why) = revoked {
        if let Some(e) = &entry {
            e.failed();
        }
        return Err(failed(why.reason));
    }
    if relayed.is_err() {
        // Cut: a postcopy migration may resume it (see `joinable`).
        if let Some(e) = &entry {
            e.failed();
        }
    }
    relayed.map_err(|e| match e {
        JoinedEnd::Relay(e) => failed(e.to_string()),
        JoinedEnd::MainEnded(grace) => failed(format!(
            "postcopy preempt channel still open {} s after its main channel ended",
            grace.as_secs()
        )),
    })
}
