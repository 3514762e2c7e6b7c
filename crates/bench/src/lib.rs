//! `miggate bench`: in one run, with interleaved rounds, migrates the same
//! guest through every transport (plain TCP, QEMU's native TLS with one or
//! N channels, stunnel, socat, miggate with one or N channels) and prints
//! the median time, throughput, ratio to plain and the CPU the security
//! layer spent per GiB; then streams bytes through the layers without QEMU
//! (relay-only), and measures the target gateway's handshake + admission
//! latency and the gateways' memory.
//!
//! Every peer is a real process (QEMU, stunnel, socat, this very binary as
//! source and target gateway), started fresh for each round so that no
//! round inherits another's state; CPU time is read from /proc before and
//! after each migration. A peer that is not installed is reported as
//! skipped, never silently left out.

pub mod flood;
mod evacuate;
mod handshake;
mod local;
mod migration;
mod peers;
mod pin;
mod relay_only;
mod spread;
mod storage;
mod switchover;
mod sys;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;

use miggate_lab::{self as lab, Accel, QemuVersion};

/// The start of a real QEMU 7.2 main channel (no UUID): what the relay-only
/// generator and the handshake client send so that the target gateway's
/// stream check passes.
pub(crate) const QEMU_PREFIX: &[u8] = lab::fixtures::QEMU72_MAIN_PLAIN;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// DN of the benchmark PKI's client certificate (checked by the target side).
const CLIENT_DN: &str = "O=miggate bench,CN=source.bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Transport {
    Plain,
    /// Plain with multifd: what QEMU's multifd costs without any security
    /// layer, the reference for the *-multifd rows.
    PlainMultifd,
    QemuTls,
    QemuTlsMultifd,
    Stunnel,
    Socat,
    Miggate,
    MiggateMultifd,
    /// miggate while hostile connections flood the target gateway
    /// (`--flood`): the same migration as `miggate`, side by side.
    MiggateFlood,
}

impl Transport {
    fn native_tls(self) -> bool {
        matches!(self, Transport::QemuTls | Transport::QemuTlsMultifd)
    }
    /// Whether a security layer (processes of its own) sits between the QEMUs.
    fn layered(self) -> bool {
        !matches!(
            self,
            Transport::Plain
                | Transport::PlainMultifd
                | Transport::QemuTls
                | Transport::QemuTlsMultifd
        )
    }
    fn multifd(self) -> bool {
        matches!(
            self,
            Transport::PlainMultifd | Transport::QemuTlsMultifd | Transport::MiggateMultifd
        )
    }
    fn name(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::PlainMultifd => "plain-multifd",
            Transport::QemuTls => "qemu-tls",
            Transport::QemuTlsMultifd => "qemu-tls-multifd",
            Transport::Stunnel => "stunnel",
            Transport::Socat => "socat",
            Transport::Miggate => "miggate",
            Transport::MiggateMultifd => "miggate-multifd",
            Transport::MiggateFlood => "miggate-flood",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Paused guest, RAM of random bytes: pure transport throughput.
    Paused,
    /// Running guest that keeps dirtying memory.
    Running,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Kvm,
    Tcg,
}

/// `--qemu` of `miggate bench` and `miggate demo`: which QEMU runs both
/// sides (the lab's [`QemuVersion`], which knows each one's binary and `-L`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum QemuArg {
    /// The system's qemu-system-x86_64 (7.2 on Debian 12).
    #[default]
    System,
    /// QEMU 10.0 as scripts/setup.sh unpacks it ($MIGGATE_QEMU10_DIR,
    /// default /opt/miggate/qemu-10.0).
    #[value(name = "10.0")]
    V10_0,
}

impl From<QemuArg> for QemuVersion {
    fn from(q: QemuArg) -> QemuVersion {
        match q {
            QemuArg::System => QemuVersion::System,
            QemuArg::V10_0 => QemuVersion::V10_0,
        }
    }
}

