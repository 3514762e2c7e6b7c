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
//!
//! A bound main channel that fails (its path was cut) leaves its binding
//! *paused* for [`crate::timeouts::RECOVERY_WINDOW`]: a postcopy migration
//! then waits, split across both hosts, for QEMU's recovery, whose new main
//! channel carries no header and no UUID. It is admitted by resuming the
//! paused binding (same peer, same scope, once), and gets a new one for
//! its reconnecting preempt channel. Paused bindings are bounded in number
//! ([`MAX_PAUSED`]); the oldest goes first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::binding_state::{self, Saved, StateError, StateFile};
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
    #[error("no paused main channel has this binding token (it never failed, was resumed already, or its recovery window has passed)")]
    NotPaused,
    /// A native-TLS connection without a QEMU header while several
    /// postcopy main channels of its peer live (see `gate::native_join`).
    #[error("{mains} live native-TLS main channels from {peer} advise postcopy: a connection without a QEMU header cannot be told which one it is the postcopy preempt channel of")]
    Ambiguous { peer: String, mains: usize },
    /// A native-TLS connection without a QEMU header, and no postcopy main
    /// channel of its peer to join (`what`: what it sent, or did not).
    #[error("{what}, and no live native-TLS main channel from {peer} advises postcopy, so it is not taken as a postcopy preempt channel")]
    NoPostcopyMain { peer: String, what: String },
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
            JoinRefusal::NotPaused => "no paused migration for this binding token",
            JoinRefusal::Ambiguous { .. } => "ambiguous postcopy preempt channel",
            JoinRefusal::NoPostcopyMain { .. } => "no postcopy main channel for this connection",
        }
    }

    /// A bounded label for metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            JoinRefusal::Unknown => "unknown_binding",
            JoinRefusal::OtherPeer { .. } => "binding_other_peer",
            JoinRefusal::OtherMigration { .. } => "binding_other_migration",
            JoinRefusal::AlreadyJoined => "binding_joined",
            JoinRefusal::NotPaused => "binding_not_paused",
            JoinRefusal::Ambiguous { .. } => "binding_ambiguous",
            JoinRefusal::NoPostcopyMain { .. } => "no_postcopy_main",
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

/// Paused bindings kept at most (each is a few hundred bytes).
pub const MAX_PAUSED: usize = 1024;

struct Entry {
    peer_dn: String,
    scope: Scope,
    joined: bool,
    ended: watch::Receiver<bool>,
    /// Its main channel failed: it may be resumed until then.
    paused_until: Option<Instant>,
    /// The same end, as saved in the state file (a live one's counts from
    /// its bind: if the process dies, it is paused at most this long).
    until_unix: u64,
}

/// The live bindings of one listener.
#[derive(Default)]
pub struct Bindings {
    map: Mutex<HashMap<TokenHash, Entry>>,
    /// Where the static route's bindings are kept across restarts.
    state: OnceLock<StateFile>,
}

/// Held by the bound main channel; dropping it ends the binding (and
/// tells the joined channel, through [`Joined::main_ended`]).
pub struct BindGuard {
    bindings: Arc<Bindings>,
    key: TokenHash,
    ended: watch::Sender<bool>,
    failed: bool,
}

impl BindGuard {
    /// The main channel failed: its binding stays, paused, for a recovery.
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for BindGuard {
    fn drop(&mut self) {
        let mut map = self.bindings.lock();
        if self.failed {
            if let Some(e) = map.get_mut(&self.key) {
                e.paused_until = Some(Instant::now() + crate::timeouts::RECOVERY_WINDOW);
                e.until_unix = binding_state::unix_after(crate::timeouts::RECOVERY_WINDOW);
            }
            Bindings::bound_paused(&mut map);
        } else {
            map.remove(&self.key);
        }
        self.bindings.save(&map);
        drop(map);
        self.ended.send_replace(true);
    }
}

/// A channel admitted by joining a main channel.
pub struct Joined {
    ended: watch::Receiver<bool>,
}

impl Joined {
    /// Joined to a main channel that sends `true` on `ended` when it ends
    /// (a native-TLS one: `gate::native_join`).
    pub(crate) fn new(ended: watch::Receiver<bool>) -> Joined {
        Joined { ended }
    }

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

