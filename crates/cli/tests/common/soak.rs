//! Back-to-back migrations of one running guest (issue 11, item 3): the
//! VM ping-pongs into a fresh target QEMU each time (QEMU needs a new
//! `-incoming` process per migration; the next one is started while the
//! current migration runs), through long-lived miggate processes whose
//! RSS and open descriptors are read after every migration.
//!
//! Two paths: a standalone gateway pair (`miggate source` → `miggate
//! target --expect-uuid`), and a daemon with one-shot tickets driven by
//! `miggate migrate` (one registration per migration). `scripts/soak.sh`
//! runs the long version; `tests/soak.rs` the short one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use serde_json::Value;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::daemon::Daemon;
use super::gateway::{miggate, Gateway, BIN};
use super::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use super::scenario::{pki, pki_dir, EVENT_TIMEOUT, MIGRATION_TIMEOUT, SOURCE_DN};
use miggate::control::types::Phase;

/// Guest RAM: small, so that 100 migrations take minutes.
const RAM_MIB: u32 = 64;

/// Growth of a process's RSS from the first checked migration to any
/// later one that counts as a leak. A 256 KiB relay buffer (the largest
/// per-connection allocation) kept per migration would pass it within 8
/// migrations; a full run (90 checked) catches a leak of ~23 KiB per
/// migration. Allocator noise on these processes stays well below it.
pub const RSS_GROWTH_LIMIT_KIB: u64 = 2048;
/// Open descriptors may differ by this much between checked migrations
/// (a log pipe or an accept racing the reading of `/proc/PID/fd`).
pub const FD_SPREAD_LIMIT: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `miggate source` → `miggate target`, both long-lived.
    Gateways,
    /// `miggate migrate` per migration into one long-lived daemon.
    Daemon,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Gateways => "gateways",
            Via::Daemon => "daemon",
        }
    }
}

/// What `/proc` says about one miggate process after a migration.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

/// One migration of the soak.
#[derive(Debug, Clone)]
pub struct Row {
    pub n: usize,
    pub seconds: f64,
    /// One entry per long-lived miggate process, in `Soak::procs` order.
    pub usage: Vec<Usage>,
}

/// The result of a soak run.
#[derive(Debug, Clone)]
pub struct Report {
    pub via: Via,
    /// Names of the measured processes.
    pub procs: Vec<&'static str>,
    pub rows: Vec<Row>,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {field} for pid {pid}: is it still running?"))
}

pub fn usage(pid: u32) -> Usage {
    Usage {
        rss_kib: status_kib(pid, "VmRSS:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
            .count(),
    }
}

/// Every QEMU of the soak carries the same VM (same UUID) and two spare
/// QMP sockets: one for the daemon while it is a target, one for
/// `miggate migrate` when it is the source (a QMP socket serves one
/// client at a time).
fn qemu_opts(uuid: Uuid, dir: &Path, n: usize) -> QemuOpts {
    let mut o = QemuOpts::new(Guest::RunningCounter, RAM_MIB);
    o.uuid = Some(uuid);
    o.with_qmp(&target_qmp(dir, n))
        .with_qmp(&source_qmp(dir, n))
}

fn target_qmp(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("q{n}-t.qmp"))
}

fn source_qmp(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("q{n}-s.qmp"))
}

fn spawn_target(uuid: Uuid, dir: &Path, n: usize) -> JoinHandle<Qemu> {
    let opts = qemu_opts(uuid, dir, n).as_incoming();
    tokio::spawn(async move { Qemu::spawn(opts).await.unwrap() })
}

/// The long-lived miggate side of a soak.
#[allow(clippy::large_enum_variant)] // one per run, never moved around
enum Carrier {
    Gateways {
        target: Gateway,
        source: Gateway,
        /// Where the source QEMU migrates to (`unix:` socket of the source gateway).
        entry: String,
        /// Where the target gateway forwards (each target QEMU listens there in turn).
        incoming: String,
    },
    Daemon(Daemon),
}

