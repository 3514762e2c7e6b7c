//! Relay-only mode: no QEMU, a generator streams bytes through a security
//! layer (source side -> target side) into a sink, all on loopback. The
//! generator and the sink are threads of this process with blocking
//! sockets; only the layer's processes are charged CPU time.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::local::{BlockingStream, Local, LocalKind};
use super::{sys, QEMU_PREFIX};

/// Size of the generator's and the sink's buffers.
const IO_BUF: usize = 1 << 20;
/// The generator's pattern: random bytes (nothing compresses), repeated.
const PATTERN: usize = 8 << 20;
/// A relay run must end within this.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub struct RelaySample {
    pub seconds: f64,
    pub bytes: u64,
    pub layer_cpu: f64,
}

/// A sink (TCP on 127.0.0.1, or a unix socket in `dir`) that accepts one
/// connection and reads it to EOF.
pub struct Sink {
    pub addr: Local,
    done: std::sync::mpsc::Receiver<std::io::Result<(u64, Instant)>>,
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept()?.0),
            Listener::Unix(l) => Box::new(l.accept()?.0),
        })
    }
}

impl Sink {
    pub fn start(kind: LocalKind, dir: &std::path::Path) -> Result<Sink> {
        Sink::start_many(kind, dir, 1)
    }

    /// A sink for `k` connections at once, each read to EOF; done when
    /// all are (the total, and when the last one ended).
    pub fn start_many(kind: LocalKind, dir: &std::path::Path, k: usize) -> Result<Sink> {
        let (l, addr) = match kind {
            LocalKind::Tcp => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
                let port = l.local_addr()?.port();
                (Listener::Tcp(l), Local::Tcp(port))
            }
            LocalKind::Unix => {
                let path = dir.join("sink.sock");
                let l = std::os::unix::net::UnixListener::bind(&path)
                    .with_context(|| format!("binding the sink at {}", path.display()))?;
                (Listener::Unix(l), Local::Unix(path))
            }
        };
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let mut readers: Vec<std::thread::JoinHandle<std::io::Result<(u64, Instant)>>> =
                    Vec::new();
                for _ in 0..k {
                    let mut s = l.accept()?;
                    readers.push(std::thread::spawn(move || {
                        let mut buf = vec![0u8; IO_BUF];
                        let mut total = 0u64;
                        loop {
                            match s.read(&mut buf)? {
                                0 => return Ok((total, Instant::now())),
                                n => total += n as u64,
                            }
                        }
                    }));
                }
                let mut all = (0, None::<Instant>);
                for r in readers {
                    let (n, t) = r
                        .join()
                        .map_err(|_| std::io::Error::other("sink thread panicked"))??;
                    all = (all.0 + n, Some(all.1.map_or(t, |a: Instant| a.max(t))));
                }
                Ok((all.0, all.1.unwrap_or_else(Instant::now)))
            })();
            let _ = tx.send(r);
        });
        Ok(Sink { addr, done })
    }

    fn wait(self) -> Result<(u64, Instant)> {
        match self.done.recv_timeout(RUN_TIMEOUT) {
            Ok(r) => r.context("sink"),
            Err(_) => bail!("the sink got no EOF within {RUN_TIMEOUT:?}"),
        }
    }
}

fn pattern() -> Vec<u8> {
    miggate_lab::guest::random_ram(0x5EED_0BE4, PATTERN)
}

/// Streams a QEMU main-channel prefix and then `bytes` random bytes into
/// `entry`, whose far end is `sink`; returns the payload's time.
/// `layer_pids` are charged the CPU time.
pub async fn run_once(
    entry: Local,
    sink: Sink,
    bytes: u64,
    layer_pids: &[u32],
) -> Result<RelaySample> {
    run_channels(entry, sink, 1, bytes, layer_pids).await
}

