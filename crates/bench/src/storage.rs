//! `miggate bench --copy-storage`: a paused guest migrates with its disk
//! in libvirt's order (`virsh migrate --copy-storage-all`): the target
//! QEMU's NBD server exports an empty disk, the source QEMU mirrors its
//! disk into it until the job is ready, the RAM migrates, then the mirror
//! is cancelled (which ends it in sync). Three ways side by side:
//!
//! - `plain`: no TLS. The NBD client connects straight to the target's
//!   NBD server on a unix socket; RAM over TCP.
//! - `qemu-tls`: QEMU's own TLS for both streams: the NBD server with
//!   `tls-creds` (+ `tls-authz`: the client's DN), the source's `nbd`
//!   node with `tls-creds` and `tls-hostname`, both over TCP; RAM with
//!   the `tls-creds` migration parameter.
//! - `miggate`: a gateway pair carries both: the source gateway's
//!   `--listen-nbd` socket for the NBD client, the target gateway's
//!   `--forward-nbd` to the NBD server (`--nbd-export disk0`); RAM
//!   through the same pair. Local hops on unix sockets.
//!
//! Every run's target disk is hashed and compared with the source's: a
//! run that moved wrong bytes fails its transport's row.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use uuid::Uuid;

use super::peers::{Installed, TLS_HOSTNAME};
use super::{first_line, round_order, sys, BenchArgs, Transport, CLIENT_DN, GIB, MIB};
use miggate_lab::{
    file_sha256, random_ram_file, split_host_port, Accel, Gateway, Guest, Miggate, NativeTls, Qemu,
    QemuOpts, QemuVersion, TlsEndpoint,
};

/// The transports of this table, in table order.
pub const TRANSPORTS: [Transport; 3] = [Transport::Plain, Transport::QemuTls, Transport::Miggate];
/// Guest RAM: small, the disk is what this measures (RAM alone has the
/// main table).
const RAM_MIB: u32 = 128;
/// Seeds of the guest's RAM and of the disk's contents.
const RAM_SEED: u64 = 0xBE4C_0001;
const DISK_SEED: u64 = 0xD15C_0001;
/// The disk's node on both QEMUs, and its NBD export name.
const NODE: &str = "disk0";
/// Its virtio device (flushed through `qemu-io` before hashing).
const DEVICE: &str = "vd0";
const NBD_NODE: &str = "nbd-disk0";
const JOB: &str = "mirror-disk0";
/// Time allowed for each phase (a copy of a few GiB on a busy machine).
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a gateway may take to report its NBD channel's end.
const RECORD_TIMEOUT: Duration = Duration::from_secs(20);

/// One migration with its disk.
#[derive(Debug, Clone)]
pub struct Sample {
    /// From `blockdev-mirror` to the job's `BLOCK_JOB_READY`.
    pub copy_s: f64,
    /// From `blockdev-mirror` to the end of the mirror's final sync
    /// (`BLOCK_JOB_COMPLETED` after the RAM migration).
    pub total_s: f64,
    /// Disk bytes + RAM bytes QEMU sent.
    pub bytes: u64,
    /// CPU seconds during `total_s`: source QEMU, target QEMU, source
    /// gateway, target gateway (0 without gateways).
    pub cpu: [f64; 4],
}

pub struct Setup<'a> {
    pub installed: &'a Installed,
    pub pki: &'a Path,
    pub workdir: &'a Path,
    pub accel: Option<Accel>,
    pub qemu: QemuVersion,
    pub ram_cache: Option<&'a Path>,
    /// The source's image (random bytes), shared by every run: a paused
    /// guest never writes to it.
    pub image: PathBuf,
    pub image_sha256: String,
    pub disk_bytes: u64,
}

/// The transports `--transports` asks for among this table's, or all.
pub fn chosen(args: &BenchArgs) -> Result<Vec<Transport>> {
    if args.transports.is_empty() {
        return Ok(TRANSPORTS.to_vec());
    }
    let v: Vec<Transport> = TRANSPORTS
        .into_iter()
        .filter(|t| args.transports.contains(t))
        .collect();
    if v.is_empty() {
        bail!(
            "--copy-storage measures plain, qemu-tls and miggate: --transports names none of them"
        );
    }
    Ok(v)
}

