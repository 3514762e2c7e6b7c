//! QEMU's own TLS on one side of a migration: a source QEMU with native
//! TLS (for a target gateway), or a target QEMU with native TLS (behind a
//! source gateway). Both guests are paused with random RAM, so the RAM
//! hash on arrival proves the migration intact.

use std::path::Path;

use serde_json::json;

use super::qemu::{Guest, NativeTls, Qemu, QemuOpts, TlsEndpoint};
use super::scenario::{capabilities, Versions};

/// What differs between the native-TLS scenarios.
#[derive(Debug, Clone, Copy)]
pub struct NativeOpts<'a> {
    pub versions: Versions,
    /// `multifd-channels`, with the `multifd` capability, if given.
    pub multifd: Option<u8>,
    pub return_path: bool,
    /// A machine type for both sides instead of [`Versions`]' choice.
    pub machine: Option<&'a str>,
    /// More capabilities on both QEMUs (e.g. `postcopy-ram`), set before
    /// the target's `migrate-incoming` like the others.
    pub caps: &'a [(&'a str, bool)],
    /// `-uuid` of both VMs.
    pub uuid: Option<uuid::Uuid>,
}

impl NativeOpts<'_> {
    pub fn new(versions: Versions) -> Self {
        NativeOpts {
            versions,
            multifd: None,
            return_path: false,
            machine: None,
            caps: &[],
            uuid: None,
        }
    }

    fn apply(&self, src: &mut QemuOpts, dst: &mut QemuOpts) {
        self.versions.apply(src, dst);
        if let Some(m) = self.machine {
            src.machine = Some(m.to_string());
            dst.machine = Some(m.to_string());
        }
        src.uuid = self.uuid;
        dst.uuid = self.uuid;
    }
}

/// `return-path`, [`NativeOpts::caps`] and `multifd` (with its channel
/// count) on both QEMUs,
/// before the target's `migrate-incoming` (QEMU 10 refuses multifd after).
async fn migration_options(src: &mut Qemu, dst: &mut Qemu, o: &NativeOpts<'_>) {
    capabilities(src, dst, &[("return-path", o.return_path)]).await;
    if !o.caps.is_empty() {
        capabilities(src, dst, o.caps).await;
    }
    if let Some(n) = o.multifd {
        capabilities(src, dst, &[("multifd", true)]).await;
        for q in [src, dst] {
            q.set_parameters(json!({ "multifd-channels": n }))
                .await
                .unwrap();
        }
    }
}

/// A source QEMU with native TLS (client certificate of `pki`, server name
/// 127.0.0.1) and a plain target QEMU listening on the returned port, for
/// a target gateway to forward to.
pub async fn native_tls_source(pki: &Path, o: NativeOpts<'_>) -> (Qemu, Qemu, u16) {
    let mut src_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 41 }, 128);
    src_opts.tls = Some(NativeTls {
        dir: pki.to_path_buf(),
        endpoint: TlsEndpoint::Client,
        authz_identity: None,
        priority: None,
    });
    let mut dst_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 41 }, 128).as_incoming();
    o.apply(&mut src_opts, &mut dst_opts);
    let (mut src, mut dst) = Qemu::pair(src_opts, dst_opts).await.unwrap();
    src.set_unlimited_bandwidth().await.unwrap();
    src.set_native_tls_parameters(Some("127.0.0.1"))
        .await
        .unwrap();
    migration_options(&mut src, &mut dst, &o).await;
    let port = dst.migrate_incoming_any_port().await.unwrap();
    (src, dst, port)
}

/// A plain source QEMU and a target QEMU with native TLS that allows
/// `allowed_dn` (and the GnuTLS `priority`, if any); returns the target's
/// TLS port, for a source gateway to connect to.
pub async fn native_tls_target(
    pki: &Path,
    allowed_dn: &str,
    priority: Option<&str>,
    o: NativeOpts<'_>,
) -> (Qemu, Qemu, u16) {
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 42 }, 128);
    let mut dst_opts = opts.as_incoming();
    o.apply(&mut opts, &mut dst_opts);
    dst_opts.tls = Some(NativeTls {
        dir: pki.to_path_buf(),
        endpoint: TlsEndpoint::Server,
        authz_identity: Some(allowed_dn.to_string()),
        priority: priority.map(str::to_owned),
    });
    let (mut src, mut dst) = Qemu::pair(opts, dst_opts).await.unwrap();
    migration_options(&mut src, &mut dst, &o).await;
    src.set_unlimited_bandwidth().await.unwrap();
    dst.set_native_tls_parameters(None).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    (src, dst, port)
}

/// The 64-byte multifd init packet a source QEMU without `-uuid` sends
/// first on multifd channel `channel` (src/wire/qemu.rs has the layout).
pub fn multifd_init_packet(channel: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(&[0; 16]);
    p.push(channel);
    p.resize(64, 0);
    p
}
