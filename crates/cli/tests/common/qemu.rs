//! The tests' QEMU is the lab's [`miggate_lab::Qemu`]. Its errors carry
//! QEMU's stderr and print it as their `Debug`, so tests `.unwrap()` them:
//! a harness should fail loudly and say why.
#![allow(dead_code, unused_imports)] // each integration test binary uses a different subset

use std::time::Duration;

pub use miggate_lab::qemu::{TLS_AUTHZ_ID, TLS_CREDS_ID};
pub use miggate_lab::{
    accel, file_sha256, kvm_available, qemu_binary, sha256_hex, zero_sha256, Guest, NativeTls,
    Qemu, QemuOpts, QemuVersion, TlsEndpoint,
};

/// Time a running guest gets to show its counter moving. Generous: SeaBIOS
/// takes ~6 s to reach the boot sector under the (nested, slow-exit) KVM of
/// the CI machine.
const COUNTING_TIMEOUT: Duration = Duration::from_secs(60);

/// The one assertion the tests add to the lab's QEMU.
pub trait QemuExt {
    /// The VM is `running` and its counter moves forward.
    #[allow(async_fn_in_trait)] // used by the tests only, never across threads
    async fn assert_running_and_counting(&mut self);
}

impl QemuExt for Qemu {
    async fn assert_running_and_counting(&mut self) {
        self.wait_running_and_counting(COUNTING_TIMEOUT)
            .await
            .unwrap()
    }
}