/// [`run_once`] over `k` channels at once, `bytes` split between them.
pub async fn run_channels(
    entry: Local,
    sink: Sink,
    k: usize,
    bytes: u64,
    layer_pids: &[u32],
) -> Result<RelaySample> {
    let pids = layer_pids.to_vec();
    tokio::task::spawn_blocking(move || {
        let data = std::sync::Arc::new(pattern());
        let cpu0 = sys::cpu_total(&pids);
        let t0 = Instant::now();
        let each = bytes / k as u64;
        let gens: Vec<_> = (0..k)
            .map(|_| {
                let (entry, data) = (entry.clone(), data.clone());
                std::thread::spawn(move || generate(&entry, each, &data))
            })
            .collect();
        let mut conns = Vec::new();
        for g in gens {
            conns.push(
                g.join()
                    .map_err(|_| anyhow::anyhow!("generator panicked"))??,
            );
        }
        let (got, t1) = sink.wait()?;
        // The layer closes its end once the sink has closed its own.
        for mut s in conns {
            let _ = s.set_read_timeout(Some(RUN_TIMEOUT));
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
        let cpu1 = sys::cpu_total(&pids);
        let want = k as u64 * (each + QEMU_PREFIX.len() as u64);
        if got != want {
            bail!("the sink received {got} bytes, not {want}");
        }
        Ok(RelaySample {
            seconds: (t1 - t0).as_secs_f64(),
            bytes: each * k as u64,
            layer_cpu: cpu1 - cpu0,
        })
    })
    .await
    .context("generator thread")?
}

/// One channel of the generator: the prefix, `bytes` of `data`, then EOF.
fn generate(entry: &Local, bytes: u64, data: &[u8]) -> Result<Box<dyn BlockingStream>> {
    let mut s = entry
        .connect_blocking()
        .context("connecting the generator")?;
    s.write_all(QEMU_PREFIX).context("generator")?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(IO_BUF as u64) as usize;
        let off = ((bytes - left) % (PATTERN - IO_BUF) as u64) as usize;
        s.write_all(&data[off..off + n]).context("generator")?;
        left -= n as u64;
    }
    s.shutdown_write().context("generator")?;
    Ok(s)
}

/// The relays compared side by side (`--relay-variants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// Today's relay ([`miggate::relay::relay`] over tokio-rustls), in
    /// an in-process gateway pair.
    Buffered,
    /// [`miggate::relay::inplace`] (rustls' unbuffered API), in the same
    /// in-process gateway pair.
    InPlace,
    /// Today's relay with a 256 KiB read-ahead buffer under TLS (one
    /// socket read for many records instead of one per record): where the
    /// in-place relay's savings come from.
    ReadAhead,
    /// The real gateways (`miggate source` / `miggate target`
    /// processes, today's relay): the reference.
    Processes,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Buffered => "today's relay",
            Variant::InPlace => "sealed in place",
            Variant::ReadAhead => "today's + read-ahead",
            Variant::Processes => "gateway processes",
        }
    }
}

/// Every channel of the in-process pair must move within this.
const STALL: Duration = Duration::from_secs(60);

/// CPU seconds the calling thread ran (the first field of
/// /proc/thread-self/schedstat, in ns).
fn thread_cpu() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    let ns: f64 = s
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .context("parsing /proc/thread-self/schedstat")?;
    Ok(ns / 1e9)
}

/// One gateway side: a thread of its own running a current-thread
/// runtime, so that its CPU time is the thread's. Returns that CPU time.
fn gateway_thread<F, Fut>(name: &str, f: F) -> Result<std::thread::JoinHandle<Result<f64>>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let cpu0 = thread_cpu()?;
            rt.block_on(f())?;
            Ok(thread_cpu()? - cpu0)
        })
        .context("spawning a gateway thread")
}

