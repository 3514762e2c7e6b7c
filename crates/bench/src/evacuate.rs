//! `miggate bench --evacuate N`: a host evacuation. N paused guests, each
//! with RAM of its own seeded random bytes and its own UUID, migrate at
//! once into N fresh target QEMUs, (a) through standalone gateways and
//! (b) through one daemon holding N registrations (one ticket each). One
//! guest migrates alone through the same path first (median of
//! `ALONE_ROUNDS`), for comparison.
//!
//! Every arrival is checked: both QEMUs `completed`, the target QEMU's
//! UUID is its source's, and its RAM hashes to its source's (a VM landing
//! in another VM's target would fail both). The wall time runs from the
//! first `migrate` to the last terminal event.
//!
//! Path (a) is one `miggate source` and one `miggate target` for all N
//! VMs: the target gateway forwards per VM (`--forward
//! unix:DIR/in-{uuid}.sock`), each channel to the socket named by the VM
//! UUID its stream carries, where that VM's target QEMU listens. Path (b)
//! is the daemon's: one target process, N registrations and tickets, a
//! source gateway per ticket.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use uuid::Uuid;

use miggate::control::types::{Allow, Forward, IncomingRequest, Phase, QmpForward};
use miggate_lab::{Accel, DaemonOpts, Guest, Miggate, Qemu, QemuOpts, QemuVersion};

use super::local::Local;
use super::peers::{self, Installed, MiggateChecks, TLS_HOSTNAME};
use super::sys;

/// QEMUs (and their gateways) started at once: 64 QEMUs starting together
/// on 2 cores would run into the lab's start-up deadline.
const START_BATCH: usize = 8;
/// All N migrations together, on a busy 2-core machine.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the daemon may take to book the migrations and close what
/// they used once the QEMUs are done.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the daemon's API and descriptors are looked at meanwhile.
const POLL: Duration = Duration::from_millis(50);
/// Migrations of one VM alone per path: the median is the reference (one
/// sample on a shared machine varies twofold).
const ALONE_ROUNDS: usize = 3;
/// Seeds of the guests' RAM: VM i has seed `SEED_BASE + i` (cached files).
const SEED_BASE: u64 = 0xE7AC_0000;

pub struct Setup<'a> {
    pub installed: &'a Installed,
    pub pki: &'a Path,
    pub client_dn: &'a str,
    pub workdir: &'a Path,
    pub ram_mib: u32,
    pub accel: Option<Accel>,
    pub qemu: QemuVersion,
    pub ram_cache: Option<&'a Path>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// No miggate: each source QEMU straight into its target's unix
    /// socket (the control: what the QEMUs and the machine allow).
    Plain,
    /// One `miggate source` / `miggate target` pair for all VMs, the
    /// target forwarding per VM UUID.
    Pairs,
    /// One `miggate daemon`, a registration and ticket per VM, a
    /// `miggate source --ticket-file` per VM.
    Daemon,
}

impl Via {
    fn label(self, n: usize) -> String {
        match self {
            Via::Plain => "plain (no TLS), control".to_string(),
            Via::Pairs => "one gateway pair".to_string(),
            Via::Daemon => format!("daemon, {n} tickets"),
        }
    }
}

/// One VM of the evacuation, before it migrates.
struct Vm {
    i: usize,
    uuid: Uuid,
    src: Qemu,
    dst: Qemu,
    /// The target QEMU's spare QMP socket (the daemon's).
    dst_qmp: PathBuf,
    /// SHA-256 of the source's RAM, taken before the migration.
    hash: String,
    /// Where the source QEMU migrates to.
    entry: String,
}

/// What one batch of simultaneous migrations did.
struct Batch {
    /// Per migration: `migrate` to its terminal event.
    seconds: Vec<f64>,
    /// First `migrate` to the last terminal event.
    wall: f64,
    /// Bytes the sources sent (`ram.transferred`).
    bytes: u64,
    /// CPU seconds (user + system) of the miggate processes during the
    /// migrations: what the machine's load does not change much.
    cpu: f64,
    /// The same for the QEMUs (both sides).
    qemu_cpu: f64,
}

