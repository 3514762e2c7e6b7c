//! How QEMU's own TLS (GnuTLS, no ALPN `miggate/1`) ends a migration
//! channel, per version, and what a target gateway may demand of it.
//!
//! What QEMU does (its sources; and observed through the target gateway's
//! records, `crates/cli/tests/tls_termination.rs`):
//! - **main channel**: no version ends it with close_notify. The source
//!   closes it with `qemu_fclose()`, and `qio_channel_tls_close()`
//!   (io/channel-tls.c) closes the socket without `gnutls_bye()`; with
//!   `return-path` and multifd it even resets it (see `relay`). QEMU's
//!   own stream framing (`QEMU_VM_EOF`) is what detects a truncation there.
//! - **multifd channels**: before 10.0 the source shut the socket down
//!   without close_notify (7.2.22 here). From 10.0 it ends every
//!   multifd TLS session with `gnutls_bye()` before shutting the
//!   socket down: `migration_tls_channel_end()` → `qio_channel_tls_bye()`
//!   in `multifd_send_shutdown()` (migration/multifd.c), whatever the
//!   machine type.
//! - a 10.0 *destination* with native TLS then fails a multifd channel
//!   that ends without it (`GNUTLS_E_PREMATURE_TERMINATION`), unless the
//!   migration object's `multifd-clean-tls-termination` is false, which
//!   `hw_compat_9_2` sets for machine types up to 9.2: a destination cannot
//!   see the source's version either, so QEMU trusts the machine type.
//!
//! A target gateway terminates that TLS, so the target QEMU behind it
//! never sees a truncation; the gateway takes over QEMU's own check, with
//! the one signal it has of the source's version: the machine type in the
//! main channel's configuration section. A machine type versioned 10.0 or
//! later runs only on a QEMU 10.0 or later, which ends each multifd channel
//! with close_notify: then a multifd channel that ends without one is a cut
//! stream, as a native-TLS QEMU 10 destination would have judged it. Any
//! other machine type (older, unversioned, a downstream's), a main channel
//! without a configuration section, or several migrations at once on one
//! listener that do not all qualify: any EOF ends the channel, as before.
//! So a 7.2 source (or any source on an old machine type, 10.0 included,
//! exactly as a QEMU 10 destination on that machine type would accept it)
//! is never failed for what it always does, and every truncation the
//! source's version lets the gateway detect is detected. How each channel
//! actually ended is recorded either way ([`TlsEnd`](super::TlsEnd)).

use std::sync::{Arc, Mutex};

use super::{Close, EndRule};

/// The first QEMU release that ends its multifd TLS sessions with
/// close_notify, as a machine type version.
pub const CLEAN_MULTIFD_SINCE: (u16, u16) = (10, 0);

/// The `MAJOR.MINOR` a versioned machine type name ends with
/// (`pc-i440fx-10.0`, `pc-q35-7.2`, `virt-9.2`, `s390-ccw-virtio-10.0`);
/// `None` for an unversioned one (`microvm`, `isapc`) or a downstream's
/// naming (`pc-q35-rhel9.6.0`), whose numbers are not QEMU's.
pub fn machine_version(machine: &str) -> Option<(u16, u16)> {
    let (_, version) = machine.rsplit_once('-')?;
    let (major, minor) = version.split_once('.')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((number(major)?, number(minor)?))
}

/// Whether a source QEMU running `machine` ends its multifd TLS sessions
/// with close_notify; `Some(version)` of the machine type if so.
pub fn ends_multifd_cleanly(machine: Option<&str>) -> Option<(u16, u16)> {
    machine
        .and_then(machine_version)
        .filter(|v| *v >= CLEAN_MULTIFD_SINCE)
}

/// The native-TLS main channels a target listener is forwarding, and
/// what their machine types say of their sources.
#[derive(Debug, Default, Clone)]
pub struct NativeMains(Arc<Mutex<Mains>>);

#[derive(Debug, Default)]
struct Mains {
    /// Live main channels whose source ends multifd channels cleanly.
    clean: usize,
    /// Live main channels whose source may not.
    other: usize,
    /// The machine type version of the last clean one (for the reason).
    version: (u16, u16),
}

impl NativeMains {
    /// Counts a native-TLS main channel with `machine` while the guard
    /// lives (from before its multifd channels may connect).
    pub fn main_channel(&self, machine: Option<&str>) -> NativeMain {
        let clean = ends_multifd_cleanly(machine);
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match clean {
            Some(v) => {
                m.clean += 1;
                m.version = v;
            }
            None => m.other += 1,
        }
        NativeMain {
            mains: self.clone(),
            clean: clean.is_some(),
        }
    }

    /// How a native-TLS multifd channel admitted now must end: with
    /// close_notify only when every live native main channel's source
    /// ends multifd channels cleanly (and there is one).
    pub fn multifd_close(&self) -> Close {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let rule = if m.clean > 0 && m.other == 0 {
            EndRule::QemuMultifd {
                machine_version: m.version,
            }
        } else {
            EndRule::AnyEof
        };
        Close::Tls {
            peer: "source QEMU",
            rule,
        }
    }
}

/// A live native-TLS main channel (see [`NativeMains::main_channel`]).
pub struct NativeMain {
    mains: NativeMains,
    clean: bool,
}

impl Drop for NativeMain {
    fn drop(&mut self) {
        let mut m = self.mains.0.lock().unwrap_or_else(|p| p.into_inner());
        if self.clean {
            m.clean -= 1;
        } else {
            m.other -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_type_versions() {
        assert_eq!(machine_version("pc-i440fx-10.0"), Some((10, 0)));
        assert_eq!(machine_version("pc-q35-7.2"), Some((7, 2)));
        assert_eq!(machine_version("s390-ccw-virtio-10.1"), Some((10, 1)));
        assert_eq!(machine_version("pc-i440fx-2.12"), Some((2, 12)));
        for unversioned in ["microvm", "isapc", "pc-q35-rhel9.6.0", "pc-10.", "x-.1", ""] {
            assert_eq!(machine_version(unversioned), None, "{unversioned}");
        }
        assert!(ends_multifd_cleanly(Some("pc-i440fx-10.0")).is_some());
        assert!(ends_multifd_cleanly(Some("pc-q35-11.0")).is_some());
        assert!(ends_multifd_cleanly(Some("pc-i440fx-9.2")).is_none());
        assert!(ends_multifd_cleanly(Some("pc-i440fx-7.2")).is_none());
        assert!(ends_multifd_cleanly(None).is_none());
    }

    fn strict(c: Close) -> bool {
        matches!(
            c,
            Close::Tls {
                rule: EndRule::QemuMultifd { .. },
                ..
            }
        )
    }

    /// Strict only while every live native main channel qualifies: a 7.2
    /// migration beside a 10.0 one on the same listener is never failed.
    #[test]
    fn multifd_rule_follows_the_live_main_channels() {
        let mains = NativeMains::default();
        assert!(!strict(mains.multifd_close()), "no main channel");
        let new = mains.main_channel(Some("pc-i440fx-10.0"));
        assert!(strict(mains.multifd_close()));
        let old = mains.main_channel(Some("pc-i440fx-7.2"));
        assert!(!strict(mains.multifd_close()), "a 7.2 source beside it");
        drop(old);
        assert!(strict(mains.multifd_close()));
        drop(new);
        assert!(!strict(mains.multifd_close()));
        let _unknown = mains.main_channel(None);
        assert!(!strict(mains.multifd_close()));
    }
}
