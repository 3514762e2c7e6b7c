//! Migrations of one guest through each transport, in interleaved rounds.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use uuid::Uuid;

use super::flood::Hostiles;
use super::local::LocalKind;
use super::peers::{self, Installed, MiggateChecks, TLS_HOSTNAME};
use super::pin::{self, PinSpec};
use super::{sys, Transport, Workload};
use miggate::qmp::MigrationInfo;
use miggate_lab::{Accel, Guest, NativeTls, Qemu, QemuOpts, QemuVersion, TlsEndpoint};

/// Time allowed for one migration (1 GiB through the slowest transport on a
/// busy 2-core machine takes well under a minute).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// A running guest must show its counter moving within this (SeaBIOS under
/// a nested KVM takes ~5 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Seed of the paused guest's RAM (cached as a file across runs).
const RAM_SEED: u64 = 0xBE4C_0001;

/// What one migration cost.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub seconds: f64,
    /// Bytes QEMU sent (`ram.transferred`).
    pub bytes: u64,
    /// CPU seconds of the security layer's processes during the migration.
    pub layer_cpu: f64,
    /// CPU seconds of both QEMUs during the migration.
    pub qemu_cpu: f64,
    /// Hostile connections made during the migration (`miggate-flood`).
    pub hostile: usize,
    /// CPU seconds of this bench process during the migration: QMP
    /// polling, and the hostile clients of `miggate-flood`.
    pub bench_cpu: f64,
    /// CPU seconds of each host's processes: the source QEMU with the
    /// layer's source side, the target QEMU with its target side (QEMU's
    /// native TLS runs inside QEMU, so it is in there too).
    pub source_host_cpu: f64,
    pub target_host_cpu: f64,
    /// What QEMU reported at the switch-over.
    pub switch: SwitchOver,
}

/// What the source QEMU reports about a completed migration
/// (`query-migrate`): how long the guest was stopped, in all, and in how
/// many passes over its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchOver {
    /// `downtime`, ms: from the guest's stop on the source to the end of
    /// the migration (with `return-path`: the target's answer included).
    pub downtime_ms: u64,
    /// `total-time`, ms.
    pub total_ms: u64,
    /// `ram.dirty-sync-count`: passes over the dirty bitmap, the last
    /// one with the guest stopped.
    pub passes: u64,
}

impl SwitchOver {
    /// From the source's `query-migrate` once completed; an error names
    /// what is missing (QEMU fills `downtime` only once completed).
    pub fn from_info(info: &MigrationInfo) -> Result<SwitchOver> {
        if info.status.as_deref() != Some("completed") {
            bail!(
                "query-migrate says {:?}, not completed: no downtime yet",
                info.status
            );
        }
        let downtime_ms = info.downtime.context("query-migrate has no downtime")?;
        let total_ms = info.total_time.context("query-migrate has no total-time")?;
        if total_ms == 0 {
            bail!("query-migrate says completed with total-time 0: the times are not computed yet");
        }
        let passes = info
            .ram
            .as_ref()
            .context("query-migrate has no ram statistics")?
            .dirty_sync_count;
        Ok(SwitchOver {
            downtime_ms,
            total_ms,
            passes,
        })
    }
}

pub struct Setup<'a> {
    pub installed: &'a Installed,
    pub pki: &'a Path,
    pub client_dn: &'a str,
    pub workdir: &'a Path,
    pub ram_mib: u32,
    pub channels: u32,
    pub accel: Option<Accel>,
    /// Both sides' QEMU.
    pub qemu: QemuVersion,
    pub ram_cache: Option<&'a Path>,
    /// The local hops of the layered transports.
    pub local: LocalKind,
    /// Hostile connections per `miggate-flood` migration.
    pub flood: usize,
    /// `--pin`: each side on its own CPUs.
    pub pin: Option<&'a PinSpec>,
}