impl Batch {
    fn cpu_per_gib(&self) -> f64 {
        self.cpu / (self.bytes.max(1) as f64 / super::GIB)
    }
}

/// Starts `k` pairs of QEMUs (VM `first + i`), `START_BATCH` at a time.
async fn start_vms(first: usize, k: usize, s: &Setup<'_>, dir: &Path) -> Result<Vec<Vm>> {
    let mut vms = Vec::with_capacity(k);
    for chunk in (0..k).collect::<Vec<_>>().chunks(START_BATCH) {
        let mut set = tokio::task::JoinSet::new();
        for &j in chunk {
            let i = first + j;
            let uuid = Uuid::new_v4();
            let mut o = QemuOpts::new(
                Guest::PausedRandomRam {
                    seed: SEED_BASE + i as u64,
                },
                s.ram_mib,
            );
            o.uuid = Some(uuid);
            o.accel = s.accel;
            o.qemu = s.qemu;
            o.ram_cache = s.ram_cache.map(Path::to_path_buf);
            let dst_qmp = dir.join(format!("dst-{i}.qmp"));
            let dopts = o.as_incoming().with_qmp(&dst_qmp);
            set.spawn(async move {
                let (src, dst) = Qemu::pair(o, dopts).await?;
                anyhow::Ok((i, uuid, src, dst, dst_qmp))
            });
        }
        while let Some(r) = set.join_next().await {
            let (i, uuid, mut src, dst, dst_qmp) = r.context("QEMU start task")??;
            src.set_capabilities(&[("return-path", true), ("validate-uuid", true)])
                .await?;
            src.set_unlimited_bandwidth().await?;
            let hash = src.ram_sha256().await?;
            vms.push(Vm {
                i,
                uuid,
                src,
                dst,
                dst_qmp,
                hash,
                entry: String::new(),
            });
        }
    }
    vms.sort_by_key(|v| v.i);
    Ok(vms)
}

/// The miggate processes of a path; killed when dropped.
#[allow(clippy::large_enum_variant)] // one per batch, never moved around
enum Carriers {
    /// Nothing between the QEMUs.
    Plain,
    Pairs(Vec<peers::Layer>),
    Daemon {
        daemon: miggate_lab::Daemon,
        ids: Vec<String>,
        sources: Vec<miggate_lab::Gateway>,
        /// The daemon's open descriptors before the registrations.
        baseline: usize,
    },
}

impl Carriers {
    fn pids(&self) -> Vec<u32> {
        match self {
            Carriers::Plain => Vec::new(),
            Carriers::Pairs(layers) => layers.iter().flat_map(peers::Layer::pids).collect(),
            Carriers::Daemon {
                daemon, sources, ..
            } => daemon
                .gw
                .pid()
                .into_iter()
                .chain(sources.iter().filter_map(miggate_lab::Gateway::pid))
                .collect(),
        }
    }

    fn logs(&self) -> String {
        match self {
            Carriers::Plain => String::new(),
            Carriers::Pairs(layers) => layers
                .iter()
                .map(peers::Layer::logs)
                .collect::<Vec<_>>()
                .join("\n"),
            Carriers::Daemon { daemon, .. } => daemon.log_text(),
        }
    }
}