    /// Keeps the static route's bindings in `dir` from now on (see
    /// [`binding_state`]), and takes back those saved there by an earlier
    /// process, paused: their main channels died with it. Called once,
    /// before the first connection. Returns how many were taken back.
    pub fn persist_in(&self, dir: &std::path::Path) -> Result<usize, StateError> {
        let (file, saved) = StateFile::open(dir)?;
        let mut map = self.lock();
        let n = saved.len();
        for s in saved {
            let Ok(key) = <TokenHash>::try_from(hex::decode(&s.sha256).unwrap_or_default()) else {
                continue;
            };
            // Ended from the start: nothing can join a paused binding.
            let (_, ended) = watch::channel(true);
            map.insert(
                key,
                Entry {
                    peer_dn: s.peer_dn,
                    scope: Scope::Static,
                    joined: false,
                    ended,
                    paused_until: Some(Instant::now() + binding_state::left(s.until)),
                    until_unix: s.until,
                },
            );
        }
        Bindings::bound_paused(&mut map);
        let _ = self.state.set(file);
        self.save(&map);
        Ok(n)
    }

    /// Writes the static route's bindings to the state file, if any. A
    /// failure is logged, not fatal: the migration goes on, only its
    /// recovery after a restart of this process is at stake.
    fn save(&self, map: &HashMap<TokenHash, Entry>) {
        let Some(file) = self.state.get() else {
            return;
        };
        let saved = map
            .iter()
            .filter(|(_, e)| e.scope == Scope::Static)
            .map(|(k, e)| Saved {
                sha256: hex::encode(k),
                peer_dn: e.peer_dn.clone(),
                until: e.until_unix,
            })
            .collect();
        if let Err(e) = file.save(saved) {
            tracing::error!(error = %e, "cannot save the postcopy recovery state: a restart of this gateway would lose the recovery of a paused migration");
        }
    }