/// Why the chosen QEMU is not there, in a table cell.
fn qemu_absent(q: QemuVersion) -> String {
    match q {
        QemuVersion::System => format!("not installed (qemu-system-x86_64; {})", lab::INSTALL_QEMU),
        QemuVersion::V10_0 => {
            "not installed (QEMU 10.0: scripts/setup.sh unpacks it, or set $MIGGATE_QEMU10_DIR)"
                .into()
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Guest RAM in MiB, filled with random bytes (nothing compresses or is
    /// skipped as a zero page).
    #[arg(long, default_value_t = 1024)]
    pub ram_mib: u32,
    /// Measured rounds; each round migrates through every transport once,
    /// after one warm-up round that is not counted.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Channels of the *-multifd transports.
    #[arg(long, default_value_t = 2)]
    pub channels: u32,
    /// Transports to migrate through, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub transports: Vec<Transport>,
    /// Also migrate a running guest that keeps dirtying its memory, and
    /// show QEMU's downtime, total time and passes.
    #[arg(long)]
    pub running: bool,
    /// Only the running guest's migrations (downtime table) and the
    /// switch-over exchange: no paused guest, relay-only, handshakes or memory.
    #[arg(long)]
    pub downtime: bool,
    /// Switch-over exchanges (a burst of the running guest's last pass and
    /// device state, a short answer back) per path and round, timed without
    /// QEMU through each layer; with `--running` or `--downtime`; 0 skips.
    #[arg(long, default_value_t = 40)]
    pub switchover: usize,
    /// Source side (source QEMU, source gateway or stunnel/socat client) on
    /// SOURCE CPUs, target side on TARGET CPUs, like two hosts; the tables
    /// show CPU-s per GiB per side. Without a value: the CPUs this process
    /// may use, split in two halves (0/1 on two CPUs).
    #[arg(long, value_name = "SOURCE/TARGET", num_args = 0..=1, default_missing_value = pin::HALVES)]
    pub pin: Option<String>,
    /// No QEMU migrations (relay-only, handshakes and memory only).
    #[arg(long)]
    pub no_migration: bool,
    /// MiB streamed per round in relay-only mode; 0 skips it.
    #[arg(long, default_value_t = 2048)]
    pub relay_mib: u64,
    /// Connections for the handshake + admission latency; 0 skips it and
    /// the memory figures.
    #[arg(long, default_value_t = 200)]
    pub handshakes: usize,
    /// Hostile connections sent at the target gateway during each
    /// `miggate-flood` migration: half at once when it starts, the rest 16
    /// at a time (a round ends with its migration, whatever is left).
    #[arg(long, default_value_t = 1000)]
    pub flood: usize,
    /// Channels held open through the gateways to measure memory per channel.
    #[arg(long, default_value_t = 32)]
    pub rss_channels: usize,
    /// No warm-up round.
    #[arg(long)]
    pub no_warmup: bool,
    /// QEMU accelerator (default: $MIGGATE_ACCEL, else KVM when usable).
    #[arg(long, value_enum)]
    pub accel: Option<AccelArg>,
    /// The QEMU of both sides: the system's, or 10.0 from scripts/setup.sh.
    /// The header line names the version measured.
    #[arg(long, value_enum, default_value = "system")]
    pub qemu: QemuArg,
    /// Cache of guest RAM files (default: $XDG_CACHE_HOME/miggate or ~/.cache/miggate).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// How QEMU (or the relay-only generator and sink) reaches the source
    /// and target sides of stunnel, socat and miggate: unix sockets (the
    /// README's deployment, also closed to other local users) or TCP on
    /// 127.0.0.1. The hop between the two sides is TCP either way.
    #[arg(long, value_enum, default_value = "unix")]
    pub local: local::LocalKind,
    /// Host evacuation instead of the other measurements: N guests of
    /// `--evacuate-ram-mib` migrated at once through standalone gateway
    /// pairs and through one daemon with N tickets (each after one alone).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub evacuate: Option<u16>,
    /// Instead of the other measurements: today's relay and the in-place
    /// experiment (rustls' unbuffered API) side by side, `--relay-mib` per
    /// round, with `--relay-channels` if given.
    #[arg(long)]
    pub relay_variants: bool,
    /// Instead of the other measurements: K parallel channels through one
    /// gateway pair for each K listed (e.g. 1,2,4,8), `--relay-mib` in
    /// total per round.
    #[arg(long, value_name = "K,...", value_delimiter = ',')]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=64))]
    pub relay_channels: Vec<u32>,
    /// Storage migration instead of the other measurements: a paused
    /// guest (128 MiB RAM) migrates with a raw disk of `--disk-mib` random
    /// bytes in libvirt's order (plain, QEMU's native TLS for both, miggate).
    #[arg(long)]
    pub copy_storage: bool,
    /// Disk of `--copy-storage`, MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub disk_mib: u32,
    /// Guest RAM of `--evacuate`, MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=1024))]
    pub evacuate_ram_mib: u32,
    /// CI smoke run: 64 MiB guest, 1 round, no warm-up, 64 MiB relay-only,
    /// 20 handshakes, 4 held channels, a flood of 200. Overrides those options.
    #[arg(long)]
    pub quick: bool,
}

impl BenchArgs {
    fn apply_quick(&mut self) {
        if self.quick {
            self.ram_mib = 64;
            self.rounds = 1;
            self.no_warmup = true;
            self.relay_mib = 64;
            self.handshakes = 20;
            self.rss_channels = 4;
            self.flood = 200;
        }
    }
}

/// Every transport, in table order.
const ALL: [Transport; 9] = [
    Transport::Plain,
    Transport::PlainMultifd,
    Transport::QemuTls,
    Transport::QemuTlsMultifd,
    Transport::Stunnel,
    Transport::Socat,
    Transport::Miggate,
    Transport::MiggateMultifd,
    Transport::MiggateFlood,
];

/// Why a transport has no figures; `qemu_absent`: why the QEMU is missing.
fn missing(t: Transport, inst: &peers::Installed, qemu_absent: Option<&str>) -> Option<String> {
    if let Some(why) = qemu_absent {
        return Some(format!("skipped: {why}"));
    }
    match t {
        Transport::Stunnel if inst.stunnel.is_none() => {
            Some("skipped: not installed (stunnel4)".into())
        }
        Transport::Socat if inst.socat.is_none() => Some("skipped: not installed (socat)".into()),
        _ => None,
    }
}

/// Runs the whole benchmark and prints its tables on stdout (progress on
/// stderr).
pub async fn run(mut args: BenchArgs) -> Result<()> {
    args.apply_quick();
    let pin = match &args.pin {
        Some(p) => Some(pin::PinSpec::parse(p, &pin::available()?).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if args.downtime {
        args.running = true;
        args.relay_mib = 0;
        args.handshakes = 0;
    }
    let inst = peers::Installed::probe()?;
    let work = tempfile::Builder::new()
        .prefix("miggate-bench-")
        .tempdir()
        .context("creating a work directory")?;
    let pki = work.path().join("pki");
    miggate::creds::pki::init(
        &pki,
        &miggate::creds::pki::InitOptions {
            client_dn: CLIENT_DN.into(),
            ..Default::default()
        },
    )?;
    let accel = match args.accel {
        Some(AccelArg::Kvm) => Some(Accel::Kvm),
        Some(AccelArg::Tcg) => Some(Accel::Tcg),
        None => None,
    };
    let qemu = QemuVersion::from(args.qemu);
    let qemu_cmd = qemu.command().ok();
    let absent = qemu_cmd.is_none().then(|| qemu_absent(qemu));
    println!("{}", machine(qemu, qemu_cmd.as_ref(), accel));
    if let Some(p) = &pin {
        println!("Pinned (--pin): {p}; this bench process (QMP polling) is not pinned.\n");
    }

    if let Some(n) = args.evacuate {
        if pin.is_some() || args.downtime {
            anyhow::bail!("--evacuate measures its own way: without --pin or --downtime");
        }
        if let Some(why) = absent {
            anyhow::bail!("--evacuate: {why}");
        }
        let setup = evacuate::Setup {
            installed: &inst,
            pki: &pki,
            client_dn: CLIENT_DN,
            workdir: work.path(),
            ram_mib: args.evacuate_ram_mib,
            accel,
            qemu,
            ram_cache: args.cache_dir.as_deref(),
        };
        println!("{}", evacuate::run(usize::from(n), &setup).await);
        return Ok(());
    }

    if args.relay_variants || !args.relay_channels.is_empty() {
        if args.relay_variants {
            println!(
                "{}",
                relay_only::variants_table(&args, &inst, &pki, work.path()).await
            );
        }
        if !args.relay_channels.is_empty() {
            println!(
                "{}",
                relay_only::channels_table(&args, &inst, &pki, work.path()).await
            );
        }
        return Ok(());
    }

    if args.copy_storage {
        if let Some(why) = absent {
            anyhow::bail!("--copy-storage: {why}");
        }
        let transports = storage::chosen(&args)?;
        let image = storage::source_image(work.path(), args.disk_mib, args.cache_dir.as_deref())?;
        let setup = storage::Setup {
            installed: &inst,
            pki: &pki,
            workdir: work.path(),
            accel,
            qemu,
            ram_cache: args.cache_dir.as_deref(),
            image_sha256: lab::file_sha256(&image).await?,
            image,
            disk_bytes: u64::from(args.disk_mib) << 20,
        };
        let (table, ok) = storage::run(&args, &transports, &setup).await;
        println!("{table}");
        anyhow::ensure!(ok, "--copy-storage: a transport failed (see its row)");
        return Ok(());
    }

    if !args.no_migration {
        let transports: Vec<Transport> = if args.transports.is_empty() {
            // The flood is a paused-guest comparison; --downtime leaves it out.
            ALL.into_iter()
                .filter(|&t| !(args.downtime && t == Transport::MiggateFlood))
                .collect()
        } else {
            ALL.into_iter()
                .filter(|t| args.transports.contains(t))
                .collect()
        };
        let mut workloads = vec![];
        if !args.downtime {
            workloads.push(Workload::Paused);
        }
        if args.running {
            workloads.push(Workload::Running);
        }
        for w in workloads {
            let table = migrations(
                &args,
                w,
                &transports,
                &inst,
                absent.as_deref(),
                &pki,
                work.path(),
                accel,
                pin.as_ref(),
            )
            .await;
            println!("{table}");
        }
    }
    if args.running && args.switchover > 0 {
        let t = switchover::table(
            args.rounds as usize,
            args.switchover,
            &inst,
            &pki,
            work.path(),
            args.local,
            CLIENT_DN,
        )
        .await;
        println!("{t}");
    }
    if args.relay_mib > 0 {
        println!("{}", relay_table(&args, &inst, &pki, work.path()).await);
    }
    if args.handshakes > 0 {
        let r = handshake::run(
            &inst,
            &pki,
            work.path(),
            args.local,
            CLIENT_DN,
            args.handshakes,
            args.rss_channels,
        )
        .await?;
        println!("{}", handshake_text(&r));
    }
    Ok(())
}

/// The header line: the machine, and the QEMU measured (its own
/// `--version` and path, so a table always says which one it was).
fn machine(
    qemu: QemuVersion,
    command: Option<&(PathBuf, Vec<String>)>,
    accel: Option<Accel>,
) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu_version = command
        .and_then(|(bin, pre)| {
            let o = std::process::Command::new(bin)
                .args(pre)
                .arg("--version")
                .output()
                .ok()?;
            let first = String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            Some(format!("{first} from {}", bin.display()))
        })
        .unwrap_or_else(|| format!("{qemu} not installed"));
    let accel = accel.map_or_else(
        || lab::accel().map_or_else(|e| e.to_string(), |a| a.to_string()),
        |a| a.to_string(),
    );
    format!(
        "miggate {} bench on {cpus} CPUs ({model}), Linux {}, {qemu_version}, accel {accel}, loopback\n",
        env!("CARGO_PKG_VERSION"),
        kernel.trim()
    )
}

/// Round order: interleaved, each round starting one transport later so
/// that no transport always runs first (right after a cold start) or last.
fn round_order<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let n = items.len().max(1);
    (0..items.len()).map(|i| items[(i + round) % n]).collect()
}

#[allow(clippy::too_many_arguments)]
async fn migrations(
    args: &BenchArgs,
    w: Workload,
    transports: &[Transport],
    inst: &peers::Installed,
    qemu_absent: Option<&str>,
    pki: &std::path::Path,
    workdir: &std::path::Path,
    accel: Option<Accel>,
    pin: Option<&pin::PinSpec>,
) -> String {
    let setup = migration::Setup {
        installed: inst,
        pki,
        client_dn: CLIENT_DN,
        workdir,
        ram_mib: args.ram_mib,
        channels: args.channels,
        accel,
        qemu: args.qemu.into(),
        ram_cache: args.cache_dir.as_deref(),
        local: args.local,
        flood: args.flood,
        pin,
    };
    let runnable: Vec<Transport> = transports
        .iter()
        .copied()
        .filter(|t| missing(*t, inst, qemu_absent).is_none())
        .collect();
    let warmup = usize::from(!args.no_warmup);
    let rounds = args.rounds as usize + warmup;
    let mut samples: BTreeMap<Transport, Vec<migration::Sample>> = BTreeMap::new();
    let mut errors: BTreeMap<Transport, String> = BTreeMap::new();
    for round in 0..rounds {
        for t in round_order(&runnable, round) {
            if errors.contains_key(&t) {
                continue;
            }
            let label = if round < warmup {
                "warm-up".to_string()
            } else {
                format!("round {}", round - warmup + 1)
            };
            match migration::migrate_once(t, w, &setup).await {
                Ok(s) => {
                    eprintln!(
                        "{label}: {t}: {:.3} s, layer {:.2} CPU-s, QEMU {:.2} CPU-s, \
                         source side {:.2} / target side {:.2} CPU-s, downtime {} ms, {} passes",
                        s.seconds,
                        s.layer_cpu,
                        s.qemu_cpu,
                        s.source_host_cpu,
                        s.target_host_cpu,
                        s.switch.downtime_ms,
                        s.switch.passes
                    );
                    if round >= warmup {
                        samples.entry(t).or_default().push(s);
                    }
                }
                Err(e) => {
                    eprintln!("{label}: {t}: FAILED: {e:#}");
                    errors.insert(t, format!("failed: {}", first_line(&format!("{e:#}"))));
                }
            }
        }
    }

    let what = match w {
        Workload::Paused => format!("paused guest, {} MiB of random RAM", args.ram_mib),
        Workload::Running => format!(
            "running guest dirtying {} KiB continuously (KVM or TCG as in the header), {} MiB RAM",
            (lab::guest::DIRTY_END - lab::guest::DIRTY_START) / 1024,
            args.ram_mib
        ),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Migration: {what}; median (min-max) of {} interleaved round(s){}; multifd: {} channels; \
         local hops of stunnel, socat, miggate: {}{}",
        args.rounds,
        if warmup > 0 {
            " after a warm-up round"
        } else {
            ""
        },
        args.channels,
        args.local.describe(),
        pin.map_or(String::new(), |p| format!("; pinned: {p}"))
    );
    let table = Table {
        transports,
        samples: &samples,
        missing: &|t: Transport| missing(t, inst, qemu_absent).or_else(|| errors.get(&t).cloned()),
    };
    match w {
        Workload::Paused => table.throughput(&mut out, args.ram_mib),
        Workload::Running => table.downtime(&mut out),
    }
    if let (Some(calm), Some(flood)) = (
        samples.get(&Transport::Miggate),
        samples.get(&Transport::MiggateFlood),
    ) {
        let _ = writeln!(out, "{}", flood_line(calm, flood));
    }
    out
}

/// Measured rows (transport, spread, whether it overlaps the next row's),
/// then the transports without figures and why.
type Ranked = (
    Vec<(Transport, spread::Spread, bool)>,
    Vec<(Transport, String)>,
);

/// The rows of one migration table: every transport asked for, those
/// measured ranked by median, then those without figures and why.
struct Table<'a> {
    transports: &'a [Transport],
    samples: &'a BTreeMap<Transport, Vec<migration::Sample>>,
    missing: &'a dyn Fn(Transport) -> Option<String>,
}

impl Table<'_> {
    /// Measured transports with the spread of `f`, ranked by its median,
    /// each with the overlap mark; then the rest with why.
    fn ranked(&self, f: impl Fn(&migration::Sample) -> f64) -> Ranked {
        let mut measured = Vec::new();
        let mut rest = Vec::new();
        for &t in self.transports {
            if let Some(why) = (self.missing)(t) {
                rest.push((t, why));
                continue;
            }
            match self
                .samples
                .get(&t)
                .and_then(|v| spread::Spread::of(&v.iter().map(&f).collect::<Vec<_>>()))
            {
                Some(sp) => measured.push((t, sp)),
                None => rest.push((t, "no measured round".into())),
            }
        }
        let spreads: Vec<spread::Spread> = measured.iter().map(|m| m.1).collect();
        let rows = spread::ranked(&spreads)
            .into_iter()
            .map(|(i, mark)| (measured[i].0, measured[i].1, mark))
            .collect();
        (rows, rest)
    }

    fn median_of(&self, t: Transport, f: impl Fn(&migration::Sample) -> f64) -> Option<f64> {
        self.samples
            .get(&t)
            .and_then(|v| sys::median(&v.iter().map(f).collect::<Vec<_>>()))
    }

    /// Paused guest: time with its spread, throughput, and CPU per GiB of
    /// the layer, of both QEMUs, and of each side (host).
    fn throughput(&self, out: &mut String, ram_mib: u32) {
        let per_gib = |s: &migration::Sample, cpu: f64| cpu / (s.bytes.max(1) as f64 / GIB);
        let plain = self.median_of(Transport::Plain, |s| s.seconds);
        let _ = writeln!(
            out,
            "{:<18} {:>23} {:1} {:>6} {:>7} {:>7} {:>7} {:>7} {:>15}",
            "transport",
            "s: median (min-max)",
            "",
            "MiB/s",
            "x plain",
            "layer",
            "QEMUs",
            "source",
            "target"
        );
        let (rows, rest) = self.ranked(|s| s.seconds);
        for (t, sp, mark) in rows {
            let cpu = |f: fn(&migration::Sample) -> f64| {
                self.median_of(t, |s| per_gib(s, f(s))).unwrap_or(f64::NAN)
            };
            let layer = if t.layered() {
                format!("{:.2}", cpu(|s| s.layer_cpu))
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<18} {:>23} {:1} {:>6.0} {:>7} {:>7} {:>7.2} {:>7.2} {:>15.2}",
                t.name(),
                sp.show(3),
                if mark { spread::OVERLAP } else { "" },
                f64::from(ram_mib) / sp.median,
                plain.map_or("-".to_string(), |p| format!("{:.2}", p / sp.median)),
                layer,
                cpu(|s| s.qemu_cpu),
                cpu(|s| s.source_host_cpu),
                cpu(|s| s.target_host_cpu),
            );
        }
        for (t, why) in rest {
            let _ = writeln!(out, "{:<18} {why}", t.name());
        }
        let _ = writeln!(
            out,
            "Rows ranked by median time; {}: this row's min-max overlaps the next row's (their \
             order may flip between runs). x plain: plain's median time / this one's. CPU-s per \
             GiB sent (user+system from /proc, medians): layer = the security layer's processes, \
             both sides; QEMUs = both QEMUs (native TLS runs inside them); source = source QEMU \
             + source side of the layer (one hypervisor's cost), target = the same on the target.",
            spread::OVERLAP
        );
    }

    /// Running guest: QEMU's downtime, total time and passes, with their
    /// spreads, ranked by median downtime.
    fn downtime(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<18} {:>22} {:1} {:>24} {:>15}",
            "transport", "downtime ms", "", "total ms", "passes"
        );
        let (rows, rest) = self.ranked(|s| s.switch.downtime_ms as f64);
        for (t, sp, mark) in rows {
            let of = |f: fn(&migration::Sample) -> f64| {
                spread::Spread::of(&self.samples[&t].iter().map(f).collect::<Vec<_>>())
                    .map_or("-".into(), |s| s.show(0))
            };
            let _ = writeln!(
                out,
                "{:<18} {:>22} {:1} {:>24} {:>15}",
                t.name(),
                sp.show(1),
                if mark { spread::OVERLAP } else { "" },
                of(|s| s.switch.total_ms as f64),
                of(|s| s.switch.passes as f64),
            );
        }
        for (t, why) in rest {
            let _ = writeln!(out, "{:<18} {why}", t.name());
        }
        let _ = writeln!(
            out,
            "median (min-max) over the rounds, ranked by median downtime; {}: this row's downtime \
             min-max overlaps the next row's. From the source's query-migrate once completed: \
             downtime = guest stopped until the target's answer on the return path; passes = \
             ram.dirty-sync-count.",
            spread::OVERLAP
        );
        let med = |t| self.median_of(t, |s| s.switch.downtime_ms as f64);
        if let (Some(m), Some(p)) = (med(Transport::Miggate), med(Transport::Plain)) {
            let tls = med(Transport::QemuTls);
            let _ = writeln!(
                out,
                "targets: miggate's median downtime {m:.1} ms is {:+.1} ms from plain's {p:.1} ms \
                 (target: within 5 ms: {}){}",
                m - p,
                if m - p <= 5.0 { "met" } else { "NOT met" },
                tls.map_or(String::new(), |q| format!(
                    "; qemu-tls {q:.1} ms (target: below it: {})",
                    if m < q { "met" } else { "NOT met" }
                ))
            );
        }
    }
}