/// Puts every VM's miggate path in place and sets `Vm::entry`.
async fn carriers(via: Via, vms: &mut [Vm], s: &Setup<'_>, dir: &Path) -> Result<Carriers> {
    let bin = &s.installed.miggate;
    match via {
        Via::Plain => {
            for vm in vms.iter_mut() {
                let incoming = Local::Unix(dir.join(format!("in-{}.sock", vm.i)));
                vm.dst.set_capabilities(&[("return-path", true)]).await?;
                vm.dst.migrate_incoming(&incoming.uri()).await?;
                vm.entry = incoming.uri();
            }
            Ok(Carriers::Plain)
        }
        Via::Pairs => {
            // One pair: the target gateway picks each VM's socket by the
            // UUID in its stream; the source gateway takes every QEMU.
            let per_vm = Local::Unix(dir.join("in-{uuid}.sock"));
            let checks = MiggateChecks {
                client_dn: s.client_dn,
                expect_uuid: None,
            };
            let entry = Local::Unix(dir.join("src.sock"));
            let layer = peers::miggate(bin, s.pki, entry, &per_vm, &checks).await?;
            for vm in vms.iter_mut() {
                let incoming = Local::Unix(dir.join(format!("in-{}.sock", vm.uuid)));
                vm.dst.set_capabilities(&[("return-path", true)]).await?;
                vm.dst.migrate_incoming(&incoming.uri()).await?;
                vm.entry = layer.entry.uri();
            }
            Ok(Carriers::Pairs(vec![layer]))
        }
        Via::Daemon => {
            let ddir = dir.join("daemon");
            std::fs::create_dir(&ddir).context("creating the daemon's directory")?;
            let m = Miggate::new(bin);
            let daemon = m.daemon(&ddir, s.pki, &DaemonOpts::default()).await?;
            let baseline = sys::fd_count(daemon.gw.pid().context("the daemon exited")?);
            let api = daemon.client()?;
            let pki = s.pki.display().to_string();
            let (mut ids, mut sources) = (Vec::new(), Vec::new());
            for vm in vms.iter_mut() {
                let req = IncomingRequest {
                    vm_uuid: Some(vm.uuid),
                    allow: Allow::Identity(s.client_dn.to_owned()),
                    forward: Forward::Qmp(QmpForward {
                        qmp: format!("unix:{}", vm.dst_qmp.display()),
                        capabilities: [("return-path".to_string(), true)].into(),
                        parameters: Default::default(),
                    }),
                    channels: 1,
                    expires_in: MIGRATION_TIMEOUT.as_secs(),
                    listeners: None,
                    disks: Vec::new(),
                    nbd_forward: None,
                };
                let r = api
                    .register(&req)
                    .await
                    .with_context(|| format!("registering VM {}\n{}", vm.i, daemon.log_text()))?;
                let ticket = dir.join(format!("ticket-{}", vm.i));
                std::fs::write(&ticket, format!("{}\n", r.ticket.expose()))
                    .context("writing a ticket file")?;
                std::fs::set_permissions(&ticket, std::fs::Permissions::from_mode(0o600))
                    .context("chmod of a ticket file")?;
                let entry = format!("unix:{}", dir.join(format!("src-{}.sock", vm.i)).display());
                let sgw = m
                    .gateway(&[
                        "source",
                        "--listen",
                        &entry,
                        "--connect",
                        &daemon.gw.addr,
                        "--tls-hostname",
                        TLS_HOSTNAME,
                        "--x509-dir",
                        &pki,
                        "--ticket-file",
                        &ticket.display().to_string(),
                    ])
                    .await?;
                vm.entry = entry;
                ids.push(r.id);
                sources.push(sgw);
            }
            Ok(Carriers::Daemon {
                daemon,
                ids,
                sources,
                baseline,
            })
        }
    }
}