impl Carrier {
    fn procs(&self) -> Vec<(&'static str, u32)> {
        match self {
            Carrier::Gateways { target, source, .. } => vec![
                ("source gw", source.pid().unwrap()),
                ("target gw", target.pid().unwrap()),
            ],
            Carrier::Daemon(d) => vec![("daemon", d.gw.pid().unwrap())],
        }
    }
}

/// The daemon forgets an ended registration after `retention` (default
/// 1 h: the API shows it until then). The soak's daemon forgets them
/// after [`RETENTION_SECS`], so that its RSS measures what stays behind
/// a migration, not the records it keeps on purpose
/// (`MIGGATE_SOAK_RETENTION=3600` measures those too).
pub const RETENTION_SECS: u64 = 2;

fn retention() -> u64 {
    match std::env::var("MIGGATE_SOAK_RETENTION") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("MIGGATE_SOAK_RETENTION={v:?}: expected seconds")),
        Err(_) => RETENTION_SECS,
    }
}

/// A daemon as `common::daemon::start` runs it (one loopback listener, an
/// API socket), with `retention` from [`retention`].
async fn daemon(dir: &Path, pki: &Path) -> Daemon {
    let api = dir.join("api.sock");
    let config = dir.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nruntime_dir = {:?}\nretention = {}\n\n[api]\nsocket = {:?}\n\n\
             [[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = {:?}\n",
            dir.join("run").display().to_string(),
            retention(),
            api.display().to_string(),
            pki.display().to_string()
        ),
    )
    .unwrap();
    let mut gw = miggate()
        .gateway(&["daemon", "--config", config.to_str().unwrap()])
        .await
        .unwrap();
    gw.wait_event(|v| v["message"] == "API listening", EVENT_TIMEOUT)
        .await
        .unwrap();
    Daemon {
        gw,
        api,
        config,
        metrics: None,
    }
}