/// The flood's cost: median and spread of the same migration with and
/// without hostile connections.
fn flood_line(calm: &[migration::Sample], flood: &[migration::Sample]) -> String {
    let secs = |v: &[migration::Sample]| v.iter().map(|s| s.seconds).collect::<Vec<_>>();
    let (c, f) = (secs(calm), secs(flood));
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.3}-{hi:.3}")
    };
    let (mc, mf) = (
        sys::median(&c).unwrap_or(f64::NAN),
        sys::median(&f).unwrap_or(f64::NAN),
    );
    let med = |v: &[migration::Sample], f: fn(&migration::Sample) -> f64| {
        sys::median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let hostile = med(flood, |s| s.hostile as f64);
    format!(
        "flood: miggate-flood {mf:.3} s (spread {}) vs miggate {mc:.3} s (spread {}): \
         {:+.1} % with a median of {hostile:.0} hostile connections during the migration; \
         median CPU-s of the gateways {:.2} vs {:.2}, of the hostile clients (this process) \
         {:.2} vs {:.2}",
        spread(&f),
        spread(&c),
        (mf / mc - 1.0) * 100.0,
        med(flood, |s| s.layer_cpu),
        med(calm, |s| s.layer_cpu),
        med(flood, |s| s.bench_cpu),
        med(calm, |s| s.bench_cpu),
    )
}