/// Migrates a fresh guest of `workload` through `t` once.
pub async fn migrate_once(t: Transport, workload: Workload, s: &Setup<'_>) -> Result<Sample> {
    let uuid = Uuid::new_v4();
    let guest = match workload {
        Workload::Paused => Guest::PausedRandomRam { seed: RAM_SEED },
        Workload::Running => Guest::RunningCounter,
    };
    let mut sopts = QemuOpts::new(guest, s.ram_mib);
    sopts.uuid = Some(uuid);
    sopts.accel = s.accel;
    sopts.qemu = s.qemu;
    sopts.ram_cache = s.ram_cache.map(Path::to_path_buf);
    let mut dopts = sopts.as_incoming();
    if t.native_tls() {
        sopts.tls = Some(NativeTls {
            dir: s.pki.to_path_buf(),
            endpoint: TlsEndpoint::Client,
            authz_identity: None,
            priority: None,
        });
        dopts.tls = Some(NativeTls {
            dir: s.pki.to_path_buf(),
            endpoint: TlsEndpoint::Server,
            authz_identity: Some(s.client_dn.to_owned()),
            priority: None,
        });
    }
    let (src, dst) = tokio::join!(Qemu::spawn(sopts), Qemu::spawn(dopts));
    let (mut src, mut dst) = (src?, dst?);

    // return-path: the source waits for the target's confirmation (what
    // miggate's README asks for); validate-uuid: the UUID is in the stream.
    let mut caps = vec![("return-path", true), ("validate-uuid", true)];
    if t.multifd() {
        caps.push(("multifd", true));
    }
    for q in [&mut src, &mut dst] {
        q.set_capabilities(&caps).await?;
        if t.multifd() {
            q.set_parameters(json!({ "multifd-channels": s.channels }))
                .await?;
        }
    }
    src.set_unlimited_bandwidth().await?;
    if t.native_tls() {
        src.set_native_tls_parameters(Some(TLS_HOSTNAME)).await?;
        dst.set_native_tls_parameters(None).await?;
    }
    let dir = tempfile::Builder::new()
        .prefix("peer-")
        .tempdir_in(s.workdir)
        .context("temp dir for the peers")?;
    // Without a layer, QEMU to QEMU is the network hop: TCP.
    let qemu_in = if t.layered() && s.local == LocalKind::Unix {
        let at = s.local.fresh(dir.path(), "qemu-incoming")?;
        dst.migrate_incoming(&at.uri()).await?;
        at
    } else {
        super::local::Local::Tcp(dst.migrate_incoming_any_port().await?)
    };
    let entry = s.local.fresh(dir.path(), "entry")?;
    let layer = match t {
        Transport::Plain
        | Transport::PlainMultifd
        | Transport::QemuTls
        | Transport::QemuTlsMultifd => None,
        Transport::Stunnel => {
            let bin = s
                .installed
                .stunnel
                .as_deref()
                .context("stunnel not installed")?;
            Some(peers::stunnel(bin, s.pki, dir.path(), entry, &qemu_in).await?)
        }
        Transport::Socat => {
            let bin = s
                .installed
                .socat
                .as_deref()
                .context("socat not installed")?;
            Some(peers::socat(bin, s.pki, dir.path(), entry, &qemu_in).await?)
        }
        Transport::Miggate | Transport::MiggateMultifd | Transport::MiggateFlood => {
            let checks = MiggateChecks {
                client_dn: s.client_dn,
                expect_uuid: Some(uuid),
            };
            Some(peers::miggate(&s.installed.miggate, s.pki, entry, &qemu_in, &checks).await?)
        }
    };
    let entry = layer
        .as_ref()
        .map_or_else(|| qemu_in.clone(), |l| l.entry.clone());
    if workload == Workload::Running {
        src.wait_running_and_counting(BOOT_TIMEOUT).await?;
    }

    let layer_pids = layer.as_ref().map(|l| l.pids()).unwrap_or_default();
    let qemu_pids: Vec<u32> = [src.pid(), dst.pid()].into_iter().flatten().collect();
    let source_side: Vec<u32> = [src.pid(), layer.as_ref().and_then(|l| l.source_pid())]
        .into_iter()
        .flatten()
        .collect();
    let target_side: Vec<u32> = [dst.pid(), layer.as_ref().and_then(|l| l.target_pid())]
        .into_iter()
        .flatten()
        .collect();
    if let Some(p) = s.pin {
        for (pids, cpus) in [(&source_side, &p.source), (&target_side, &p.target)] {
            for &pid in pids {
                pin::pin_process(pid, cpus)?;
            }
        }
    }
    let hostiles = match (t, &layer) {
        (Transport::MiggateFlood, Some(l)) => Some(Arc::new(Hostiles::prepare(
            s.pki,
            dir.path(),
            SocketAddr::from(([127, 0, 0, 1], l.target_port)),
            FLOOD_ADDRESSES,
        )?)),
        _ => None,
    };
    src.forget_old_events().await?;
    let me = [std::process::id()];
    let (layer0, qemu0, bench0) = (
        sys::cpu_total(&layer_pids),
        sys::cpu_total(&qemu_pids),
        sys::cpu_total(&me),
    );
    let (source0, target0) = (sys::cpu_total(&source_side), sys::cpu_total(&target_side));
    // The flood starts with the migration and ends with it: dropping the
    // task closes whatever hostile connections are still open.
    let flood = hostiles.as_ref().map(|h| {
        let h = h.clone();
        AbortOnDrop(tokio::spawn(h.flood(s.flood, s.flood / 2, FLOOD_IN_FLIGHT)))
    });
    src.migrate(&entry.uri()).await?;
    let s_info = src.wait_migration_end(MIGRATION_TIMEOUT).await?;
    let d_info = dst.wait_migration_end(MIGRATION_TIMEOUT).await?;
    let (layer1, qemu1, bench1) = (
        sys::cpu_total(&layer_pids),
        sys::cpu_total(&qemu_pids),
        sys::cpu_total(&me),
    );
    let (source1, target1) = (sys::cpu_total(&source_side), sys::cpu_total(&target_side));
    drop(flood);
    let hostile = hostiles.map_or(0, |h| h.connected());
    let logs = || layer.as_ref().map(|l| l.logs()).unwrap_or_default();
    for (side, info) in [("source", &s_info), ("destination", &d_info)] {
        if info.status.as_deref() != Some("completed") {
            bail!(
                "{t} migration: {side} ended {:?}: {}\n{}",
                info.status,
                info.error_desc.as_deref().unwrap_or("-"),
                logs()
            );
        }
    }
    let seconds = src
        .migration_duration()
        .context("no migration duration")?
        .as_secs_f64();
    let bytes = s_info.ram.as_ref().map_or(0, |r| r.transferred);
    // The threads created during the migration inherited the pinning.
    if let Some(p) = s.pin {
        for (pids, cpus) in [(&source_side, &p.source), (&target_side, &p.target)] {
            if let Some(pid) = pids.iter().find(|&&pid| !pin::is_pinned(pid, cpus)) {
                bail!("{t}: process {pid} ran outside CPU {cpus} during the migration");
            }
        }
    }
    let switch = switch_over(&mut src, s_info)
        .await
        .with_context(|| format!("{t}: the source's report of the switch-over"))?;
    Ok(Sample {
        seconds,
        bytes,
        layer_cpu: layer1 - layer0,
        qemu_cpu: qemu1 - qemu0,
        hostile,
        bench_cpu: bench1 - bench0,
        source_host_cpu: source1 - source0,
        target_host_cpu: target1 - target0,
        switch,
    })
}