    /// Forgets paused bindings past their window, and the oldest beyond
    /// [`MAX_PAUSED`].
    fn bound_paused(map: &mut HashMap<TokenHash, Entry>) {
        let now = Instant::now();
        map.retain(|_, e| e.paused_until.map_or(true, |t| t > now));
        let mut paused: Vec<(Instant, TokenHash)> = map
            .iter()
            .filter_map(|(k, e)| e.paused_until.map(|t| (t, *k)))
            .collect();
        if paused.len() > MAX_PAUSED {
            paused.sort();
            for (_, k) in &paused[..paused.len() - MAX_PAUSED] {
                map.remove(k);
            }
        }
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
                paused_until: None,
                until_unix: binding_state::unix_after(crate::timeouts::RECOVERY_WINDOW),
            },
        );
        self.save(&self.lock());
        let guard = BindGuard {
            bindings: self.clone(),
            key,
            ended: tx,
            failed: false,
        };
        (Secret::new(&token), guard)
    }

    /// The same peer's checks for a token's entry.
    fn check(e: &Entry, peer_dn: &str, scope: &Scope) -> Result<(), JoinRefusal> {
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
        Ok(())
    }

    /// Admits the main channel resuming the paused binding `token`, once;
    /// the binding is then spent (the resumed channel gets its own).
    pub fn resume(&self, token: &str, peer_dn: &str, scope: &Scope) -> Result<(), JoinRefusal> {
        let mut map = self.lock();
        let key = Bindings::paused(&mut map, token, peer_dn, scope)?;
        map.remove(&key);
        self.save(&map);
        Ok(())
    }

    /// Whether [`Bindings::resume`] would admit it, without spending it:
    /// a registered migration checks the binding before its registration
    /// takes the channel, so that a wrong token does not fail the migration.
    pub fn check_resume(
        &self,
        token: &str,
        peer_dn: &str,
        scope: &Scope,
    ) -> Result<(), JoinRefusal> {
        Bindings::paused(&mut self.lock(), token, peer_dn, scope).map(|_| ())
    }

    fn paused(
        map: &mut HashMap<TokenHash, Entry>,
        token: &str,
        peer_dn: &str,
        scope: &Scope,
    ) -> Result<TokenHash, JoinRefusal> {
        Bindings::bound_paused(map);
        let key = hash(token);
        let e = map.get(&key).ok_or(JoinRefusal::NotPaused)?;
        if e.paused_until.is_none() {
            return Err(JoinRefusal::NotPaused);
        }
        Bindings::check(e, peer_dn, scope)?;
        Ok(key)
    }

    /// Gives the paused binding of `scope` (a registered migration's cut
    /// main channel) a new token and returns it; the old token no longer
    /// resumes anything. The daemon keeps only token hashes, so a recovery
    /// driven through its API (by a source gateway that never saw the old
    /// token) needs a token minted for it; peer, scope and window stay.
    /// `None` when no binding of `scope` is paused.
    pub fn rekey_paused(&self, scope: &Scope) -> Option<Secret> {
        let mut map = self.lock();
        Bindings::bound_paused(&mut map);
        let old = *map
            .iter()
            .find(|(_, e)| e.paused_until.is_some() && &e.scope == scope)?
            .0;
        let entry = map.remove(&old)?;
        let bytes: [u8; 32] = rand::random();
        let token = zeroize::Zeroizing::new(hex::encode(bytes));
        map.insert(hash(&token), entry);
        Some(Secret::new(&token))
    }

    /// Admits a channel of `peer_dn` in `scope` presenting `token`, once.
    pub fn join(&self, token: &str, peer_dn: &str, scope: &Scope) -> Result<Joined, JoinRefusal> {
        let mut map = self.lock();
        let e = map
            .get_mut(&hash(token))
            .filter(|e| e.paused_until.is_none())
            .ok_or(JoinRefusal::Unknown)?;
        Bindings::check(e, peer_dn, scope)?;
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
        // It ended well: nothing to resume.
        assert_eq!(
            b.resume(t, "CN=a", &Scope::Static).err(),
            Some(JoinRefusal::NotPaused)
        );
    }

    /// A failed main channel's binding can be resumed once, by the same
    /// peer; it cannot be joined meanwhile.
    #[test]
    fn a_failed_main_channel_is_resumed_once_by_its_peer() {
        let b = Arc::new(Bindings::default());
        let (token, mut guard) = b.bind("CN=a", Scope::Migration("m".into()));
        let t = token.expose();
        let scope = Scope::Migration("m".into());
        assert_eq!(
            b.resume(t, "CN=a", &scope).err(),
            Some(JoinRefusal::NotPaused),
            "a live main channel is not resumed"
        );
        guard.failed();
        drop(guard);
        assert_eq!(b.join(t, "CN=a", &scope).err(), Some(JoinRefusal::Unknown));
        assert!(matches!(
            b.resume(t, "CN=b", &scope),
            Err(JoinRefusal::OtherPeer { .. })
        ));
        assert!(matches!(
            b.resume(t, "CN=a", &Scope::Static),
            Err(JoinRefusal::OtherMigration { .. })
        ));
        b.resume(t, "CN=a", &scope).unwrap();
        assert_eq!(
            b.resume(t, "CN=a", &scope).err(),
            Some(JoinRefusal::NotPaused)
        );
    }

    /// A registered migration's paused binding gets a new token for its
    /// recovery: the old one is dead, the new one resumes it once, for the
    /// same peer and migration only.
    #[test]
    fn a_paused_binding_is_rekeyed_for_its_migration_only() {
        let b = Arc::new(Bindings::default());
        let scope = Scope::Migration("m".into());
        let (old, mut guard) = b.bind("CN=a", scope.clone());
        assert!(
            b.rekey_paused(&scope).is_none(),
            "a live binding is not paused"
        );
        guard.failed();
        drop(guard);
        assert!(b.rekey_paused(&Scope::Migration("other".into())).is_none());
        let new = b.rekey_paused(&scope).unwrap();
        assert_ne!(new.expose(), old.expose());
        assert_eq!(
            b.resume(old.expose(), "CN=a", &scope).err(),
            Some(JoinRefusal::NotPaused)
        );
        assert!(matches!(
            b.resume(new.expose(), "CN=b", &scope),
            Err(JoinRefusal::OtherPeer { .. })
        ));
        b.resume(new.expose(), "CN=a", &scope).unwrap();
        assert!(b.rekey_paused(&scope).is_none(), "resumed: nothing paused");
    }

    #[test]
    fn paused_bindings_are_bounded() {
        let b = Arc::new(Bindings::default());
        let mut first = None;
        for i in 0..MAX_PAUSED + 5 {
            let (token, mut guard) = b.bind("CN=a", Scope::Static);
            if i == 0 {
                first = Some(token.expose().to_string());
            }
            guard.failed();
        }
        assert_eq!(b.lock().len(), MAX_PAUSED);
        let first = first.unwrap();
        assert_eq!(
            b.resume(&first, "CN=a", &Scope::Static).err(),
            Some(JoinRefusal::NotPaused),
            "the oldest went first"
        );
    }
}
