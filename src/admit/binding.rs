//! Binding a channel that carries no VM identity (the postcopy preempt
//! channel) to the main channel it belongs to.
//!
//! The main channel proved its VM (UUID in the stream, ticket); when its
//! source gateway asks (`bind` in the hello), the target gateway mints a
//! random 256-bit token for it, answers with it in the verdict, and keeps
//! only its SHA-256 while the main channel lives. A channel presenting the
//! token (`join`) is admitted as part of that main channel's migration if
//! it comes from the same peer DN (and, for a registered migration, with
//! the same ticket's migration), once: the token is the source gateway's
//! proof that it opened that main channel, which an authorized peer with a
//! different certificate, or anyone replaying the hello, does not have.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::wire::frames::Secret;

/// Why a joining channel is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("no live main channel has this binding token (its main channel has ended, or the token is not one this gateway gave)")]
    Unknown,
    #[error("peer {peer} presented the binding token of a main channel from {main_peer}")]
    OtherPeer { peer: String, main_peer: String },
    #[error("the binding token belongs to {main}, not to {this}")]
    OtherMigration { main: String, this: String },
    #[error("a channel has already joined this main channel (one postcopy preempt channel per migration)")]
    AlreadyJoined,
}

impl JoinRefusal {
    /// What the peer is told.
    pub fn public(&self) -> &'static str {
        match self {
            JoinRefusal::Unknown => "no live main channel for this binding token",
            JoinRefusal::OtherPeer { .. } | JoinRefusal::OtherMigration { .. } => {
                "binding token not valid for this peer"
            }
            JoinRefusal::AlreadyJoined => "main channel already joined",
        }
    }

    /// A bounded label for metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            JoinRefusal::Unknown => "unknown_binding",
            JoinRefusal::OtherPeer { .. } => "binding_other_peer",
            JoinRefusal::OtherMigration { .. } => "binding_other_migration",
            JoinRefusal::AlreadyJoined => "binding_joined",
        }
    }
}

/// Where a bound main channel was admitted: a static route (one per
/// listener) or a registered migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Static,
    Migration(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Static => f.write_str("the static route"),
            Scope::Migration(id) => write!(f, "migration {id}"),
        }
    }
}

type TokenHash = [u8; 32];

struct Entry {
    peer_dn: String,
    scope: Scope,
    joined: bool,
    ended: watch::Receiver<bool>,
}

/// The live bindings of one listener.
#[derive(Default)]
pub struct Bindings {
    map: Mutex<HashMap<TokenHash, Entry>>,
}

/// Held by the bound main channel; dropping it ends the binding (and
/// tells the joined channel, through [`Joined::main_ended`]).
pub struct BindGuard {
    bindings: Arc<Bindings>,
    key: TokenHash,
    ended: watch::Sender<bool>,
}

impl Drop for BindGuard {
    fn drop(&mut self) {
        self.bindings.lock().remove(&self.key);
        self.ended.send_replace(true);
    }
}

/// A channel admitted by joining a main channel.
pub struct Joined {
    ended: watch::Receiver<bool>,
}

impl Joined {
    /// Resolves once the main channel it joined has ended.
    pub async fn main_ended(&self) {
        let mut rx = self.ended.clone();
        let _ = rx.wait_for(|e| *e).await;
    }
}

fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token for a main channel of `peer_dn` admitted in `scope`.
    pub fn bind(self: &Arc<Self>, peer_dn: &str, scope: Scope) -> (Secret, BindGuard) {
        let bytes: [u8; 32] = rand::random();
        let token = zeroize::Zeroizing::new(hex::encode(bytes));
        let key = hash(&token);
        let (tx, rx) = watch::channel(false);
        self.lock().insert(
            key,
            Entry {
                peer_dn: peer_dn.to_string(),
                scope,
                joined: false,
                ended: rx,
            },
        );
        let guard = BindGuard {
            bindings: self.clone(),
            key,
            ended: tx,
        };
        (Secret::new(&token), guard)
    }

    /// Admits a channel of `peer_dn` in `scope` presenting `token`, once.
    pub fn join(&self, token: &str, peer_dn: &str, scope: &Scope) -> Result<Joined, JoinRefusal> {
        let mut map = self.lock();
        let e = map.get_mut(&hash(token)).ok_or(JoinRefusal::Unknown)?;
        if e.peer_dn != peer_dn {
            return Err(JoinRefusal::OtherPeer {
                peer: peer_dn.to_string(),
                main_peer: e.peer_dn.clone(),
            });
        }
        if &e.scope != scope {
            return Err(JoinRefusal::OtherMigration {
                main: e.scope.to_string(),
                this: scope.to_string(),
            });
        }
        if e.joined {
            return Err(JoinRefusal::AlreadyJoined);
        }
        e.joined = true;
        Ok(Joined {
            ended: e.ended.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_joins_its_main_once_from_the_same_peer_while_it_lives() {
        let b = Arc::new(Bindings::default());
        let (token, guard) = b.bind("CN=a", Scope::Static);
        let t = token.expose();
        assert_eq!(t.len(), 64);
        assert!(matches!(
            b.join(t, "CN=b", &Scope::Static),
            Err(JoinRefusal::OtherPeer { .. })
        ));
        assert!(matches!(
            b.join(t, "CN=a", &Scope::Migration("m1".into())),
            Err(JoinRefusal::OtherMigration { .. })
        ));
        assert_eq!(
            b.join(&"0".repeat(64), "CN=a", &Scope::Static).err(),
            Some(JoinRefusal::Unknown)
        );
        let joined = b.join(t, "CN=a", &Scope::Static).unwrap();
        assert_eq!(
            b.join(t, "CN=a", &Scope::Static).err(),
            Some(JoinRefusal::AlreadyJoined)
        );
        // The joined channel learns when its main channel ends; the token
        // is then gone.
        let waiting = tokio::spawn(async move { joined.main_ended().await });
        drop(guard);
        waiting.await.unwrap();
        assert_eq!(
            b.join(t, "CN=a", &Scope::Static).err(),
            Some(JoinRefusal::Unknown)
        );
    }
}