/// The source side's listener for the generator.
enum Entry {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

const NAMES: (&str, &str) = ("source->target", "target->source");

async fn source_side(
    v: Variant,
    entry: Entry,
    target: std::net::SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<()> {
    let plain_tcp;
    let plain_unix;
    match entry {
        Entry::Tcp(l) => {
            l.set_nonblocking(true)?;
            plain_tcp = Some(tokio::net::TcpListener::from_std(l)?.accept().await?.0);
            plain_unix = None;
        }
        Entry::Unix(l) => {
            l.set_nonblocking(true)?;
            plain_unix = Some(tokio::net::UnixListener::from_std(l)?.accept().await?.0);
            plain_tcp = None;
        }
    }
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    match (plain_tcp, plain_unix) {
        (Some(p), _) => source_relay(v, p, tcp, cfg).await,
        (_, Some(p)) => source_relay(v, p, tcp, cfg).await,
        _ => unreachable!(),
    }
}

async fn source_relay<P>(
    v: Variant,
    plain: P,
    tcp: tokio::net::TcpStream,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<()>
where
    P: miggate::relay::inplace::Plain + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use miggate::relay::{inplace, Close};
    let name = rustls_pki_types::ServerName::try_from(super::peers::TLS_HOSTNAME)?.to_owned();
    let close = Close::tls_peer(true, "target");
    match v {
        Variant::InPlace => {
            let tls = inplace::connect(cfg, name, tcp).await?;
            let p = inplace::PlainIs::A;
            inplace::relay(plain, p, tls, NAMES, close, None, STALL, Default::default()).await?
        }
        Variant::ReadAhead => {
            let io = tokio::io::BufReader::with_capacity(READ_AHEAD, tcp);
            buffered_source(plain, io, name, close, cfg).await?
        }
        _ => buffered_source(plain, tcp, name, close, cfg).await?,
    }
    Ok(())
}

/// A read-ahead buffer as large as the relay's.
const READ_AHEAD: usize = 256 << 10;

async fn buffered_source<P, IO>(
    plain: P,
    io: IO,
    name: rustls_pki_types::ServerName<'static>,
    close: miggate::relay::Close,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<()>
where
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, io)
        .await?;
    let closes = (miggate::relay::Close::AnyEof, close);
    miggate::relay::relay(plain, tls, NAMES, closes, STALL, Default::default()).await?;
    Ok(())
}

async fn target_side(
    v: Variant,
    listener: std::net::TcpListener,
    sink: Local,
    cfg: std::sync::Arc<rustls::ServerConfig>,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let (tcp, _) = tokio::net::TcpListener::from_std(listener)?
        .accept()
        .await?;
    tcp.set_nodelay(true)?;
    match &sink {
        Local::Tcp(port) => {
            let plain = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await?;
            target_relay(v, tcp, plain, cfg).await
        }
        Local::Unix(path) => {
            let plain = tokio::net::UnixStream::connect(path).await?;
            target_relay(v, tcp, plain, cfg).await
        }
    }
}

async fn target_relay<P>(
    v: Variant,
    tcp: tokio::net::TcpStream,
    plain: P,
    cfg: std::sync::Arc<rustls::ServerConfig>,
) -> Result<()>
where
    P: miggate::relay::inplace::Plain + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use miggate::relay::{inplace, Close};
    let close = Close::tls_peer(true, "source");
    match v {
        Variant::InPlace => {
            let tls = inplace::accept(cfg, tcp).await?;
            let p = inplace::PlainIs::B;
            inplace::relay(plain, p, tls, NAMES, close, None, STALL, Default::default()).await?
        }
        Variant::ReadAhead => {
            let io = tokio::io::BufReader::with_capacity(READ_AHEAD, tcp);
            buffered_target(io, plain, close, cfg).await?
        }
        _ => buffered_target(tcp, plain, close, cfg).await?,
    }
    Ok(())
}

async fn buffered_target<IO, P>(
    io: IO,
    plain: P,
    close: miggate::relay::Close,
    cfg: std::sync::Arc<rustls::ServerConfig>,
) -> Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use miggate::relay::{rekey::Rekeying, Close};
    let tls = tokio_rustls::TlsAcceptor::from(cfg).accept(io).await?;
    // As the target gateway wraps it (no interval: a passthrough).
    let tls = Rekeying::optional(tls, None, Duration::ZERO, Default::default());
    let closes = (close, Close::AnyEof);
    miggate::relay::relay(tls, plain, NAMES, closes, STALL, Default::default()).await?;
    Ok(())
}

/// One round of an in-process gateway pair (`Buffered` or `InPlace`):
/// generator -> source side -> TLS 1.3 on loopback -> target side -> sink;
/// the CPU time is the two gateway threads'.
pub async fn variant_once(
    v: Variant,
    local: LocalKind,
    dir: &std::path::Path,
    pki: &std::path::Path,
    bytes: u64,
) -> Result<RelaySample> {
    let server_cfg = miggate::creds::tls::server_config(pki, &[])?;
    let client_cfg = miggate::creds::tls::client_config(pki, &[])?;
    let sink = Sink::start(local, dir)?;
    let hop = std::net::TcpListener::bind("127.0.0.1:0").context("binding the TLS hop")?;
    let hop_addr = hop.local_addr()?;
    let (entry_l, entry) = match local {
        LocalKind::Tcp => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding the entry")?;
            let port = l.local_addr()?.port();
            (Entry::Tcp(l), Local::Tcp(port))
        }
        LocalKind::Unix => {
            let path = dir.join("entry.sock");
            let l = std::os::unix::net::UnixListener::bind(&path).context("binding the entry")?;
            (Entry::Unix(l), Local::Unix(path))
        }
    };
    let sink_addr = sink.addr.clone();
    let target = gateway_thread("bench-target", move || {
        target_side(v, hop, sink_addr, server_cfg)
    })?;
    let source = gateway_thread("bench-source", move || {
        source_side(v, entry_l, hop_addr, client_cfg)
    })?;
    let streamed = run_once(entry, sink, bytes, &[]).await;
    let join = |h: std::thread::JoinHandle<Result<f64>>, side: &str| -> Result<f64> {
        h.join()
            .map_err(|_| anyhow::anyhow!("the {side} gateway thread panicked"))?
            .with_context(|| format!("{} {side} gateway", v.name()))
    };
    let (t, s) = (join(target, "target"), join(source, "source"));
    let mut sample = streamed?;
    sample.layer_cpu = t? + s?;
    Ok(sample)
}