/// The source image: `disk_mib` MiB of the lab's seeded random bytes (its
/// cached file, copied so that QEMU opens a file of its own).
pub fn source_image(workdir: &Path, disk_mib: u32, cache: Option<&Path>) -> Result<PathBuf> {
    let cache = cache.map_or_else(miggate_lab::default_cache_dir, Path::to_path_buf);
    let len = usize::try_from(u64::from(disk_mib) << 20)?;
    let random = random_ram_file(DISK_SEED, len, &cache)?;
    let image = workdir.join("source-disk.img");
    std::fs::copy(&random, &image)
        .with_context(|| format!("copying {} to {}", random.display(), image.display()))?;
    Ok(image)
}

/// Every round, then the table.
pub async fn run(args: &BenchArgs, transports: &[Transport], setup: &Setup<'_>) -> (String, bool) {
    let warmup = usize::from(!args.no_warmup);
    let mut samples: BTreeMap<Transport, Vec<Sample>> = BTreeMap::new();
    let mut errors: BTreeMap<Transport, String> = BTreeMap::new();
    for round in 0..args.rounds as usize + warmup {
        for t in round_order(transports, round) {
            if errors.contains_key(&t) {
                continue;
            }
            let label = if round < warmup {
                "warm-up".to_string()
            } else {
                format!("round {}", round - warmup + 1)
            };
            match migrate_once(t, setup).await {
                Ok(s) => {
                    eprintln!(
                        "copy-storage {label}: {t}: disk ready {:.3} s, all done {:.3} s, \
                         CPU-s QEMU {:.2}+{:.2}, gateways {:.2}+{:.2}, target disk identical",
                        s.copy_s, s.total_s, s.cpu[0], s.cpu[1], s.cpu[2], s.cpu[3]
                    );
                    if round >= warmup {
                        samples.entry(t).or_default().push(s);
                    }
                }
                Err(e) => {
                    eprintln!("copy-storage {label}: {t}: FAILED: {e:#}");
                    errors.insert(t, format!("failed: {}", first_line(&format!("{e:#}"))));
                }
            }
        }
    }
    let ok = errors.is_empty();
    (table(args, setup, transports, &samples, &errors), ok)
}

/// min / median / max of `f` over `v`.
fn spread(v: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let xs: Vec<f64> = v.iter().map(f).collect();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, sys::median(&xs).unwrap_or(f64::NAN), hi)
}