/// Runs `count` back-to-back migrations of one running guest via `via`,
/// printing a line per migration; panics on the first failure.
pub async fn run(via: Via, count: usize) -> Report {
    assert!(count >= 1);
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir_t = tempfile::Builder::new()
        .prefix(&format!("miggate-soak-{}-", via.name()))
        .tempdir()
        .unwrap();
    let dir = dir_t.path().to_path_buf();
    let uuid = Uuid::new_v4();

    let mut path = match via {
        Via::Gateways => {
            let incoming = format!("unix:{}", dir.join("in.sock").display());
            let u = uuid.to_string();
            let target = miggate()
                .target(&[
                    "--x509-dir",
                    pki.to_str().unwrap(),
                    "--forward",
                    &incoming,
                    "--authz-identity",
                    SOURCE_DN,
                    "--expect-uuid",
                    &u,
                ])
                .await
                .unwrap();
            let entry = format!("unix:{}", dir.join("src.sock").display());
            let source = miggate()
                .gateway(&[
                    "source",
                    "--listen",
                    &entry,
                    "--connect",
                    &target.addr,
                    "--x509-dir",
                    pki.to_str().unwrap(),
                ])
                .await
                .unwrap();
            Carrier::Gateways {
                target,
                source,
                entry,
                incoming,
            }
        }
        Via::Daemon => Carrier::Daemon(daemon(&dir, &pki).await),
    };
    let procs = path.procs();
    if via == Via::Daemon {
        eprintln!("daemon retention of ended registrations: {} s", retention());
    }
    eprintln!(
        "soak via {}: {count} migrations of a running {RAM_MIB} MiB guest (VM {uuid}); \
         measured: {}",
        via.name(),
        procs
            .iter()
            .map(|(n, p)| format!("{n} pid {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("{}", header(&procs.iter().map(|p| p.0).collect::<Vec<_>>()));

    let mut src = Qemu::spawn(qemu_opts(uuid, &dir, 0)).await.unwrap();
    let mut next = spawn_target(uuid, &dir, 1);
    src.assert_running_and_counting().await;
    let mut src_n = 0;
    let mut rows = Vec::with_capacity(count);
    for n in 1..=count {
        let mut dst = next.await.unwrap();
        // The one after: started while this migration runs.
        next = spawn_target(uuid, &dir, n + 1);
        let before = src.guest_counter().await.unwrap();
        let seconds = match &mut path {
            Carrier::Gateways {
                target,
                source,
                entry,
                incoming,
            } => {
                migrate_via_gateways(&mut src, &mut dst, entry, incoming, source, target, uuid)
                    .await
            }
            Carrier::Daemon(d) => migrate_via_daemon(&dir, src_n, n, &pki, d).await,
        };
        // Arrived: running on the target, counting on from where the
        // source was when the migration started, the same VM.
        dst.assert_running_and_counting().await;
        let after = dst.guest_counter().await.unwrap();
        assert!(
            after.wrapping_sub(before) < 1 << 31,
            "migration {n}: the counter went back from {before:#x} to {after:#x}"
        );
        let got = dst.cmd("query-uuid", Value::Null).await.unwrap()["UUID"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(got, uuid.to_string(), "migration {n}");
        assert_eq!(src.query_status().await.unwrap(), "postmigrate");
        let row = Row {
            n,
            seconds,
            usage: procs.iter().map(|(_, pid)| usage(*pid)).collect(),
        };
        eprintln!("{}", line(&row));
        rows.push(row);
        // The old source is done; the target carries the VM on.
        src = dst;
        src_n = n;
    }
    drop(next);
    Report {
        via,
        procs: procs.iter().map(|p| p.0).collect(),
        rows,
    }
}

/// Migrates through the standalone pair: the target QEMU listens where the
/// target gateway forwards, the source QEMU sends to the source gateway.
/// Both gateways must book the connection `completed` for this VM.
async fn migrate_via_gateways(
    src: &mut Qemu,
    dst: &mut Qemu,
    entry: &str,
    incoming: &str,
    source: &mut Gateway,
    target: &mut Gateway,
    uuid: Uuid,
) -> f64 {
    dst.set_capabilities(&[("return-path", true)])
        .await
        .unwrap();
    // The previous target QEMU unlinked this path when it accepted its
    // migration; this one binds it afresh.
    dst.migrate_incoming(incoming).await.unwrap();
    src.forget_old_events().await.unwrap();
    src.set_capabilities(&[("return-path", true), ("validate-uuid", true)])
        .await
        .unwrap();
    src.set_unlimited_bandwidth().await.unwrap();
    src.migrate(entry).await.unwrap();
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    for (side, info, gw) in [("source", &s, &*source), ("target", &d, &*target)] {
        assert_eq!(
            info.status.as_deref(),
            Some("completed"),
            "{side} QEMU: {:?}\ngateway log:\n{}",
            info.error_desc,
            gw.log_text()
        );
    }
    for gw in [source, target] {
        let rec = gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "completed", "{rec}");
        if rec["role"] == "target" {
            assert_eq!(rec["vm"], uuid.to_string(), "{rec}");
        }
    }
    src.migration_duration().unwrap().as_secs_f64()
}

/// `miggate migrate --json` from QEMU `src_n` into QEMU `dst_n` through
/// the daemon: a registration and one-shot ticket per migration. The
/// command must end `ok`, the daemon book it completed, and its outcome
/// record say so.
async fn migrate_via_daemon(
    dir: &Path,
    src_n: usize,
    dst_n: usize,
    pki: &Path,
    d: &mut Daemon,
) -> f64 {
    let t0 = Instant::now();
    let out = tokio::time::timeout(
        MIGRATION_TIMEOUT,
        tokio::process::Command::new(BIN)
            .args(["migrate", "--json", "--source-qmp"])
            .arg(format!("unix:{}", source_qmp(dir, src_n).display()))
            .arg("--target-qmp")
            .arg(format!("unix:{}", target_qmp(dir, dst_n).display()))
            .args(["--target", &d.target(), "--x509-dir"])
            .arg(pki)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("miggate migrate did not finish")
    .unwrap();
    let seconds = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "result")
        .unwrap_or(Value::Null);
    assert!(
        out.status.success() && result["ok"] == true,
        "miggate migrate {dst_n} -> {}\nstdout:\n{stdout}\nstderr:\n{}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let id = result["migration_id"].as_str().unwrap();
    let rec = d.gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "completed", "{rec}");
    let view = d.client().unwrap().migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Completed, "{view:?}");
    assert_eq!(view.peer_dn.as_deref(), Some(SOURCE_DN), "{view:?}");
    seconds
}

fn header(procs: &[&str]) -> String {
    let mut h = format!("{:>5} {:>8}", "#", "seconds");
    for p in procs {
        let _ = write!(
            h,
            " {:>14} {:>12}",
            format!("{p} RSS KiB"),
            format!("{p} fds")
        );
    }
    h
}

fn line(r: &Row) -> String {
    let mut l = format!("{:>5} {:>8.3}", r.n, r.seconds);
    for u in &r.usage {
        let _ = write!(l, " {:>14} {:>12}", u.rss_kib, u.fds);
    }
    l
}

fn quantiles(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

impl Report {
    /// Asserts that every process's RSS grew by less than
    /// [`RSS_GROWTH_LIMIT_KIB`] and its descriptors stayed within
    /// [`FD_SPREAD_LIMIT`] from migration `from` (1-based) to the last;
    /// returns the summary it prints.
    pub fn assert_flat_from(&self, from: usize) -> String {
        assert!(
            self.rows.len() >= from,
            "{} migrations: fewer than {from}",
            self.rows.len()
        );
        let checked = &self.rows[from - 1..];
        let secs: Vec<f64> = self.rows.iter().map(|r| r.seconds).collect();
        let (lo, med, hi) = quantiles(&secs);
        let mut out = format!(
            "soak via {}: {} migrations, all completed; seconds min {lo:.3} median {med:.3} max {hi:.3}",
            self.via.name(),
            self.rows.len()
        );
        let mut bad = Vec::new();
        for (i, name) in self.procs.iter().enumerate() {
            let first = checked[0].usage[i];
            let last = checked[checked.len() - 1].usage[i];
            let max_rss = checked.iter().map(|r| r.usage[i].rss_kib).max().unwrap();
            let fds: Vec<usize> = checked.iter().map(|r| r.usage[i].fds).collect();
            let (fmin, fmax) = (*fds.iter().min().unwrap(), *fds.iter().max().unwrap());
            let _ = write!(
                out,
                "\n  {name}: RSS {} KiB at #{from}, {} KiB at #{} (max {max_rss}); fds {} at #{from}, {} at #{} (range {fmin}-{fmax})",
                first.rss_kib,
                last.rss_kib,
                self.rows.len(),
                first.fds,
                last.fds,
                self.rows.len()
            );
            if max_rss.saturating_sub(first.rss_kib) >= RSS_GROWTH_LIMIT_KIB {
                bad.push(format!(
                    "{name}: RSS grew {} KiB from migration {from} (limit {RSS_GROWTH_LIMIT_KIB})",
                    max_rss - first.rss_kib
                ));
            }
            if fmax - fmin > FD_SPREAD_LIMIT {
                bad.push(format!(
                    "{name}: descriptors ranged {fmin}-{fmax} from migration {from} (limit ±{FD_SPREAD_LIMIT})"
                ));
            }
        }
        let verdict = if bad.is_empty() {
            format!("\nverdict: PASS (flat from migration {from} on)")
        } else {
            format!("\nverdict: FAIL: {}", bad.join("; "))
        };
        out.push_str(&verdict);
        eprintln!("{out}");
        assert!(bad.is_empty(), "{out}");
        out
    }
}

/// `MIGGATE_SOAK_COUNT`, else `default`.
pub fn count_from_env(default: usize) -> usize {
    match std::env::var("MIGGATE_SOAK_COUNT") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| panic!("MIGGATE_SOAK_COUNT={v:?}: expected a positive number")),
        Err(_) => default,
    }
}
