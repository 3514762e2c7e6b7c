//! Authorization of the peer's DN: authz-simple, authz-list, authz-list-file.
//!
//! Each mirrors the QEMU object of the same name (authz/*.c) so that an
//! identity or ACL file written for QEMU's `tls-authz` decides the same way
//! here. The identity is the peer certificate's subject DN string as GnuTLS
//! prints it (see `creds::dn`).

mod file;
mod glob;
mod list;
pub(crate) mod qjson;
mod simple;

use std::path::PathBuf;
use std::sync::Arc;

pub use file::{watch_file, ListFile, ReloadState};
pub use glob::glob_match;
pub use list::{AclError, Format, List, Policy, Rule};
pub use simple::Simple;

/// The result of an authorization check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The reason is a full sentence for the operator, e.g.
    /// `peer CN=x,O=y not allowed by ACL /etc/miggate/acl.json`.
    Deny {
        reason: String,
    },
}

/// An access check on a peer identity (the subject DN string).
pub trait Authz: Send + Sync {
    fn check(&self, identity: &str) -> Decision;

    /// The reloads of an authz that reloads by itself (an ACL file with
    /// refresh), so that live connections can be re-checked after each.
    fn reloads(&self) -> Option<tokio::sync::watch::Receiver<ReloadState>> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("cannot read ACL file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ACL file {} is invalid", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: AclError,
    },
    #[error("cannot watch directory {} for changes to the ACL file", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("ACL file path {} does not name a file", path.display())]
    NoFileName { path: PathBuf },
    #[error("conflicting authorization options: {0}")]
    Options(String),
}

/// The identity as shown in deny reasons: it comes from the peer's
/// certificate, so control characters are escaped to keep one reason on one
/// log line.
pub(crate) fn shown(identity: &str) -> std::borrow::Cow<'_, str> {
    if identity.chars().any(char::is_control) {
        identity
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        identity.into()
    }
}

/// Allows every peer whose certificate chain verified against the CA.
///
/// QEMU does this when `tls-authz` is unset; here it must be asked for
/// (`--allow-any-verified-peer`), so that forgetting the ACL denies instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyVerified;

impl Authz for AnyVerified {
    fn check(&self, _identity: &str) -> Decision {
        Decision::Allow
    }
}

/// Denies every peer: what a missing authz does (QEMU's tls-authz naming no
/// object "will default to denying access", seed 000).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAll;

impl Authz for DenyAll {
    fn check(&self, identity: &str) -> Decision {
        Decision::Deny {
            reason: format!(
                "peer {} denied: no authorization is configured (give \
                 --authz-identity, --authz-list-file or --allow-any-verified-peer)",
                shown(identity)
            ),
        }
    }
}

/// The authorization chosen on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzConfig {
    /// `--authz-identity DN`: authz-simple.
    Identity(String),
    /// `--authz-list-file FILE [--no-refresh]`: authz-list-file.
    ListFile { path: PathBuf, refresh: bool },
    /// `--allow-any-verified-peer`.
    AnyVerifiedPeer,
    /// Nothing chosen: deny every peer.
    DenyAll,
}

impl AuthzConfig {
    /// Validates the combination of the CLI flags; at most one choice.
    pub fn from_cli(
        identity: Option<String>,
        list_file: Option<PathBuf>,
        no_refresh: bool,
        allow_any_verified_peer: bool,
    ) -> Result<Self, AuthzError> {
        if no_refresh && list_file.is_none() {
            return Err(AuthzError::Options(
                "--no-refresh only applies to --authz-list-file".into(),
            ));
        }
        let chosen = [
            identity.is_some(),
            list_file.is_some(),
            allow_any_verified_peer,
        ];
        if chosen.iter().filter(|&&c| c).count() > 1 {
            return Err(AuthzError::Options(
                "give only one of --authz-identity, --authz-list-file and \
                 --allow-any-verified-peer"
                    .into(),
            ));
        }
        Ok(match (identity, list_file) {
            (Some(dn), _) => AuthzConfig::Identity(dn),
            (_, Some(path)) => AuthzConfig::ListFile {
                path,
                refresh: !no_refresh,
            },
            _ if allow_any_verified_peer => AuthzConfig::AnyVerifiedPeer,
            _ => AuthzConfig::DenyAll,
        })
    }

    /// Builds the authz. An ACL file that cannot be loaded now is an error.
    pub fn build(&self) -> Result<Arc<dyn Authz>, AuthzError> {
        Ok(match self {
            AuthzConfig::Identity(dn) => Arc::new(Simple::new(dn.clone())),
            AuthzConfig::ListFile { path, refresh } => ListFile::open(path, *refresh)?,
            AuthzConfig::AnyVerifiedPeer => Arc::new(AnyVerified),
            AuthzConfig::DenyAll => {
                tracing::warn!("no authorization configured: every peer will be denied");
                Arc::new(DenyAll)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_choices() {
        let dn = "CN=a".to_string();
        let p = PathBuf::from("/etc/miggate/acl.json");
        assert_eq!(
            AuthzConfig::from_cli(Some(dn.clone()), None, false, false).unwrap(),
            AuthzConfig::Identity(dn.clone())
        );
        assert_eq!(
            AuthzConfig::from_cli(None, Some(p.clone()), true, false).unwrap(),
            AuthzConfig::ListFile {
                path: p.clone(),
                refresh: false
            }
        );
        assert_eq!(
            AuthzConfig::from_cli(None, None, false, true).unwrap(),
            AuthzConfig::AnyVerifiedPeer
        );
        assert_eq!(
            AuthzConfig::from_cli(None, None, false, false).unwrap(),
            AuthzConfig::DenyAll
        );
        assert!(AuthzConfig::from_cli(Some(dn.clone()), Some(p), false, false).is_err());
        assert!(AuthzConfig::from_cli(Some(dn), None, false, true).is_err());
        assert!(AuthzConfig::from_cli(None, None, true, false).is_err());
    }

    #[test]
    fn build_each() {
        let a = AuthzConfig::Identity("CN=a".into()).build().unwrap();
        assert_eq!(a.check("CN=a"), Decision::Allow);
        assert_ne!(a.check("CN=b"), Decision::Allow);
        let any = AuthzConfig::AnyVerifiedPeer.build().unwrap();
        assert_eq!(any.check("CN=whoever"), Decision::Allow);
        let none = AuthzConfig::DenyAll.build().unwrap();
        assert!(matches!(none.check("CN=a"), Decision::Deny { reason } if reason.contains("CN=a")));
        assert_eq!(shown("CN=a\nforged"), "CN=a\\nforged");
        assert_eq!(shown("CN=Müller"), "CN=Müller");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.json");
        std::fs::write(
            &path,
            r#"{"rules": [{"match": "CN=a", "policy": "allow"}]}"#,
        )
        .unwrap();
        let f = AuthzConfig::ListFile {
            path: path.clone(),
            refresh: false,
        }
        .build()
        .unwrap();
        assert_eq!(f.check("CN=a"), Decision::Allow);
        let missing = AuthzConfig::ListFile {
            path: dir.path().join("nope.json"),
            refresh: true,
        };
        assert!(matches!(missing.build(), Err(AuthzError::Read { .. })));
    }
}