/// Median, min and max of `f` over `samples`.
fn stats(samples: &[RelaySample], f: impl Fn(&RelaySample) -> f64) -> Option<(f64, f64, f64)> {
    let v: Vec<f64> = samples.iter().map(f).collect();
    let med = sys::median(&v)?;
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((med, min, max))
}

fn gbps(s: &RelaySample) -> f64 {
    s.bytes as f64 / s.seconds / 1e9
}

fn cpu_per_gib(s: &RelaySample) -> f64 {
    s.layer_cpu / (s.bytes.max(1) as f64 / super::GIB)
}

/// Runs `round` for every item of `items`, interleaved (each round
/// starting one item later), after one warm-up round unless `--no-warmup`;
/// the samples per item, or why an item failed.
async fn interleaved<T, F, Fut>(
    args: &super::BenchArgs,
    items: &[T],
    label: impl Fn(T) -> String,
    mut round: F,
) -> Vec<(T, Result<Vec<RelaySample>, String>)>
where
    T: Copy + PartialEq,
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = Result<RelaySample>>,
{
    let warmup = usize::from(!args.no_warmup);
    let mut out: Vec<(T, Result<Vec<RelaySample>, String>)> =
        items.iter().map(|&t| (t, Ok(Vec::new()))).collect();
    for r in 0..args.rounds as usize + warmup {
        for t in super::round_order(items, r) {
            let slot = &mut out.iter_mut().find(|(x, _)| *x == t).expect("item").1;
            let Ok(samples) = slot else { continue };
            match round(t).await {
                Ok(s) => {
                    eprintln!(
                        "{} {}: {:.3} s, {:.2} CPU-s",
                        if r < warmup { "warm-up" } else { "round" },
                        label(t),
                        s.seconds,
                        s.layer_cpu
                    );
                    if r >= warmup {
                        samples.push(s);
                    }
                }
                Err(e) => {
                    eprintln!("{}: FAILED: {e:#}", label(t));
                    *slot = Err(format!("failed: {}", super::first_line(&format!("{e:#}"))));
                }
            }
        }
    }
    out
}