fn table(
    args: &BenchArgs,
    setup: &Setup<'_>,
    transports: &[Transport],
    samples: &BTreeMap<Transport, Vec<Sample>>,
    errors: &BTreeMap<Transport, String>,
) -> String {
    let disk_mib = setup.disk_bytes as f64 / MIB;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Storage migration (--copy-storage): paused guest, {RAM_MIB} MiB random RAM + a \
         {disk_mib:.0} MiB raw disk of random bytes, libvirt's order (mirror until ready, RAM \
         migration, mirror cancelled in sync); median (min-max) of {} interleaved round(s){}; \
         every run's target disk compared with the source's (SHA-256)",
        args.rounds,
        if args.no_warmup {
            ""
        } else {
            " after a warm-up round"
        },
    );
    let _ = writeln!(
        out,
        "{:<10} {:>23} {:>6} {:>6} {:>23} {:>6} | {:>34} | {:>9}",
        "transport",
        "disk copy s (min-max)",
        "MiB/s",
        "x tls",
        "total s (min-max)",
        "x tls",
        "CPU-s/GiB: srcQEMU dstQEMU srcGW dstGW all",
        "identical"
    );
    let med = |t: Transport, f: fn(&Sample) -> f64| samples.get(&t).map(|v| spread(v, f).1);
    let tls_copy = med(Transport::QemuTls, |s| s.copy_s);
    let tls_total = med(Transport::QemuTls, |s| s.total_s);
    let ratio =
        |native: Option<f64>, this: f64| native.map_or("-".into(), |n| format!("{:.2}", n / this));
    let range = |(lo, m, hi): (f64, f64, f64)| format!("{m:.3} ({lo:.3}-{hi:.3})");
    for &t in transports {
        let v = match (errors.get(&t), samples.get(&t)) {
            (Some(why), _) => {
                let _ = writeln!(out, "{:<10} {why}", t.name());
                continue;
            }
            (None, Some(v)) if !v.is_empty() => v,
            _ => {
                let _ = writeln!(out, "{:<10} no measured round", t.name());
                continue;
            }
        };
        let copy = spread(v, |s| s.copy_s);
        let total = spread(v, |s| s.total_s);
        let per_gib = |cpu: fn(&[f64; 4]) -> f64| {
            spread(v, move |s| cpu(&s.cpu) / (s.bytes.max(1) as f64 / GIB)).1
        };
        let gw = |i: usize| {
            if t == Transport::Miggate {
                format!(
                    "{:.2}",
                    spread(v, |s| s.cpu[i] / (s.bytes.max(1) as f64 / GIB)).1
                )
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            out,
            "{:<10} {:>23} {:>6.0} {:>6} {:>23} {:>6} | {:>18.2} {:>7.2} {:>5} {:>5} {:>4.2} | {:>9}",
            t.name(),
            range(copy),
            disk_mib / copy.1,
            ratio(tls_copy, copy.1),
            range(total),
            ratio(tls_total, total.1),
            per_gib(|c| c[0]),
            per_gib(|c| c[1]),
            gw(2),
            gw(3),
            per_gib(|c| c.iter().sum()),
            // Every run that gave a figure passed the hash check.
            format!("{}/{}", v.len(), v.len()),
        );
    }
    let _ = writeln!(
        out,
        "disk copy: blockdev-mirror to BLOCK_JOB_READY (MiB/s: the disk over it); total: \
         blockdev-mirror to the end of the mirror's final sync after the RAM migration. \
         x tls: qemu-tls's median / this one's (higher is faster). CPU: user+system seconds \
         per GiB moved (disk + RAM) over the total; all: the four processes. identical: runs whose \
         target disk had the source's SHA-256 (a mismatch fails the row). Local hops: \
         plain's NBD on a unix socket and RAM on TCP; qemu-tls both on TCP; miggate unix \
         sockets into and out of the gateways, TCP between them."
    );
    out
}

/// The disk on a QEMU: a raw image, its node [`NODE`], a virtio device.
fn with_disk(mut opts: QemuOpts, image: &Path) -> QemuOpts {
    opts.extra_args.extend([
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=file-{NODE}",
            image.display()
        ),
        "-blockdev".into(),
        format!("driver=raw,file=file-{NODE},node-name={NODE}"),
        "-device".into(),
        format!("virtio-blk-pci,drive={NODE},id={DEVICE}"),
    ]);
    opts
}

/// Waits for event `want` of the mirror job; its QEMU timestamp. A job
/// that ends (or errs) first is an error with QEMU's reason.
async fn job_event(q: &mut Qemu, want: &str) -> Result<SystemTime> {
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, q.qmp.next_event())
            .await
            .map_err(|_| anyhow!("no {want} from the mirror job after {PHASE_TIMEOUT:?}"))?
            .with_context(|| format!("waiting for {want}: {}", q.stderr_text()))?;
        if ev.data["device"] != JOB {
            continue;
        }
        if let Some(err) = ev.data["error"].as_str() {
            bail!("mirror job: {} {err}", ev.name);
        }
        if ev.name == want {
            return Ok(ev.timestamp.to_system_time());
        }
        if matches!(
            ev.name.as_str(),
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR"
        ) {
            bail!("mirror job: {} before {want}: {}", ev.name, ev.data);
        }
    }
}

/// A gateway of the pair, with JSON logs, once it listens.
async fn gateway(bin: &Path, args: &[String], name: &str) -> Result<Gateway> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Miggate::new(bin)
        .gateway(&args)
        .await
        .with_context(|| format!("starting {name}"))
}

