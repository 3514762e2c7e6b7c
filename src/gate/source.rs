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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::{read_until, sniff_decider, Plain};
use crate::admit::ticket::Ticket;
use crate::admit::{self, Refusal};
use crate::creds::{dn, tls};
use crate::outcome::{Ending, Outcome, Sink};
use crate::relay::rekey::Rekeying;
use crate::relay::Close;
use crate::wire::frames::{self, FrameError, Hello, Verdict};
use crate::wire::qemu::SNIFF_MAX;

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
}

pub enum LocalListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl LocalListener {
    async fn accept(&self) -> std::io::Result<(Plain, Option<std::net::SocketAddr>)> {
        match self {
            LocalListener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                crate::timeouts::tune(&s);
                Ok((Plain::Tcp(s), Some(a)))
            }
            LocalListener::Unix(l, _) => Ok((Plain::Unix(l.accept().await?.0), None)),
        }
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if let LocalListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub async fn serve(listener: LocalListener, cfg: SourceConfig) -> std::io::Result<()> {
    let cfg = Arc::new(cfg);
    loop {
        let (local, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut out = Outcome::new("source", addr);
            out.sink = cfg.sink.clone();
            match handle(local, &cfg, &mut out).await {
                Ok(()) => out.finish(Ending::Completed, None),
                Err((ending, reason)) => out.finish(ending, Some(&reason)),
            }
        });
    }
}

fn hostname(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "(unknown)".into(),
    }
}

async fn handle(
    mut local: Plain,
    cfg: &SourceConfig,
    out: &mut Outcome,
) -> Result<(), (Ending, String)> {
    let failed = |msg: String| (Ending::Failed, msg);
    let deadline = Instant::now() + cfg.stall;
    let mut prefix = Vec::with_capacity(SNIFF_MAX);
    // Knowing the channel is for the log; the target makes the decision, so
    // a stream we do not recognise is still passed on for it to judge.
    match read_until(
        &mut local,
        &mut prefix,
        deadline,
        cfg.stall,
        SNIFF_MAX,
        sniff_decider(0),
    )
    .await
    {
        Ok(Ok(kind)) => {
            out.channel = Some(admit::channel_label(&kind));
            out.vm = admit::stream_uuid(&kind).map(|u| u.to_string());
        }
        Ok(Err(_)) | Err(Refusal::Stream(_)) => {}
        Err(r) => return Err(failed(format!("source QEMU: {r}"))),
    }

    let deadline = Instant::now() + cfg.stall;
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
    crate::timeouts::tune(&sock);
    let host = hostname(&cfg.server_name);
    let connector = TlsConnector::from(cfg.tls.clone());
    let mut tls = match tokio::time::timeout_at(
        deadline,
        connector.connect(cfg.server_name.clone(), crate::timeouts::tls_socket(sock)),
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
    let miggate_peer = {
        let conn = tls.get_ref().1;
        out.peer_dn = tls::peer_leaf(conn.peer_certificates()).and_then(|c| dn::subject_dn(c).ok());
        conn.alpn_protocol() == Some(tls::ALPN_MIGGATE)
    };

    let mut first = Vec::with_capacity(prefix.len() + 64);
    if miggate_peer {
        let hello = Hello {
            ticket: cfg.ticket.as_ref().map(|t| t.expose().to_string()),
            ..Hello::default()
        };
        first.extend_from_slice(&frames::encode_hello(&hello));
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
            Ok(Ok(Verdict::Admitted)) => out.admitted(),
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
        crate::timeouts::open_window(s);
    }
    let names = ("source->target", "target->source");
    let closes = (Close::AnyEof, Close::tls_peer(miggate_peer, "target"));
    let relayed = match cfg.rekey_after {
        Some(every) => {
            let tls = Rekeying::new(
                tls,
                every,
                crate::timeouts::MIN_REKEY_GAP,
                out.counters.clone(),
            );
            crate::relay::relay(local, tls, names, closes, cfg.stall, out.counters.clone()).await
        }
        None => {
            crate::relay::relay(local, tls, names, closes, cfg.stall, out.counters.clone()).await
        }
    };
    relayed.map_err(|e| failed(e.to_string()))
}
