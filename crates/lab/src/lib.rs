//! A migration lab: real QEMU processes with known guests and the real
//! `miggate` binary, for the integration tests, `miggate demo` and
//! `miggate bench`. Not part of the product: the `miggate` library does
//! not depend on it.
//!
//! - [`guest`]: what runs inside the VMs (seeded random RAM, cached as files;
//!   a boot sector that counts and dirties memory forever);
//! - [`qemu`]: a QEMU process driven over QMP (spawn, a VM pair, native TLS
//!   objects, migrate helpers, RAM hashing, the guest's counter);
//! - [`launch`]: `miggate` gateways and daemons with their JSON logs read
//!   as events, and `miggate pki`;
//! - [`fixtures`]: captured QEMU migration streams.
//!
//! Every failure is a [`LabError`] that says what went wrong and, when a
//! tool is missing, how to install it.

pub mod fixtures;
pub mod guest;
pub mod launch;
pub mod qemu;

use std::path::PathBuf;
use std::time::Duration;

use miggate::qmp::QmpError;

pub use guest::{default_cache_dir, random_ram_file};
pub use launch::{split_host_port, Daemon, DaemonOpts, Gateway, Miggate};
pub use qemu::{
    accel, file_sha256, kvm_available, qemu_binary, sha256_hex, zero_sha256, Accel, Guest,
    NativeTls, Qemu, QemuOpts, QemuVersion, TlsEndpoint, UNLIMITED_BANDWIDTH,
};

/// How to get QEMU on the Debian machines this project targets.
pub const INSTALL_QEMU: &str = "apt-get install --no-install-recommends qemu-system-x86";

/// `Debug` prints the message (QEMU's stderr included, unescaped), so
/// that a test's `.unwrap()` fails with what went wrong.
#[derive(thiserror::Error)]
pub enum LabError {
    #[error("qemu-system-x86_64 not found in PATH, /usr/bin or /usr/local/bin (or $QEMU_SYSTEM_X86_64): install it with 'sudo {INSTALL_QEMU}'")]
    QemuMissing,
    #[error("QEMU 10.0 not found ({}): run scripts/setup.sh, which unpacks Debian's bookworm-backports qemu-system-x86 10.0 there (or set $MIGGATE_QEMU10_DIR to where it is)", binary.display())]
    Qemu10Missing { binary: PathBuf },
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{var}={value:?}: expected tcg or kvm")]
    BadAccel { var: &'static str, value: String },
    #[error("QEMU exited ({status}) before QMP was up\nargs: {args:?}\nstderr:\n{stderr}")]
    EarlyExit {
        status: String,
        args: Vec<String>,
        stderr: String,
    },
    #[error("QMP at {} not up after {after:?}: {source}\nstderr:\n{stderr}", path.display())]
    QmpNotUp {
        path: PathBuf,
        after: Duration,
        #[source]
        source: Box<QmpError>,
        stderr: String,
    },
    #[error("{command}: {source}\nstderr:\n{stderr}")]
    Qmp {
        command: String,
        #[source]
        source: Box<QmpError>,
        stderr: String,
    },
    #[error("{what}\nstderr:\n{stderr}")]
    Unexpected { what: String, stderr: String },
    #[error("{what} did not happen within {after:?}\nstderr:\n{stderr}")]
    Timeout {
        what: String,
        after: Duration,
        stderr: String,
    },
}

impl std::fmt::Debug for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every variant's message already carries its source.
        write!(f, "{self}")
    }
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}