/// The miggate pair: RAM from `entry` to `ram_in`, NBD from
/// `source_nbd` to `target_nbd` (export [`NODE`]).
async fn miggate_pair(
    s: &Setup<'_>,
    uuid: Uuid,
    dir: &Path,
    ram_in: &str,
    target_nbd: &Path,
) -> Result<(Gateway, Gateway, String, PathBuf)> {
    let pki = s.pki.display().to_string();
    let targs: Vec<String> = [
        "target",
        "--listen",
        "127.0.0.1:0",
        "--x509-dir",
        &pki,
        "--forward",
        ram_in,
        "--authz-identity",
        CLIENT_DN,
        "--expect-uuid",
        &uuid.to_string(),
        "--forward-nbd",
        &format!("unix:{}", target_nbd.display()),
        "--nbd-export",
        NODE,
    ]
    .map(str::to_owned)
    .to_vec();
    let tgw = gateway(&s.installed.miggate, &targs, "miggate target").await?;
    let (_, tport) = split_host_port(&tgw.addr)
        .ok_or_else(|| anyhow!("the target gateway listens on {:?}: no port", tgw.addr))?;
    let entry = format!("unix:{}", dir.join("entry.sock").display());
    let source_nbd = dir.join("source-nbd.sock");
    let sargs: Vec<String> = [
        "source",
        "--listen",
        &entry,
        "--listen-nbd",
        &format!("unix:{}", source_nbd.display()),
        "--connect",
        &format!("127.0.0.1:{tport}"),
        "--tls-hostname",
        TLS_HOSTNAME,
        "--x509-dir",
        &pki,
    ]
    .map(str::to_owned)
    .to_vec();
    let sgw = gateway(&s.installed.miggate, &sargs, "miggate source").await?;
    Ok((sgw, tgw, entry, source_nbd))
}

/// How the NBD and RAM streams of one run get from the source QEMU to
/// the target QEMU.
struct Route {
    /// The target's `nbd-server-start` address (flat `SocketAddress`).
    serve: Value,
    /// The server of the source's `nbd` node.
    connect: Value,
    /// Where the source migrates its RAM.
    ram_out: String,
    /// The gateway pair in between (miggate).
    pair: Option<(Gateway, Gateway)>,
}

impl Route {
    /// Every gateway's log, for a failure report.
    fn logs(&self) -> String {
        self.pair.as_ref().map_or_else(String::new, |(sg, tg)| {
            format!(
                "\n--- source gateway ---\n{}\n--- target gateway ---\n{}",
                sg.log_text(),
                tg.log_text()
            )
        })
    }
}

fn unix(path: &Path) -> Value {
    json!({"type": "unix", "path": path})
}

/// The target's incoming RAM and, for miggate, the gateway pair.
async fn route(
    t: Transport,
    s: &Setup<'_>,
    uuid: Uuid,
    dir: &Path,
    dst: &mut Qemu,
) -> Result<Route> {
    let target_nbd = dir.join("target-nbd.sock");
    Ok(match t {
        Transport::QemuTls => {
            let port = sys::free_port()?.to_string();
            let nbd = json!({"type": "inet", "host": "127.0.0.1", "port": port});
            let ram = dst.migrate_incoming_any_port().await?;
            Route {
                serve: nbd.clone(),
                connect: nbd,
                ram_out: format!("tcp:127.0.0.1:{ram}"),
                pair: None,
            }
        }
        Transport::Miggate => {
            let ram_in = format!("unix:{}", dir.join("qemu-incoming.sock").display());
            dst.migrate_incoming(&ram_in).await?;
            let (sgw, tgw, entry, source_nbd) =
                miggate_pair(s, uuid, dir, &ram_in, &target_nbd).await?;
            Route {
                serve: unix(&target_nbd),
                connect: unix(&source_nbd),
                ram_out: entry,
                pair: Some((sgw, tgw)),
            }
        }
        _ => Route {
            serve: unix(&target_nbd),
            connect: unix(&target_nbd),
            ram_out: format!("tcp:127.0.0.1:{}", dst.migrate_incoming_any_port().await?),
            pair: None,
        },
    })
}