/// The relay-only paths, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RelayPath {
    Raw,
    Miggate,
    Stunnel,
    Socat,
}

impl RelayPath {
    fn name(self) -> &'static str {
        match self {
            RelayPath::Raw => "raw loopback",
            RelayPath::Miggate => "miggate",
            RelayPath::Stunnel => "stunnel",
            RelayPath::Socat => "socat",
        }
    }
}

async fn relay_round(
    p: RelayPath,
    args: &BenchArgs,
    inst: &peers::Installed,
    pki: &std::path::Path,
    workdir: &std::path::Path,
) -> Result<relay_only::RelaySample> {
    let dir = tempfile::Builder::new()
        .prefix("relay-")
        .tempdir_in(workdir)?;
    // Raw loopback is the TCP limit whatever the layers' local hops.
    let sink_kind = if p == RelayPath::Raw {
        local::LocalKind::Tcp
    } else {
        args.local
    };
    let sink = relay_only::Sink::start(sink_kind, dir.path())?;
    let entry = args.local.fresh(dir.path(), "entry")?;
    let layer = match p {
        RelayPath::Raw => None,
        RelayPath::Miggate => {
            let checks = peers::MiggateChecks {
                client_dn: CLIENT_DN,
                expect_uuid: None,
            };
            Some(peers::miggate(&inst.miggate, pki, entry, &sink.addr, &checks).await?)
        }
        RelayPath::Stunnel => {
            let bin = inst.stunnel.as_deref().context("stunnel not installed")?;
            Some(peers::stunnel(bin, pki, dir.path(), entry, &sink.addr).await?)
        }
        RelayPath::Socat => {
            let bin = inst.socat.as_deref().context("socat not installed")?;
            Some(peers::socat(bin, pki, dir.path(), entry, &sink.addr).await?)
        }
    };
    let entry = layer
        .as_ref()
        .map_or_else(|| sink.addr.clone(), |l| l.entry.clone());
    let pids = layer.as_ref().map(|l| l.pids()).unwrap_or_default();
    let r = relay_only::run_once(entry, sink, args.relay_mib << 20, &pids).await;
    r.with_context(|| layer.as_ref().map(|l| l.logs()).unwrap_or_default())
}