/// How long the source may take to fill in its times after saying
/// `completed`, and how often to ask.
const SWITCH_FIGURES_TIMEOUT: Duration = Duration::from_secs(5);
const SWITCH_FIGURES_POLL: Duration = Duration::from_millis(5);

/// The switch-over's figures from the source. QEMU sets the status to
/// `completed` (and sends the MIGRATION event) before it computes
/// `downtime` and `total-time`: read in between, both are 0. So asks again
/// until they are there.
async fn switch_over(src: &mut Qemu, mut info: MigrationInfo) -> Result<SwitchOver> {
    let deadline = tokio::time::Instant::now() + SWITCH_FIGURES_TIMEOUT;
    loop {
        match SwitchOver::from_info(&info) {
            Ok(sw) => return Ok(sw),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context(format!("after {SWITCH_FIGURES_TIMEOUT:?}: {}", info.raw)))
            }
            Err(_) => {}
        }
        tokio::time::sleep(SWITCH_FIGURES_POLL).await;
        info = src.query_migrate().await?;
    }
}

/// Source addresses of the flood: 8 x the default per-address limit (64)
/// of pending connections stays within the global one (512).
const FLOOD_ADDRESSES: u8 = 8;
/// Hostile connections in flight after the flood's first burst.
const FLOOD_IN_FLIGHT: usize = 16;

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `query-migrate` of QEMU 7.2.22's source after a running guest's
    /// migration through miggate (256 MiB, `miggate bench --downtime`).
    const COMPLETED: &str = r#"{"downtime":27,"ram":{"dirty-pages-rate":0,"dirty-sync-count":3,
        "dirty-sync-missed-zero-copy":0,"downtime-bytes":595085,"duplicate":65413,
        "mbps":136.34487591240875,"multifd-bytes":0,"normal":398,"normal-bytes":1630208,
        "page-size":4096,"pages-per-second":1290,"postcopy-bytes":0,"postcopy-requests":0,
        "precopy-bytes":1627127,"remaining":0,"skipped":0,"total":268967936,"transferred":2222212},
        "setup-time":18,"status":"completed","total-time":155}"#;
    /// The same QEMU asked right after its MIGRATION event said completed:
    /// the times are not computed yet.
    const COMPLETED_TOO_EARLY: &str = r#"{"downtime":0,"ram":{"dirty-pages-rate":0,"dirty-sync-count":2,
        "dirty-sync-missed-zero-copy":0,"downtime-bytes":595085,"duplicate":65534,"mbps":0,
        "multifd-bytes":0,"normal":277,"normal-bytes":1134592,"page-size":4096,
        "pages-per-second":0,"postcopy-bytes":0,"postcopy-requests":0,"precopy-bytes":1131624,
        "remaining":0,"skipped":0,"total":268967936,"transferred":1726709},"setup-time":1,
        "status":"completed","total-time":0}"#;

    fn info(json: &str) -> MigrationInfo {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn switch_over_of_a_completed_migration() {
        assert_eq!(
            SwitchOver::from_info(&info(COMPLETED)).unwrap(),
            SwitchOver {
                downtime_ms: 27,
                total_ms: 155,
                passes: 3
            }
        );
    }

    #[test]
    fn no_switch_over_before_completion_or_without_figures() {
        let active = COMPLETED
            .replace("\"completed\"", "\"active\"")
            .replace("\"downtime\":27,", "\"expected-downtime\":300,");
        let e = SwitchOver::from_info(&info(&active)).unwrap_err();
        assert!(e.to_string().contains("not completed"), "{e}");
        let e = SwitchOver::from_info(&info(COMPLETED_TOO_EARLY)).unwrap_err();
        assert!(e.to_string().contains("not computed yet"), "{e}");
        let no_downtime = COMPLETED.replace("\"downtime\":27,", "");
        let e = SwitchOver::from_info(&info(&no_downtime)).unwrap_err();
        assert!(e.to_string().contains("no downtime"), "{e}");
        let e = SwitchOver::from_info(&info(
            r#"{"status": "completed", "downtime": 5, "total-time": 9}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("no ram"), "{e}");
    }
}
