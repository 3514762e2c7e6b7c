//! Handshake + admission latency of the target gateway, and the gateways'
//! memory: idle, and per open channel.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::local::{Local, LocalKind};
use super::peers::{self, Installed, MiggateChecks, TLS_HOSTNAME};
use super::{sys, QEMU_PREFIX};
use miggate::creds::tls;
use miggate::wire::frames::{self, Hello, Verdict};

/// Bytes pushed through each held channel before its RSS is read, so that
/// the relay's buffers are really in use.
const WARM_BYTES: usize = 1 << 20;
/// How long the gateways get to settle before an RSS reading.
const SETTLE: Duration = Duration::from_millis(300);
/// Limit for the held channels to be admitted and warmed.
const WARM_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Report {
    pub connections: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub channels: usize,
    pub target_idle_kib: u64,
    pub source_idle_kib: u64,
    /// RSS growth per held channel, KiB.
    pub target_per_channel_kib: f64,
    pub source_per_channel_kib: f64,
    /// Handshakes held stalled after their ClientHello, and the target's
    /// RSS growth per stalled handshake, KiB.
    pub stalled: usize,
    pub target_per_stalled_kib: f64,
}

/// Handshakes held stalled for the memory figure: within the target's
/// default pending limits (from 8 addresses, 32 each).
const STALLED: usize = 256;

/// A sink that accepts every connection and drains it, counting bytes.
async fn drain_sink() -> Result<(u16, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the sink")?;
    let port = l.local_addr()?.port();
    let bytes = Arc::new(AtomicU64::new(0));
    let counted = bytes.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counted.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Ok((port, bytes))
}

/// One connection to the target gateway as a miggate source makes it:
/// TCP connect, TLS handshake, hello + the start of a QEMU stream, verdict.
async fn admit_once(connector: &TlsConnector, port: u16, first: &[u8]) -> Result<Duration> {
    let name = ServerName::try_from(TLS_HOSTNAME)?;
    let t0 = Instant::now();
    let sock = TcpStream::connect(("127.0.0.1", port)).await?;
    sock.set_nodelay(true)?;
    let mut tls = connector
        .connect(name, sock)
        .await
        .context("TLS handshake")?;
    tls.write_all(first).await?;
    tls.flush().await?;
    let verdict = frames::read_verdict(&mut tls).await?;
    let took = t0.elapsed();
    if let Verdict::Refused { reason } = verdict {
        bail!("the target gateway refused: {reason}");
    }
    let _ = tls.shutdown().await;
    Ok(took)
}

pub async fn run(
    installed: &Installed,
    pki: &Path,
    workdir: &Path,
    local: LocalKind,
    client_dn: &str,
    connections: usize,
    channels: usize,
) -> Result<Report> {
    let (sink_port, sunk) = drain_sink().await?;
    let checks = MiggateChecks {
        client_dn,
        expect_uuid: None,
    };
    let entry = local.fresh(workdir, "handshake-entry")?;
    let layer = peers::miggate(
        &installed.miggate,
        pki,
        entry,
        &Local::Tcp(sink_port),
        &checks,
    )
    .await?;
    let (tpid, spid) = (
        layer.target_pid().context("target gateway pid")?,
        layer.source_pid().context("source gateway pid")?,
    );
    tokio::time::sleep(SETTLE).await;
    let rss = |pid| sys::rss_kib(pid).unwrap_or(0);
    let (target_idle_kib, source_idle_kib) = (rss(tpid), rss(spid));

    let config = tls::client_config(pki, &[tls::ALPN_MIGGATE])?;
    let connector = TlsConnector::from(config);
    let mut first = frames::encode_hello(&Hello::default());
    first.extend_from_slice(QEMU_PREFIX);
    let mut ms = Vec::with_capacity(connections);
    for _ in 0..connections {
        let took = admit_once(&connector, layer.target_port, &first)
            .await
            .with_context(|| layer.logs())?;
        ms.push(took.as_secs_f64() * 1e3);
    }

    // Channels held open through both gateways, each with data relayed.
    tokio::time::sleep(SETTLE).await;
    let (t0, s0) = (rss(tpid), rss(spid));
    let before = sunk.load(Ordering::Relaxed);
    let mut held = Vec::with_capacity(channels);
    let warm = vec![0x5Au8; WARM_BYTES];
    for _ in 0..channels {
        let mut s = layer.entry.connect().await?;
        s.write_all(QEMU_PREFIX).await?;
        s.write_all(&warm).await?;
        held.push(s);
    }
    let want = before + (channels * (QEMU_PREFIX.len() + WARM_BYTES)) as u64;
    let deadline = Instant::now() + WARM_TIMEOUT;
    while sunk.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline {
            bail!(
                "held channels not relayed within {WARM_TIMEOUT:?}\n{}",
                layer.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let (t1, s1) = (rss(tpid), rss(spid));
    drop(held);

    // Handshakes stalled after their ClientHello, as a flood leaves them.
    tokio::time::sleep(SETTLE).await;
    let hostiles = super::flood::Hostiles::prepare(
        pki,
        workdir,
        std::net::SocketAddr::from(([127, 0, 0, 1], layer.target_port)),
        8,
    )?;
    let (st0, fds0) = (rss(tpid), sys::fd_count(tpid));
    let mut stalled = Vec::with_capacity(STALLED);
    for i in 0..STALLED {
        stalled.push(hostiles.stalled(i).await?);
    }
    // Every one accepted and read by the target before the reading.
    let deadline = Instant::now() + WARM_TIMEOUT;
    while sys::fd_count(tpid) < fds0 + STALLED {
        if Instant::now() > deadline {
            bail!(
                "the target did not accept {STALLED} stalled handshakes\n{}",
                layer.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let st1 = rss(tpid);
    drop(stalled);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / channels.max(1) as f64;
    Ok(Report {
        connections,
        p50_ms: sys::quantile(&ms, 0.5).unwrap_or(f64::NAN),
        p99_ms: sys::quantile(&ms, 0.99).unwrap_or(f64::NAN),
        max_ms: ms.iter().copied().fold(f64::NAN, f64::max),
        channels,
        target_idle_kib,
        source_idle_kib,
        target_per_channel_kib: per(t0, t1),
        source_per_channel_kib: per(s0, s1),
        stalled: STALLED,
        target_per_stalled_kib: (st1 as f64 - st0 as f64) / STALLED as f64,
    })
}