async fn relay_table(
    args: &BenchArgs,
    inst: &peers::Installed,
    pki: &std::path::Path,
    workdir: &std::path::Path,
) -> String {
    let all = [
        RelayPath::Raw,
        RelayPath::Miggate,
        RelayPath::Stunnel,
        RelayPath::Socat,
    ];
    let skip = |p: RelayPath| match p {
        RelayPath::Stunnel if inst.stunnel.is_none() => Some("skipped: not installed (stunnel4)"),
        RelayPath::Socat if inst.socat.is_none() => Some("skipped: not installed (socat)"),
        _ => None,
    };
    let runnable: Vec<RelayPath> = all.into_iter().filter(|p| skip(*p).is_none()).collect();
    let warmup = usize::from(!args.no_warmup);
    let mut samples: BTreeMap<RelayPath, Vec<relay_only::RelaySample>> = BTreeMap::new();
    let mut errors: BTreeMap<RelayPath, String> = BTreeMap::new();
    for round in 0..args.rounds as usize + warmup {
        for p in round_order(&runnable, round) {
            if errors.contains_key(&p) {
                continue;
            }
            match relay_round(p, args, inst, pki, workdir).await {
                Ok(s) => {
                    eprintln!(
                        "relay-only {}: {}: {:.3} s, {:.2} CPU-s",
                        if round < warmup { "warm-up" } else { "round" },
                        p.name(),
                        s.seconds,
                        s.layer_cpu
                    );
                    if round >= warmup {
                        samples.entry(p).or_default().push(s);
                    }
                }
                Err(e) => {
                    eprintln!("relay-only: {}: FAILED: {e:#}", p.name());
                    errors.insert(p, format!("failed: {}", first_line(&format!("{e:#}"))));
                }
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Relay only (no QEMU): generator -> source side -> target side -> sink, {} MiB per round, median of {} round(s); local hops: {}",
        args.relay_mib, args.rounds, args.local.describe()
    );
    let _ = writeln!(
        out,
        "{:<18} {:>9} {:>8} {:>8} {:>16}",
        "path", "median s", "GB/s", "x raw", "layer CPU-s/GiB"
    );
    let med = |p: RelayPath, f: fn(&relay_only::RelaySample) -> f64| {
        samples
            .get(&p)
            .and_then(|v| sys::median(&v.iter().map(f).collect::<Vec<_>>()))
    };
    let raw = med(RelayPath::Raw, |s| s.seconds);
    for p in all {
        if let Some(why) = skip(p)
            .map(str::to_owned)
            .or_else(|| errors.get(&p).cloned())
        {
            let _ = writeln!(out, "{:<18} {why}", p.name());
            continue;
        }
        let Some(secs) = med(p, |s| s.seconds) else {
            let _ = writeln!(out, "{:<18} no measured round", p.name());
            continue;
        };
        let cpu = if p == RelayPath::Raw {
            "-".to_string()
        } else {
            format!(
                "{:.2}",
                med(p, |s| s.layer_cpu / (s.bytes.max(1) as f64 / GIB)).unwrap_or(f64::NAN)
            )
        };
        let bytes = (args.relay_mib as f64) * MIB;
        let _ = writeln!(
            out,
            "{:<18} {:>9.3} {:>8.2} {:>8} {:>16}",
            p.name(),
            secs,
            bytes / secs / 1e9,
            raw.map_or("-".into(), |r| format!("{:.2}", r / secs)),
            cpu
        );
    }
    out
}

fn handshake_text(r: &handshake::Report) -> String {
    format!(
        "Handshake + admission (TCP connect, TLS 1.3 mTLS, hello + QEMU stream prefix, DN and \
         stream checks, connect to the target, verdict), {} sequential connections:\n  \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
         Gateway memory (VmRSS): target {:.1} MiB idle, source {:.1} MiB idle; per open channel \
         ({} held, 1 MiB relayed each): target {:.0} KiB, source {:.0} KiB; per handshake \
         stalled after its ClientHello ({} held): target {:.1} KiB\n",
        r.connections,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.target_idle_kib as f64 / 1024.0,
        r.source_idle_kib as f64 / 1024.0,
        r.channels,
        r.target_per_channel_kib,
        r.source_per_channel_kib,
        r.stalled,
        r.target_per_stalled_kib
    )
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
