//! Real QEMU processes for integration tests: `miggate_lab::Qemu` with a
//! panicking API. A test harness should fail loudly and say why; every
//! `LabError` carries QEMU's stderr. For the `Result` form of any command,
//! use the lab methods (`Deref`) or the public `qmp` field directly.
#![allow(dead_code, unused_imports)] // each integration test binary uses a different subset

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use miggate::qmp::MigrationInfo;
use miggate_lab as lab;
use serde_json::Value;

pub use miggate_lab::qemu::{TLS_AUTHZ_ID, TLS_CREDS_ID};
pub use miggate_lab::{
    kvm_available, sha256_hex, Guest, NativeTls, QemuOpts, TlsEndpoint, UNLIMITED_BANDWIDTH,
};

/// Time a running guest gets to show its counter moving. Generous: SeaBIOS
/// takes ~6 s to reach the boot sector under the (nested, slow-exit) KVM of
/// the CI machine.
const COUNTING_TIMEOUT: Duration = Duration::from_secs(60);

fn ok<T>(r: Result<T, lab::LabError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Path of qemu-system-x86_64. Panics when it is missing: the tests must
/// fail, not skip, on a machine that cannot run them.
pub fn qemu_binary() -> PathBuf {
    ok(lab::qemu_binary())
}

/// The accelerator every test VM uses (see `miggate_lab::accel`).
pub fn accel() -> &'static str {
    ok(lab::accel()).as_str()
}

/// A running QEMU process; killed on drop.
pub struct Qemu(lab::Qemu);

impl Deref for Qemu {
    type Target = lab::Qemu;
    fn deref(&self) -> &lab::Qemu {
        &self.0
    }
}

impl DerefMut for Qemu {
    fn deref_mut(&mut self) -> &mut lab::Qemu {
        &mut self.0
    }
}

impl Qemu {
    pub async fn spawn(opts: QemuOpts) -> Qemu {
        Qemu(ok(lab::Qemu::spawn(opts).await))
    }

    pub async fn cmd(&mut self, command: &str, arguments: Value) -> Value {
        ok(self.0.cmd(command, arguments).await)
    }

    pub async fn set_capabilities(&mut self, caps: &[(&str, bool)]) {
        ok(self.0.set_capabilities(caps).await)
    }

    pub async fn set_parameters(&mut self, params: Value) {
        ok(self.0.set_parameters(params).await)
    }

    pub async fn set_native_tls_parameters(&mut self, hostname: Option<&str>) {
        ok(self.0.set_native_tls_parameters(hostname).await)
    }

    pub async fn migrate_incoming(&mut self, uri: &str) {
        ok(self.0.migrate_incoming(uri).await)
    }

    pub async fn migrate_incoming_any_port(&mut self) -> u16 {
        ok(self.0.migrate_incoming_any_port().await)
    }

    pub async fn migrate(&mut self, uri: &str) {
        ok(self.0.migrate(uri).await)
    }

    pub async fn query_migrate(&mut self) -> MigrationInfo {
        ok(self.0.query_migrate().await)
    }

    pub async fn query_status(&mut self) -> String {
        ok(self.0.query_status().await)
    }

    pub async fn wait_migration_end(&mut self, timeout: Duration) -> MigrationInfo {
        ok(self.0.wait_migration_end(timeout).await)
    }

    pub async fn wait_status(&mut self, status: &str, timeout: Duration) {
        ok(self.0.wait_status(status, timeout).await)
    }

    pub async fn ram_dump_file(&mut self) -> PathBuf {
        ok(self.0.ram_dump_file().await)
    }

    pub async fn ram_dump(&mut self) -> Vec<u8> {
        ok(self.0.ram_dump().await)
    }

    pub async fn ram_sha256(&mut self) -> String {
        ok(self.0.ram_sha256().await)
    }

    pub async fn guest_counter(&mut self) -> u32 {
        ok(self.0.guest_counter().await)
    }

    /// The VM is `running` and its counter moves forward.
    pub async fn assert_running_and_counting(&mut self) {
        ok(self.0.wait_running_and_counting(COUNTING_TIMEOUT).await)
    }
}

/// SHA-256 (hex) of a file.
pub async fn file_sha256(path: &Path) -> String {
    ok(lab::file_sha256(path).await)
}

/// SHA-256 (hex) of `len` zero bytes: what an untouched guest's RAM hashes to.
pub async fn zero_sha256(len: u64) -> String {
    lab::zero_sha256(len)
}

/// A QEMU with a second QMP socket for `miggate migrate` or the daemon
/// (a QMP socket serves one client; the harness keeps the first).
pub async fn qemu_with_qmp(mut opts: QemuOpts, qmp: &Path) -> Qemu {
    opts.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    Qemu::spawn(opts).await
}
