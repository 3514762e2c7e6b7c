//! Why `miggate migrate` stopped, typed until the edge: the one sentence
//! renders a [`Cause`] with [`crate::error::chain`].

use std::path::PathBuf;

use super::managed::ManagedError;
use super::native::NativeError;
use crate::creds::dn::DnError;
use crate::qmp::QmpError;

/// The cause of a migration that did not start or did not complete, as the
/// middle of the sentence (`migration failed: <cause>; the VM ...`).
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("source QEMU")]
    SourceQemu(#[source] QmpError),
    /// What the source QEMU lacks for the options given (its version).
    #[error("source {0}")]
    SourceCapability(crate::qmp::capabilities::CapabilityError),
    /// A second SIGINT/SIGTERM in postcopy, where cancelling is impossible.
    #[error("interrupted by {signal}: the source QEMU paused the migration (migrate-pause)")]
    PausedBySignal { signal: &'static str },
    /// `--recover` of a source QEMU that has no paused migration.
    #[error(
        "the source QEMU's migration is {status}, not postcopy-paused: there is nothing to recover"
    )]
    NotPaused { status: String },
    #[error("a migration of this VM is already in progress (QEMU status {status})")]
    InProgress { status: String },
    #[error(transparent)]
    ClientDn(#[from] ClientDnError),
    #[error("cannot read the source QEMU's credentials from its QMP socket")]
    SourceCred(#[source] std::io::Error),
    #[error(transparent)]
    Gateway(#[from] ManagedError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Storage(#[from] super::storage::StorageError),
}

/// Our identity could not be read from `--x509-dir`.
#[derive(Debug, thiserror::Error)]
pub enum ClientDnError {
    #[error("cannot read the client certificate {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}", path.display())]
    Dn {
        path: PathBuf,
        #[source]
        source: DnError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::chain;

    #[test]
    fn causes_read_as_before() {
        let e = Cause::SourceQemu(QmpError::Closed);
        assert_eq!(chain(&e), "source QEMU: QMP connection closed by QEMU");
        let io = std::io::Error::other("no peer");
        assert_eq!(
            chain(&Cause::SourceCred(io)),
            "cannot read the source QEMU's credentials from its QMP socket: no peer"
        );
    }
}