/// `k` VMs (numbered from `first`) migrated at once through `via`, every
/// arrival checked.
async fn batch(via: Via, first: usize, k: usize, s: &Setup<'_>) -> Result<Batch> {
    let dir = tempfile::Builder::new()
        .prefix("evac-")
        .tempdir_in(s.workdir)
        .context("temp dir for the evacuation")?;
    eprintln!("evacuate {}: starting {k} QEMU pairs", via.label(k));
    let mut vms = start_vms(first, k, s, dir.path()).await?;
    let carriers = carriers(via, &mut vms, s, dir.path()).await?;
    eprintln!("evacuate {}: migrating {k} VMs at once", via.label(k));

    let pids = carriers.pids();
    let qemu_pids: Vec<u32> = vms
        .iter()
        .flat_map(|v| [v.src.pid(), v.dst.pid()])
        .flatten()
        .collect();
    let (cpu0, qcpu0) = (sys::cpu_total(&pids), sys::cpu_total(&qemu_pids));
    let mut set = tokio::task::JoinSet::new();
    for mut vm in vms {
        set.spawn(async move {
            vm.src.forget_old_events().await?;
            let start = SystemTime::now();
            vm.src.migrate(&vm.entry).await?;
            let s_info = vm.src.wait_migration_end(MIGRATION_TIMEOUT).await?;
            let d_info = vm.dst.wait_migration_end(MIGRATION_TIMEOUT).await?;
            anyhow::Ok((vm, start, s_info, d_info))
        });
    }
    let mut done = Vec::with_capacity(k);
    while let Some(r) = set.join_next().await {
        done.push(r.context("migration task")??);
    }
    let cpu = sys::cpu_total(&pids) - cpu0;
    let qemu_cpu = sys::cpu_total(&qemu_pids) - qcpu0;
    done.sort_by_key(|d| d.0.i);

    let mut seconds = Vec::with_capacity(k);
    let (mut first_start, mut last_end) = (None::<SystemTime>, None::<SystemTime>);
    let mut bytes = 0;
    for (vm, start, s_info, d_info) in &done {
        for (side, info) in [("source", s_info), ("target", d_info)] {
            if info.status.as_deref() != Some("completed") {
                bail!(
                    "VM {} ({}): {side} QEMU ended {:?}: {}\n{}",
                    vm.i,
                    vm.uuid,
                    info.status,
                    info.error_desc.as_deref().unwrap_or("-"),
                    carriers.logs()
                );
            }
        }
        let d = vm
            .src
            .migration_duration()
            .context("no migration duration")?;
        seconds.push(d.as_secs_f64());
        let end = *start + d;
        first_start = Some(first_start.map_or(*start, |f| f.min(*start)));
        last_end = Some(last_end.map_or(end, |l| l.max(end)));
        bytes += s_info.ram.as_ref().map_or(0, |r| r.transferred);
    }
    // Each VM in its own target: the UUID and the RAM of its source.
    for (mut vm, ..) in done {
        let got = vm.dst.cmd("query-uuid", Value::Null).await?;
        ensure!(
            got["UUID"] == vm.uuid.to_string(),
            "VM {}: the target QEMU runs {} instead of {}",
            vm.i,
            got["UUID"],
            vm.uuid
        );
        let hash = vm.dst.ram_sha256().await?;
        ensure!(
            hash == vm.hash,
            "VM {} ({}): the target's RAM differs from its source's",
            vm.i,
            vm.uuid
        );
    }
    if let Carriers::Daemon {
        daemon,
        ids,
        baseline,
        ..
    } = &carriers
    {
        // The daemon books a migration once its target QEMU said how it
        // went, after the sockets closed: poll for it.
        let api = daemon.client()?;
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        for id in ids {
            loop {
                let v = api.migration(id).await?;
                if v.state == Phase::Completed && v.channels_seen == 1 {
                    break;
                }
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the daemon books migration {id} {:?} with {} channels",
                    v.state,
                    v.channels_seen
                );
                tokio::time::sleep(POLL).await;
            }
        }
        // Nothing of the N migrations may stay open in the daemon: its
        // descriptors come back to what it had before the registrations.
        let pid = daemon.gw.pid().context("the daemon exited")?;
        loop {
            let now = sys::fd_count(pid);
            if now <= *baseline {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the daemon holds {now} descriptors after {k} migrations ended, {baseline} before"
            );
            tokio::time::sleep(POLL).await;
        }
    }
    let wall = last_end
        .zip(first_start)
        .and_then(|(l, f)| l.duration_since(f).ok())
        .context("no migration")?
        .as_secs_f64();
    eprintln!(
        "evacuate {}: {k} completed and verified in {wall:.3} s",
        via.label(k)
    );
    Ok(Batch {
        seconds,
        wall,
        bytes,
        cpu,
        qemu_cpu,
    })
}

