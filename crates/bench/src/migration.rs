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
use super::{sys, Transport, Workload};
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
    Ok(Sample {
        seconds,
        bytes,
        layer_cpu: layer1 - layer0,
        qemu_cpu: qemu1 - qemu0,
        hostile,
        bench_cpu: bench1 - bench0,
    })
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
