//! The target gateway: TLS in, plain out to the target QEMU.
//!
//! Per connection: TLS handshake (client certificate required) -> subject
//! DN -> authz -> (miggate source: hello frame) -> sniff the QEMU stream
//! (main channel or multifd init packet, VM UUID) -> connect the target
//! QEMU -> verdict -> relay. Nothing reaches the target QEMU before every
//! check has passed, so a refused connection leaves it ready for the right
//! migration.
//!
//! QEMU up to 7.2 takes the *first* connection it accepts as the main
//! channel, while TLS handshakes can finish in any order; multifd channels
//! therefore wait until a main channel is being forwarded before their own
//! connection to the target QEMU is opened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{read_until, sniff_decider, Endpoint};
use crate::admit::{self, Expectation, Refusal};
use crate::authz::Authz;
use crate::creds::{dn, tls};
use crate::outcome::{Ending, Outcome};
use crate::wire::frames::{self, Verdict};
use crate::wire::qemu::{StreamKind, SNIFF_MAX};

pub struct TargetConfig {
    pub tls: Arc<ServerConfig>,
    pub forward: Endpoint,
    pub authz: Arc<dyn Authz>,
    pub expect: Expectation,
    pub stall: Duration,
}

/// Shared state of one target gateway.
struct State {
    cfg: TargetConfig,
    /// Main channels currently being forwarded to the target QEMU.
    mains: watch::Sender<usize>,
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, cfg: TargetConfig) -> std::io::Result<()> {
    let state = Arc::new(State {
        cfg,
        mains: watch::Sender::new(0),
    });
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        crate::timeouts::tune(&sock);
        let state = state.clone();
        tokio::spawn(async move {
            let mut out = Outcome::new("target", Some(addr));
            match handle(sock, addr, &state, &mut out).await {
                Ok(()) => out.finish(Ending::Completed, None),
                Err(End::Refused(r)) => out.finish(Ending::Refused, Some(&r.to_string())),
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
struct MainGuard<'a>(&'a watch::Sender<usize>);

impl<'a> MainGuard<'a> {
    fn new(tx: &'a watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        MainGuard(tx)
    }
}

impl Drop for MainGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

async fn handle(
    sock: TcpStream,
    _addr: SocketAddr,
    state: &State,
    out: &mut Outcome,
) -> Result<(), End> {
    let cfg = &state.cfg;
    let deadline = Instant::now() + cfg.stall;
    let acceptor = TlsAcceptor::from(cfg.tls.clone());
    let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(sock)).await {
        Err(_) => {
            return Err(Refusal::Tls(format!(
                "TLS handshake did not complete within {} s",
                cfg.stall.as_secs()
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
    let result = admit(&mut tls, &leaf, miggate_peer, state, deadline, out).await;
    let (prefix, kind) = match result {
        Ok(x) => x,
        Err(refusal) => {
            refuse(&mut tls, miggate_peer, &refusal).await;
            return Err(refusal.into());
        }
    };

    // Main first: see the module comment.
    let _main_guard;
    match kind {
        StreamKind::Main { .. } => _main_guard = MainGuard::new(&state.mains),
        StreamKind::Multifd { .. } => {
            let mut rx = state.mains.subscribe();
            let wait = rx.wait_for(|n| *n > 0);
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                let r = Refusal::Stream(format!(
                    "multifd channel arrived but no main channel of a migration was admitted within {} s",
                    cfg.stall.as_secs()
                ));
                refuse(&mut tls, miggate_peer, &r).await;
                return Err(r.into());
            }
        }
    }

    let mut backend = match cfg.forward.connect().await {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("cannot reach the target QEMU at {}: {e}", cfg.forward);
            refuse(&mut tls, miggate_peer, &Refusal::Stream(msg.clone())).await;
            return Err(End::Failed(msg));
        }
    };
    if miggate_peer {
        frames::write_verdict(&mut tls, &Verdict::Admitted)
            .await
            .map_err(|e| End::Failed(format!("cannot send the verdict to the source: {e}")))?;
    }
    tracing::info!(
        peer.dn = out.peer_dn.as_deref().unwrap_or("-"),
        channel = out.channel.as_deref().unwrap_or("-"),
        forward = %cfg.forward,
        "admitted"
    );
    backend.write_all(&prefix).await.map_err(|e| {
        End::Failed(format!(
            "cannot write to the target QEMU at {}: {e}",
            cfg.forward
        ))
    })?;
    out.counters
        .forward
        .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);
    crate::relay::relay(
        tls,
        backend,
        ("source->target", "target->source"),
        cfg.stall,
        out.counters.clone(),
    )
    .await
    .map_err(|e| End::Failed(e.to_string()))
}

/// Identity, authz, hello and stream checks. Returns the bytes read from
/// the QEMU stream so far (to replay) and what the stream is.
async fn admit(
    tls: &mut TlsStream<TcpStream>,
    leaf: &[u8],
    miggate_peer: bool,
    state: &State,
    deadline: Instant,
    out: &mut Outcome,
) -> Result<(Vec<u8>, StreamKind), Refusal> {
    let cfg = &state.cfg;
    let peer_dn = dn::subject_dn(leaf)
        .map_err(|e| Refusal::Tls(format!("peer certificate subject unreadable: {e}")))?;
    out.peer_dn = Some(peer_dn.clone());
    admit::check_identity(cfg.authz.as_ref(), &peer_dn)?;

    let mut buf = Vec::with_capacity(SNIFF_MAX);
    let mut skip = 0;
    if miggate_peer {
        let max = frames::MAX_FRAME + 6;
        let hello = read_until(tls, &mut buf, deadline, cfg.stall, max, |b| {
            frames::parse_hello(b).transpose()
        })
        .await?
        .map_err(|e| Refusal::Stream(e.to_string()))?;
        skip = hello.1;
    }
    let kind = read_until(
        tls,
        &mut buf,
        deadline,
        cfg.stall,
        skip + SNIFF_MAX,
        sniff_decider(skip),
    )
    .await??;
    out.channel = Some(admit::channel_label(&kind));
    out.vm = admit::stream_uuid(&kind).map(|u| u.to_string());
    admit::check_stream(&cfg.expect, &kind)?;
    buf.drain(..skip);
    Ok((buf, kind))
}

/// Tells the peer why (a miggate source gets a verdict frame; QEMU's own
/// TLS has no channel for it and just sees the connection close), then
/// closes with close_notify. Bounded: a peer that does not read is not
/// waited for.
async fn refuse(tls: &mut TlsStream<TcpStream>, miggate_peer: bool, why: &Refusal) {
    let send = async {
        if miggate_peer {
            let v = Verdict::Refused {
                reason: why.to_string(),
            };
            frames::write_verdict(tls, &v).await?;
        }
        tls.shutdown().await
    };
    let _ = tokio::time::timeout(crate::timeouts::VERDICT_WRITE, send).await;
}