/// Runs the evacuation of `n` VMs through both paths (each after one VM
/// alone) and returns the table.
pub async fn run(n: usize, s: &Setup<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Evacuation: {n} paused guests of {} MiB (random RAM of its own seed, its own UUID) \
         migrated at once, after one alone ({ALONE_ROUNDS} times, median) through the same path; \
         each arrival checked \
         (completed, UUID, RAM SHA-256)",
        s.ram_mib
    );
    let _ = writeln!(
        out,
        "{:<22} {:>4} {:>8} {:>10} {:>8} {:>11} {:>8} {:>24} {:>16}",
        "path",
        "VMs",
        "wall s",
        "aggr MiB/s",
        "alone s",
        "alone MiB/s",
        "x alone",
        "per-VM s min/median/max",
        "CPU-s/GiB all/1"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut notes = Vec::new();
    for via in [Via::Plain, Via::Pairs, Via::Daemon] {
        // The single VM is number n: its RAM differs from all the others'.
        let res = async {
            let (mut alone, mut alone_cpu) = (Vec::new(), Vec::new());
            for _ in 0..ALONE_ROUNDS {
                let b = batch(via, n, 1, s).await?;
                alone.push(b.wall);
                alone_cpu.push(b.cpu_per_gib());
            }
            let all = batch(via, 0, n, s).await?;
            let med = |v: &[f64]| sys::median(v).unwrap_or(f64::NAN);
            anyhow::Ok((med(&alone), med(&alone_cpu), all))
        }
        .await;
        let label = via.label(n);
        match res {
            Ok((alone, alone_cpu, all)) => {
                let ram = f64::from(s.ram_mib);
                let aggr = ram * n as f64 / all.wall;
                let single = ram / alone;
                let (lo, med, hi) = (
                    sys::quantile(&all.seconds, 0.0).unwrap_or(f64::NAN),
                    sys::median(&all.seconds).unwrap_or(f64::NAN),
                    sys::quantile(&all.seconds, 1.0).unwrap_or(f64::NAN),
                );
                let _ = writeln!(
                    out,
                    "{:<22} {:>4} {:>8.3} {:>10.0} {:>8.3} {:>11.0} {:>8.2} {:>24} {:>16}",
                    label,
                    n,
                    all.wall,
                    aggr,
                    alone,
                    single,
                    aggr / single,
                    format!("{lo:.3} / {med:.3} / {hi:.3}"),
                    if via == Via::Plain {
                        "-".to_string()
                    } else {
                        format!("{:.2} / {alone_cpu:.2}", all.cpu_per_gib())
                    },
                );
                eprintln!(
                    "evacuate {label}: {:.1} MiB sent in all",
                    all.bytes as f64 / super::MIB
                );
                notes.push(format!(
                    "{label}: the migrations' processes used {:.0} % of the machine's {} CPUs \
                     during the wall time (miggate {:.1} CPU-s, QEMUs {:.1} CPU-s)",
                    (all.cpu + all.qemu_cpu) / (all.wall * cpus) * 100.0,
                    cpus,
                    all.cpu,
                    all.qemu_cpu
                ));
            }
            Err(e) => {
                eprintln!("evacuate {label}: FAILED: {e:#}");
                let _ = writeln!(
                    out,
                    "{:<22} failed: {}",
                    label,
                    super::first_line(&format!("{e:#}"))
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "wall: first migrate to last completion; aggr: guest RAM moved per second of wall time; \
         x alone: aggregate / one migration alone; CPU-s/GiB: user+system time of the miggate \
         processes per GiB sent, all at once / alone (median). Plain: the QEMUs alone, unix sockets, \
         no TLS (the control). One gateway pair: one source and one \
         target gateway for all, the target forwarding by VM UUID (--forward unix:DIR/in-{{uuid}}.sock); \
         daemon: one target process for all, one ticket and source gateway per VM."
    );
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    out
}