/// Both QEMUs: the source with `s.image`, the target with `target_image`
/// waiting for an incoming migration; QEMU's TLS objects and migration
/// parameters for `qemu-tls`.
async fn qemu_pair(
    t: Transport,
    s: &Setup<'_>,
    uuid: Uuid,
    target_image: &Path,
) -> Result<(Qemu, Qemu)> {
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: RAM_SEED }, RAM_MIB);
    opts.uuid = Some(uuid);
    opts.accel = s.accel;
    opts.qemu = s.qemu;
    opts.ram_cache = s.ram_cache.map(Path::to_path_buf);
    let mut dopts = with_disk(opts.as_incoming(), target_image);
    let mut sopts = with_disk(opts, &s.image);
    let native = t == Transport::QemuTls;
    if native {
        let tls = |endpoint, authz: Option<&str>| NativeTls {
            dir: s.pki.to_path_buf(),
            endpoint,
            authz_identity: authz.map(str::to_owned),
            priority: None,
        };
        sopts.tls = Some(tls(TlsEndpoint::Client, None));
        dopts.tls = Some(tls(TlsEndpoint::Server, Some(CLIENT_DN)));
    }
    let (mut src, mut dst) = Qemu::pair(sopts, dopts).await?;
    let caps = [("return-path", true), ("validate-uuid", true)];
    for q in [&mut src, &mut dst] {
        q.set_capabilities(&caps).await?;
    }
    src.set_unlimited_bandwidth().await?;
    if native {
        src.set_native_tls_parameters(Some(TLS_HOSTNAME)).await?;
        dst.set_native_tls_parameters(None).await?;
    }
    Ok((src, dst))
}

/// One migration of a fresh guest pair with its disk through `t`.
pub async fn migrate_once(t: Transport, s: &Setup<'_>) -> Result<Sample> {
    let dir = tempfile::Builder::new()
        .prefix("storage-")
        .tempdir_in(s.workdir)
        .context("temp dir for the run")?;
    let target_image = dir.path().join("target-disk.img");
    std::fs::File::create(&target_image)
        .and_then(|f| f.set_len(s.disk_bytes))
        .with_context(|| format!("creating {}", target_image.display()))?;
    let uuid = Uuid::new_v4();
    let (mut src, mut dst) = qemu_pair(t, s, uuid, &target_image).await?;
    let mut route = route(t, s, uuid, dir.path(), &mut dst).await?;

    // libvirt's order. Target: the NBD server and a writable export.
    let native = t == Transport::QemuTls;
    serve_nbd(&mut dst, &mut route, native).await?;
    // Source: an `nbd` node, a full mirror into it until ready.
    let mut nbd_node = json!({
        "driver": "nbd", "node-name": NBD_NODE, "export": NODE, "server": route.connect,
    });
    if native {
        nbd_node["tls-creds"] = json!(miggate_lab::qemu::TLS_CREDS_ID);
        nbd_node["tls-hostname"] = json!(TLS_HOSTNAME);
    }
    let gw_pid = |i: usize| route.pair.as_ref().and_then(|(s, t)| [s, t][i].pid());
    let pids = [src.pid(), dst.pid(), gw_pid(0), gw_pid(1)];
    let cpu_now = || pids.map(|p| p.and_then(sys::cpu_seconds).unwrap_or(0.0));
    src.forget_old_events().await?;
    let cpu0 = cpu_now();
    let start = SystemTime::now();
    src.cmd("blockdev-add", nbd_node)
        .await
        .with_context(|| route.logs())?;
    let mirror = json!({"job-id": JOB, "device": NODE, "target": NBD_NODE, "sync": "full"});
    src.cmd("blockdev-mirror", mirror).await?;
    let ready = job_event(&mut src, "BLOCK_JOB_READY")
        .await
        .with_context(|| route.logs())?;
    // The RAM migration, then the ready mirror cancelled: it completes in
    // sync (the target's disk whole, the source keeps its own).
    src.forget_old_events().await?;
    src.migrate(&route.ram_out).await?;
    let s_info = src.wait_migration_end(PHASE_TIMEOUT).await?;
    let d_info = dst.wait_migration_end(PHASE_TIMEOUT).await?;
    for (side, info) in [("source", &s_info), ("target", &d_info)] {
        if info.status.as_deref() != Some("completed") {
            bail!(
                "{t} migration: {side} ended {:?}: {}{}",
                info.status,
                info.error_desc.as_deref().unwrap_or("-"),
                route.logs()
            );
        }
    }
    src.cmd("block-job-cancel", json!({ "device": JOB }))
        .await?;
    let done = job_event(&mut src, "BLOCK_JOB_COMPLETED")
        .await
        .with_context(|| route.logs())?;
    let cpu1 = cpu_now();

    src.cmd("blockdev-del", json!({ "node-name": NBD_NODE }))
        .await?;
    if let Some((sgw, tgw)) = &mut route.pair {
        nbd_went_through(sgw, tgw, s.disk_bytes).await?;
    }
    // "hard": the server may not have seen its client leave yet (a safe
    // delete then fails "still in use"); every write was acknowledged
    // before the job completed, so nothing is lost.
    dst.cmd("block-export-del", json!({ "id": NODE, "mode": "hard" }))
        .await?;
    dst.cmd("nbd-server-stop", json!({})).await?;
    check_disk(&mut dst, &target_image, &s.image_sha256).await?;

    let secs = |t: SystemTime| t.duration_since(start).unwrap_or_default().as_secs_f64();
    let ram = s_info.ram.as_ref().map_or(0, |r| r.transferred);
    Ok(Sample {
        copy_s: secs(ready),
        total_s: secs(done),
        bytes: s.disk_bytes + ram,
        cpu: std::array::from_fn(|i| (cpu1[i] - cpu0[i]).max(0.0)),
    })
}

