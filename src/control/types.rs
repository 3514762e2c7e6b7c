//! What the control API exchanges (see `docs/api.yaml`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::admit::registry::{MigrationView, Phase};
use crate::admit::ticket::Ticket;
use crate::wire::frames::Secret;

/// Default lifetime of an unused registration.
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 300;

/// `POST /v1/incoming`: an expected incoming migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The VM that must arrive (checked in the QEMU stream of every channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uuid: Option<Uuid>,
    /// Who may send it.
    pub allow: Allow,
    /// Where it goes.
    pub forward: Forward,
    /// Channels the migration opens: 1 + the number of multifd channels.
    #[serde(default = "one")]
    pub channels: u32,
    /// Seconds until an unused ticket expires.
    #[serde(default = "default_expiry")]
    pub expires_in: u64,
    /// The daemon's listeners the migration may arrive on (each has its own
    /// CA), by index of `[[target]]` or by address as `listen` shows it.
    /// Default: the first listener only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listeners: Option<Vec<ListenerRef>>,
    /// Storage migration: the disks that arrive over NBD channels. With a
    /// QMP forward the daemon starts the target QEMU's NBD server (on a
    /// socket of its own) and exports these nodes, writable; with an
    /// endpoint forward, `nbd_forward` names the server already running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskRequest>,
    /// `unix:PATH` or `tcp:HOST:PORT` of the target QEMU's NBD server,
    /// for `disks` with an endpoint forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_forward: Option<String>,
}

/// One disk of a storage migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// The target QEMU's block node that receives the disk (QMP forward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The NBD export name the source's mirror asks for; default: `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
}

impl DiskRequest {
    /// The export name: `export`, else the node's name.
    pub fn export_name(&self) -> Option<&str> {
        self.export.as_deref().or(self.node.as_deref())
    }
}

/// A daemon listener: its index (0 = the first `[[target]]`) or its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListenerRef {
    Index(usize),
    Address(String),
}

fn one() -> u32 {
    1
}

fn default_expiry() -> u64 {
    DEFAULT_EXPIRES_IN_SECS
}

/// Who may send a registered migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Allow {
    /// Exactly this client certificate DN (QEMU authz-simple).
    Identity(String),
    /// A QEMU authz-list JSON file on the daemon's host.
    AclFile(PathBuf),
    /// Any peer whose certificate chains to the CA.
    AnyVerifiedPeer(bool),
}

/// Where a registered migration goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Forward {
    /// `tcp:HOST:PORT` or `unix:PATH` where the target QEMU already listens.
    Endpoint(String),
    /// A target QEMU's QMP socket: the daemon itself sets the migration
    /// capabilities and parameters and issues `migrate-incoming`.
    Qmp(QmpForward),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QmpForward {
    /// `unix:PATH` of the target QEMU's QMP socket.
    pub qmp: String,
    /// `migrate-set-capabilities` before `migrate-incoming`, e.g. {"multifd": true}.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
    /// `migrate-set-parameters` arguments, e.g. {"multifd-channels": 4}.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// `201` answer to `POST /v1/incoming`. The ticket is shown this once
/// (and never by `Debug`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingResponse {
    pub id: String,
    pub ticket: Ticket,
    pub expires_at: String,
    /// The migration listeners (HOST:PORT) this registration is bound to,
    /// for the source gateway: its ticket is refused on any other.
    pub listen: Vec<String>,
}

/// `200` answer to `POST /v1/migrations/{id}/recover`, shown this once
/// (and never by `Debug`): a fresh one-shot ticket that admits only the
/// source QEMU's resumed main channel (then its preempt channel) of this
/// migration, from the peer of its first main channel, and the binding
/// token that resumes the cut main channel. The daemon keeps hashes only,
/// so the token is a new one for the same binding (the old token no longer
/// resumes anything): the source gateway that holds it did not have to be
/// the one that was cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverResponse {
    pub id: String,
    pub ticket: Ticket,
    pub binding_token: Secret,
    /// The ticket is refused after this (RFC 3339); the migration is then
    /// paused again.
    pub expires_at: String,
    /// The listeners the registration is bound to, as in the registration.
    pub listen: Vec<String>,
}

/// Every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_forms() {
        let r: IncomingRequest = serde_json::from_str(
            r#"{"vm_uuid":"6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
                "allow":{"identity":"O=x,CN=y"},
                "forward":{"qmp":"unix:/run/q.sock","capabilities":{"multifd":true},
                           "parameters":{"multifd-channels":4}},
                "channels":5}"#,
        )
        .unwrap();
        assert_eq!(r.allow, Allow::Identity("O=x,CN=y".into()));
        assert_eq!(r.expires_in, DEFAULT_EXPIRES_IN_SECS);
        assert!(matches!(r.forward, Forward::Qmp(_)));
        let r: IncomingRequest = serde_json::from_str(
            r#"{"allow":{"any_verified_peer":true},"forward":"tcp:127.0.0.1:4444"}"#,
        )
        .unwrap();
        assert_eq!(r.channels, 1);
        assert_eq!(r.forward, Forward::Endpoint("tcp:127.0.0.1:4444".into()));
        assert_eq!(r.listeners, None);
        let r: IncomingRequest = serde_json::from_str(
            r#"{"allow":{"any_verified_peer":true},"forward":"tcp:a:1","listeners":[1,"127.0.0.1:49152"]}"#,
        )
        .unwrap();
        assert_eq!(
            r.listeners,
            Some(vec![
                ListenerRef::Index(1),
                ListenerRef::Address("127.0.0.1:49152".into())
            ])
        );
        assert!(serde_json::from_str::<IncomingRequest>(
            r#"{"allow":{"identity":"x"},"forward":"tcp:a:1","bogus":1}"#
        )
        .is_err());
    }
}