/// `--relay-variants`: today's relay and the in-place experiment side by
/// side in one run (and the real gateway processes for reference).
pub async fn variants_table(
    args: &super::BenchArgs,
    inst: &super::peers::Installed,
    pki: &std::path::Path,
    workdir: &std::path::Path,
) -> String {
    let bytes = args.relay_mib << 20;
    let all = [
        Variant::Buffered,
        Variant::InPlace,
        Variant::ReadAhead,
        Variant::Processes,
    ];
    let results = interleaved(
        args,
        &all,
        |v| format!("relay variants: {}", v.name()),
        |v| async move {
            let dir = tempfile::Builder::new()
                .prefix("variant-")
                .tempdir_in(workdir)?;
            match v {
                Variant::Processes => {
                    super::relay_round(super::RelayPath::Miggate, args, inst, pki, workdir).await
                }
                v => variant_once(v, args.local, dir.path(), pki, bytes).await,
            }
        },
    )
    .await;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Relay variants, side by side (no QEMU): generator -> source side -> TLS 1.3 on \
         loopback -> target side -> sink, {} MiB per round, {} round(s) interleaved; local \
         hops: {}. In-process pair: one thread and current-thread runtime per gateway side, \
         CPU of both threads",
        args.relay_mib,
        args.rounds,
        args.local.describe()
    );
    let _ = writeln!(
        out,
        "{:<20} {:>22} {:>22} {:>26}",
        "relay", "s median (min-max)", "GB/s median (min-max)", "CPU-s/GiB median (min-max)"
    );
    for (v, r) in &results {
        let samples = match r {
            Ok(s) if !s.is_empty() => s,
            Ok(_) => {
                let _ = writeln!(out, "{:<20} no measured round", v.name());
                continue;
            }
            Err(why) => {
                let _ = writeln!(out, "{:<20} {why}", v.name());
                continue;
            }
        };
        let fmt = |(m, lo, hi): (f64, f64, f64), p: usize| format!("{m:.p$} ({lo:.p$}-{hi:.p$})");
        let secs = stats(samples, |s| s.seconds).expect("samples");
        let g = stats(samples, gbps).expect("samples");
        let c = stats(samples, cpu_per_gib).expect("samples");
        let _ = writeln!(
            out,
            "{:<20} {:>22} {:>22} {:>26}",
            v.name(),
            fmt(secs, 3),
            fmt(g, 2),
            fmt(c, 3)
        );
    }
    // Each round's figure against today's relay's in the same round: the
    // rounds next to each other saw the same load on a shared machine.
    let ok = |v: Variant| {
        results
            .iter()
            .find(|(x, _)| *x == v)
            .and_then(|(_, r)| r.as_ref().ok())
            .filter(|s| !s.is_empty())
    };
    if let Some(base) = ok(Variant::Buffered) {
        for v in [Variant::InPlace, Variant::ReadAhead] {
            let Some(other) = ok(v).filter(|o| o.len() == base.len()) else {
                continue;
            };
            let paired = |f: fn(&RelaySample) -> f64| {
                let ratios: Vec<RelaySample> = base
                    .iter()
                    .zip(other)
                    .map(|(b, o)| RelaySample {
                        seconds: f(o) / f(b),
                        bytes: 0,
                        layer_cpu: 0.0,
                    })
                    .collect();
                let (m, lo, hi) = stats(&ratios, |r| r.seconds).expect("rounds");
                let pct = |x: f64| (x - 1.0) * 100.0;
                format!("{:+.1} % ({:+.1} to {:+.1})", pct(m), pct(lo), pct(hi))
            };
            let _ = writeln!(
                out,
                "{} vs today's relay, round by round (median, min to max): CPU per GiB {}, \
                 throughput {}{}",
                v.name(),
                paired(cpu_per_gib),
                paired(gbps),
                if v == Variant::InPlace {
                    "; kept only if it saves >= 10 % of CPU per GiB"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// `--relay-channels`: K channels at once through one pair of real gateway
/// processes, the same bytes in total whatever K.
pub async fn channels_table(
    args: &super::BenchArgs,
    inst: &super::peers::Installed,
    pki: &std::path::Path,
    workdir: &std::path::Path,
) -> String {
    let bytes = args.relay_mib << 20;
    let ks: Vec<u32> = args.relay_channels.clone();
    let results = interleaved(
        args,
        &ks,
        |k| format!("relay channels: K={k}"),
        |k| async move {
            let dir = tempfile::Builder::new()
                .prefix("channels-")
                .tempdir_in(workdir)?;
            let sink = Sink::start_many(args.local, dir.path(), k as usize)?;
            let entry = args.local.fresh(dir.path(), "entry")?;
            let checks = super::peers::MiggateChecks {
                client_dn: super::CLIENT_DN,
                expect_uuid: None,
            };
            let layer =
                super::peers::miggate(&inst.miggate, pki, entry, &sink.addr, &checks).await?;
            let r = run_channels(layer.entry.clone(), sink, k as usize, bytes, &layer.pids()).await;
            r.with_context(|| layer.logs())
        },
    )
    .await;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Parallel channels through one gateway pair (miggate source + target processes, no \
         QEMU): {} MiB in total per round split over K channels, {} round(s) interleaved, \
         {cpus} CPUs; local hops: {}",
        args.relay_mib,
        args.rounds,
        args.local.describe()
    );
    let _ = writeln!(
        out,
        "{:>3} {:>22} {:>24} {:>8} {:>26} {:>8}",
        "K",
        "s median (min-max)",
        "GB/s aggr. (min-max)",
        "x K=1",
        "CPU-s/GiB median (min-max)",
        "x K=1"
    );
    let mut base: Option<(f64, f64)> = None;
    for (k, r) in &results {
        let samples = match r {
            Ok(s) if !s.is_empty() => s,
            Ok(_) => {
                let _ = writeln!(out, "{k:>3} no measured round");
                continue;
            }
            Err(why) => {
                let _ = writeln!(out, "{k:>3} {why}");
                continue;
            }
        };
        let fmt = |(m, lo, hi): (f64, f64, f64), p: usize| format!("{m:.p$} ({lo:.p$}-{hi:.p$})");
        let secs = stats(samples, |s| s.seconds).expect("samples");
        let g = stats(samples, gbps).expect("samples");
        let c = stats(samples, cpu_per_gib).expect("samples");
        let (g1, c1) = *base.get_or_insert((g.0, c.0));
        let _ = writeln!(
            out,
            "{k:>3} {:>22} {:>24} {:>8.2} {:>26} {:>8.2}",
            fmt(secs, 3),
            fmt(g, 2),
            g.0 / g1,
            fmt(c, 3),
            c.0 / c1
        );
    }
    out
}