/// Tries at one TCP port for the NBD server: one found free may be taken
/// by the time QEMU binds it on a shared machine.
const PORT_TRIES: usize = 5;

/// The target's NBD server at `route.serve`, with QEMU's TLS (and the
/// client's DN as `tls-authz`) if `native`, and the writable export.
async fn serve_nbd(dst: &mut Qemu, route: &mut Route, native: bool) -> Result<()> {
    for attempt in 1.. {
        let mut server = json!({ "addr": legacy(&route.serve) });
        if native {
            server["tls-creds"] = json!(miggate_lab::qemu::TLS_CREDS_ID);
            server["tls-authz"] = json!(miggate_lab::qemu::TLS_AUTHZ_ID);
        }
        match dst.cmd("nbd-server-start", server).await {
            Ok(_) => break,
            Err(e)
                if route.serve["type"] == "inet"
                    && attempt < PORT_TRIES
                    && e.to_string().contains("Address already in use") =>
            {
                let port = json!(sys::free_port()?.to_string());
                route.serve["port"] = port.clone();
                route.connect["port"] = port;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let export =
        json!({"type": "nbd", "id": NODE, "node-name": NODE, "name": NODE, "writable": true});
    dst.cmd("block-export-add", export).await?;
    Ok(())
}

/// `nbd-server-start` spells its address the legacy way
/// (`{"type", "data": {...}}`), `blockdev-add` the flat way.
fn legacy(flat: &Value) -> Value {
    let mut data = flat.clone();
    let kind = data
        .as_object_mut()
        .and_then(|o| o.remove("type"))
        .unwrap_or_default();
    json!({ "type": kind, "data": data })
}

/// Both gateways recorded the NBD channel completed with at least the
/// disk through it: the disk went through miggate, all of it.
async fn nbd_went_through(sgw: &mut Gateway, tgw: &mut Gateway, disk_bytes: u64) -> Result<()> {
    for (side, gw) in [("source", sgw), ("target", tgw)] {
        let rec = gw
            .wait_event(
                |v| {
                    v["target"] == "miggate::outcome"
                        && v["channel"].as_str().is_some_and(|c| c.starts_with("nbd:"))
                },
                RECORD_TIMEOUT,
            )
            .await
            .with_context(|| format!("the {side} gateway's NBD channel record"))?;
        let sent = rec["bytes_sent"].as_u64().unwrap_or(0);
        if rec["outcome"] != "completed" || sent < disk_bytes {
            bail!("the {side} gateway's NBD channel: {rec}");
        }
    }
    Ok(())
}

/// The target's disk, flushed, hashes to the source's.
async fn check_disk(dst: &mut Qemu, image: &Path, want: &str) -> Result<()> {
    let flush = format!("qemu-io -d {DEVICE}/virtio-backend \"flush\"");
    let out = dst
        .cmd("human-monitor-command", json!({ "command-line": flush }))
        .await?;
    if out.as_str().is_some_and(|o| o.contains("rror")) {
        bail!("flushing the target's disk: {out}");
    }
    let got = file_sha256(image).await?;
    if got != want {
        bail!("the target's disk differs from the source's: SHA-256 {got}, expected {want}");
    }
    Ok(())
}
