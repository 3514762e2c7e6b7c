//! Building blocks of the migration scenarios: a PKI, a target QEMU behind
//! a target gateway, a source gateway in front of it.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::gateway::{miggate, pki_init, Gateway};
use super::qemu::{Qemu, QemuExt, QemuOpts, QemuVersion};

/// Time allowed for one small-guest migration, generous for TCG on a busy
/// 2-core machine.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Client DN of the default test PKI.
pub const SOURCE_DN: &str = "O=miggate tests,CN=source.test";

/// A fresh PKI in QEMU's layout: server cert for localhost/127.0.0.1,
/// client cert with [`SOURCE_DN`].
pub fn pki() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("miggate-pki-")
        .tempdir()
        .unwrap();
    let pki = dir.path().join("pki");
    pki_init(&pki, &["--client-dn", SOURCE_DN]);
    dir
}

pub fn pki_dir(t: &TempDir) -> std::path::PathBuf {
    t.path().join("pki")
}

/// Starts a target gateway forwarding to `127.0.0.1:qemu_port`.
pub async fn target_gateway(pki: &Path, qemu_port: u16, extra: &[&str]) -> Gateway {
    let forward = format!("tcp:127.0.0.1:{qemu_port}");
    let mut args = vec!["--x509-dir", pki.to_str().unwrap(), "--forward", &forward];
    args.extend_from_slice(extra);
    miggate().target(&args).await.unwrap()
}

/// A target gateway that checks the peer's DN ([`SOURCE_DN`]) and the VM's
/// UUID in the stream.
pub async fn checking_target_gateway(pki: &Path, qemu_port: u16, uuid: uuid::Uuid) -> Gateway {
    let uuid = uuid.to_string();
    let args = ["--authz-identity", SOURCE_DN, "--expect-uuid", &uuid];
    target_gateway(pki, qemu_port, &args).await
}

/// Starts a source gateway connecting to `target_addr`.
pub async fn source_gateway(pki: &Path, target_addr: &str, extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--x509-dir",
        pki.to_str().unwrap(),
        "--connect",
        target_addr,
    ];
    args.extend_from_slice(extra);
    miggate().source(&args).await.unwrap()
}

/// Which QEMU runs each side of a scenario. A test that needs QEMU 10.0
/// where `scripts/setup.sh` has not installed it fails with that hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// Both sides on the system's QEMU (7.2 on Debian 12).
    Q72,
    /// Both sides on QEMU 10.0.
    Q10,
    /// A 7.2 source into a 10.0 target, machine type `pc-i440fx-7.2` on
    /// both (the newest 7.2 knows, and what an upgrade keeps).
    Q72ToQ10,
}

impl Versions {
    /// Sets the QEMU (and the machine type, across versions) of a source
    /// and a target configuration.
    pub fn apply(self, src: &mut QemuOpts, dst: &mut QemuOpts) {
        let (s, d) = match self {
            Versions::Q72 => (QemuVersion::System, QemuVersion::System),
            Versions::Q10 => (QemuVersion::V10_0, QemuVersion::V10_0),
            Versions::Q72ToQ10 => (QemuVersion::System, QemuVersion::V10_0),
        };
        src.qemu = s;
        dst.qemu = d;
        if self == Versions::Q72ToQ10 {
            src.machine = Some("pc-i440fx-7.2".into());
            dst.machine = Some("pc-i440fx-7.2".into());
        }
    }
}

/// Source and destination QEMUs for `opts` on the system's QEMU; the
/// destination listens on a port of its choosing, which is returned.
pub async fn qemu_pair(opts: &QemuOpts) -> (Qemu, Qemu, u16) {
    qemu_pair_with(opts, Versions::Q72, &[], None).await
}

/// [`qemu_pair`] on `versions`, with `caps` on both QEMUs and, if given,
/// `multifd-channels` on both, all set on the destination before its
/// `migrate-incoming`: QEMU 10 refuses multifd afterwards ("Multifd must
/// be set before incoming starts"), 7.2 takes either order.
pub async fn qemu_pair_with(
    opts: &QemuOpts,
    versions: Versions,
    caps: &[(&str, bool)],
    multifd_channels: Option<u8>,
) -> (Qemu, Qemu, u16) {
    let (mut src_opts, mut dst_opts) = (opts.clone(), opts.as_incoming());
    versions.apply(&mut src_opts, &mut dst_opts);
    let (mut src, mut dst) = Qemu::pair(src_opts, dst_opts).await.unwrap();
    src.set_unlimited_bandwidth().await.unwrap();
    if !caps.is_empty() {
        capabilities(&mut src, &mut dst, caps).await;
    }
    if let Some(n) = multifd_channels {
        for q in [&mut src, &mut dst] {
            q.set_parameters(serde_json::json!({ "multifd-channels": n }))
                .await
                .unwrap();
        }
    }
    let port = dst.migrate_incoming_any_port().await.unwrap();
    (src, dst, port)
}

/// Enables the same migration capabilities on both QEMUs.
pub async fn capabilities(src: &mut Qemu, dst: &mut Qemu, caps: &[(&str, bool)]) {
    src.set_capabilities(caps).await.unwrap();
    dst.set_capabilities(caps).await.unwrap();
}

/// Migrates `src` to `uri` and waits for both ends; returns the source's
/// final query-migrate (raw JSON), asserting that both completed.
pub async fn migrate_and_expect_completed(src: &mut Qemu, dst: &mut Qemu, uri: &str) -> Value {
    forget_old_events(src).await;
    src.migrate(uri).await.unwrap();
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(
        s.status.as_deref(),
        Some("completed"),
        "source migration: {:?}\nsource stderr:\n{}\ndestination stderr:\n{}",
        s.error_desc,
        src.stderr_text(),
        dst.stderr_text()
    );
    assert_eq!(
        d.status.as_deref(),
        Some("completed"),
        "destination migration: {:?}\nstderr:\n{}",
        d.error_desc,
        dst.stderr_text()
    );
    s.raw
}

/// Migrates `src` to `uri` and expects the source to report `failed`; a
/// running source VM must still be running (and counting) afterwards.
/// Returns QEMU's error description.
pub async fn migrate_and_expect_failure(src: &mut Qemu, uri: &str) -> String {
    let was_running = src.query_status().await.unwrap() == "running";
    forget_old_events(src).await;
    src.migrate(uri).await.unwrap();
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(
        s.status.as_deref(),
        Some("failed"),
        "expected the migration to fail: {:?}",
        s.raw
    );
    if was_running {
        src.assert_running_and_counting().await;
    }
    s.error_desc.unwrap_or_default()
}

/// Drops MIGRATION events of an earlier migration, so that waiting for the
/// end of the next one cannot return an old "failed". A command round trip
/// first: QMP delivers every event emitted before a response ahead of it.
async fn forget_old_events(q: &mut Qemu) {
    let _ = q.query_status().await.unwrap();
    q.qmp.take_queued_events();
}

/// The outcome records the gateway logged for `n` connections.
pub async fn outcomes(gw: &mut Gateway, n: usize) -> Vec<Value> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(gw.wait_outcome(EVENT_TIMEOUT).await.unwrap());
    }
    v
}
