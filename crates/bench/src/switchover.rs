//! What a layer's two extra hops cost at the switch-over, without QEMU's
//! noise: the exchange QEMU makes while the guest is stopped, replayed
//! many times on one channel. A burst the size of the last pass and the
//! device state (what QEMU 7.2 sent while the bench's running guest was
//! stopped: `downtime-bytes` 595,085) goes from the source side to a sink
//! at the target side, which answers with a few bytes (the return path's
//! SHUT that ends QEMU's downtime); the source side times burst + answer.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::local::{Local, LocalKind};
use super::peers::{self, Installed, MiggateChecks};
use super::{sys, QEMU_PREFIX};

/// Bytes of the burst: the bench's running guest's `downtime-bytes`.
pub const BURST: usize = 595_085;
/// Bytes of the answer (a return-path message: type, length, value).
const ANSWER: usize = 8;
/// Exchanges before the timed ones (first records, buffers, caches).
const WARM: usize = 5;
/// Limit for one exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// Source straight to the sink over TCP, as plain QEMU to QEMU.
    Direct,
    Miggate,
    Stunnel,
    Socat,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (TCP)",
            Path::Miggate => "miggate",
            Path::Stunnel => "stunnel",
            Path::Socat => "socat",
        }
    }
}

/// Accepts one connection at `at`, reads the QEMU prefix, then answers
/// every burst.
async fn sink(at: &Local) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let accept = match at {
        Local::Tcp(p) => {
            let l = tokio::net::TcpListener::bind(("127.0.0.1", *p))
                .await
                .context("binding the switch-over sink")?;
            tokio::spawn(async move {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok::<_, std::io::Error>(miggate::net::Plain::Tcp(s))
            })
        }
        Local::Unix(path) => {
            let l = tokio::net::UnixListener::bind(path).context("binding the switch-over sink")?;
            tokio::spawn(async move {
                let (s, _) = l.accept().await?;
                Ok::<_, std::io::Error>(miggate::net::Plain::Unix(s))
            })
        }
    };
    Ok(tokio::spawn(async move {
        let mut s = accept.await??;
        let mut prefix = vec![0u8; QEMU_PREFIX.len()];
        s.read_exact(&mut prefix).await?;
        let mut buf = vec![0u8; BURST];
        loop {
            match s.read_exact(&mut buf).await {
                Ok(_) => s.write_all(&[0x5A; ANSWER]).await?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }))
}

/// `exchanges` timed bursts + answers on one channel through `path`, in
/// milliseconds each.
pub async fn round(
    path: Path,
    exchanges: usize,
    inst: &Installed,
    pki: &std::path::Path,
    workdir: &std::path::Path,
    local: LocalKind,
    client_dn: &str,
) -> Result<Vec<f64>> {
    let dir = tempfile::Builder::new()
        .prefix("switch-")
        .tempdir_in(workdir)?;
    let sink_at = if path == Path::Direct {
        LocalKind::Tcp.fresh(dir.path(), "sink")?
    } else {
        local.fresh(dir.path(), "sink")?
    };
    let sink = sink(&sink_at).await?;
    let entry = local.fresh(dir.path(), "entry")?;
    let layer = match path {
        Path::Direct => None,
        Path::Miggate => {
            let checks = MiggateChecks {
                client_dn,
                expect_uuid: None,
            };
            Some(peers::miggate(&inst.miggate, pki, entry, &sink_at, &checks).await?)
        }
        Path::Stunnel => {
            let bin = inst.stunnel.as_deref().context("stunnel not installed")?;
            Some(peers::stunnel(bin, pki, dir.path(), entry, &sink_at).await?)
        }
        Path::Socat => {
            let bin = inst.socat.as_deref().context("socat not installed")?;
            Some(peers::socat(bin, pki, dir.path(), entry, &sink_at).await?)
        }
    };
    let entry = layer.as_ref().map_or(sink_at, |l| l.entry.clone());
    let exchange = async {
        let mut s = entry.connect().await.context("connecting to the entry")?;
        s.write_all(QEMU_PREFIX).await?;
        let burst: Vec<u8> = (0..BURST).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut answer = [0u8; ANSWER];
        let mut ms = Vec::with_capacity(exchanges);
        for i in 0..WARM + exchanges {
            let t0 = Instant::now();
            tokio::time::timeout(EXCHANGE_TIMEOUT, async {
                s.write_all(&burst).await?;
                s.read_exact(&mut answer).await
            })
            .await
            .context("no answer to a burst")??;
            if i >= WARM {
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        s.shutdown().await?;
        Ok::<_, anyhow::Error>(ms)
    };
    let ms = exchange
        .await
        .with_context(|| layer.as_ref().map(|l| l.logs()).unwrap_or_default())?;
    match tokio::time::timeout(EXCHANGE_TIMEOUT, sink).await {
        Ok(Ok(Ok(()))) => Ok(ms),
        Ok(Ok(Err(e))) => Err(e.context("the switch-over sink")),
        Ok(Err(e)) => bail!("the switch-over sink: {e}"),
        Err(_) => bail!("the switch-over sink did not see the end of the stream"),
    }
}

/// p50 and p99 of exchange times, ms.
pub fn summary(ms: &[f64]) -> (f64, f64) {
    (
        sys::quantile(ms, 0.5).unwrap_or(f64::NAN),
        sys::quantile(ms, 0.99).unwrap_or(f64::NAN),
    )
}

/// Every path, interleaved over `rounds` (each round one path later, a
/// fresh layer each time), `exchanges` per path and round; the table.
#[allow(clippy::too_many_arguments)]
pub async fn table(
    rounds: usize,
    exchanges: usize,
    inst: &Installed,
    pki: &std::path::Path,
    workdir: &std::path::Path,
    local: LocalKind,
    client_dn: &str,
) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    let all = [Path::Direct, Path::Miggate, Path::Stunnel, Path::Socat];
    let skip = |p: Path| match p {
        Path::Stunnel if inst.stunnel.is_none() => Some("skipped: not installed (stunnel4)"),
        Path::Socat if inst.socat.is_none() => Some("skipped: not installed (socat)"),
        _ => None,
    };
    let runnable: Vec<Path> = all.into_iter().filter(|p| skip(*p).is_none()).collect();
    let mut ms: BTreeMap<Path, Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<Path, String> = BTreeMap::new();
    for r in 0..rounds {
        for p in super::round_order(&runnable, r) {
            if errors.contains_key(&p) {
                continue;
            }
            match round(p, exchanges, inst, pki, workdir, local, client_dn).await {
                Ok(v) => {
                    let (p50, p99) = summary(&v);
                    eprintln!(
                        "switch-over round {}: {}: p50 {p50:.2} ms, p99 {p99:.2} ms",
                        r + 1,
                        p.name()
                    );
                    ms.entry(p).or_default().extend(v);
                }
                Err(e) => {
                    eprintln!("switch-over: {}: FAILED: {e:#}", p.name());
                    errors.insert(
                        p,
                        format!("failed: {}", super::first_line(&format!("{e:#}"))),
                    );
                }
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Switch-over exchange (no QEMU): {BURST} bytes from the source side, {ANSWER} bytes \
         back from the target side, {exchanges} per path in each of {rounds} interleaved \
         round(s), a fresh layer per round; local hops: {}",
        local.describe()
    );
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:>8} {:>8} {:>14}",
        "path", "p50 ms", "p99 ms", "min ms", "p50 - direct"
    );
    let direct = ms.get(&Path::Direct).map(|v| summary(v).0);
    for p in all {
        if let Some(why) = skip(p)
            .map(str::to_owned)
            .or_else(|| errors.get(&p).cloned())
        {
            let _ = writeln!(out, "{:<18} {why}", p.name());
            continue;
        }
        let Some(v) = ms.get(&p) else { continue };
        let (p50, p99) = summary(v);
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "{:<18} {p50:>8.2} {p99:>8.2} {min:>8.2} {:>14}",
            p.name(),
            direct.map_or("-".into(), |d| format!("{:+.2}", p50 - d))
        );
    }
    out
}
