//! Live revocation: the channels a gateway relays, by who is on the other
//! end, so that an ACL or CRL change (or a deleted registration) that no
//! longer allows a peer closes its live channels too, not only its next.
//!
//! Every admitted channel registers its peer (subject DN, end-entity
//! certificate, the route that admitted it) in the gateway's [`Live`]
//! table and gets a [`LiveGuard`]; the gate `select!`s its relay against
//! [`LiveGuard::revoked`], a `watch` receiver that wakes only when the
//! channel is cut. The relay's hot path pays next to nothing: no shared
//! lock, no check per read (re-polling the receiver when the relay wakes
//! takes this channel's own, uncontended `Notify` lock). On a change, [`Live::recheck`] runs the caller's judgement
//! (a pure function of the entry: ACL decision, CRL verdict) over the
//! table, off the data path, and cuts the entries it condemns. Dropping
//! the relay closes both sockets, as a stall or a `DELETE` does: the
//! source QEMU's migration fails, its VM keeps running.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Why a live channel was cut; `cause` is the metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub cause: Cause,
    /// The operator's sentence, starting with "revoked: ".
    pub reason: String,
}

/// What took a live peer's permission away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The ACL (file reloaded, or a daemon reload) denies its DN.
    Acl,
    /// `ca-crl.pem` revokes its certificate.
    Crl,
    /// Its registration was deleted (`DELETE /v1/migrations/{id}`).
    Deleted,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Acl => "acl",
            Cause::Crl => "crl",
            Cause::Deleted => "deleted",
        }
    }
}

/// Every cause, for metrics.
pub const CAUSES: [Cause; 3] = [Cause::Acl, Cause::Crl, Cause::Deleted];

/// Who is on the other end of a live channel, as admitted.
#[derive(Debug, Clone)]
pub struct LivePeer {
    /// Subject DN, as the ACL saw it.
    pub dn: String,
    /// The peer's certificates as it presented them, end-entity first
    /// (intermediates after it), re-verified on a CRL change.
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Admitted on the static route (its ACL applies); `false`: by a
    /// registration's ticket (its own allowed identity applies).
    pub static_route: bool,
}

struct Entry {
    peer: Arc<LivePeer>,
    cut: watch::Sender<Option<Revoked>>,
}

/// The live channels of one gateway.
#[derive(Default)]
pub struct Live {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

impl Live {
    /// Registers an admitted channel for as long as the guard lives.
    pub fn register(self: &Arc<Self>, peer: LivePeer) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (cut, rx) = watch::channel(None);
        let peer = Arc::new(peer);
        self.lock().insert(id, Entry { peer, cut });
        LiveGuard {
            live: self.clone(),
            id,
            rx,
        }
    }

    /// Cuts every live channel that `judge` condemns; returns how many.
    /// `judge` runs with the table locked: keep it pure (no I/O).
    pub fn recheck(&self, judge: impl Fn(&LivePeer) -> Option<Revoked>) -> usize {
        let entries = self.lock();
        let mut cut = 0;
        for e in entries.values() {
            // Already cut: the first reason stays.
            if e.cut.borrow().is_some() {
                continue;
            }
            if let Some(why) = judge(&e.peer) {
                tracing::warn!(
                    peer.dn = %crate::authz::shown(&e.peer.dn),
                    cause = why.cause.as_str(),
                    reason = %why.reason,
                    "closing a live channel: its peer is no longer allowed"
                );
                e.cut.send_replace(Some(why));
                cut += 1;
            }
        }
        cut
    }

    /// How many channels are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A live channel's place in its gateway's table; removed on drop.
pub struct LiveGuard {
    live: Arc<Live>,
    id: u64,
    rx: watch::Receiver<Option<Revoked>>,
}

impl LiveGuard {
    /// Resolves when the channel is cut by [`Live::recheck`]; never
    /// otherwise (the sender lives in the table as long as the guard).
    pub async fn revoked(&mut self) -> Revoked {
        let got = self.rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match got {
            Ok(Some(why)) => why,
            _ => std::future::pending().await,
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// The ACL judgement: a peer admitted on the static route whose DN the
/// route's current authz denies. `route` is the one in force now (`None`:
/// a reload removed the static route).
pub fn judge_acl(
    route: Option<&crate::admit::decide::StaticRoute>,
    peer: &LivePeer,
) -> Option<Revoked> {
    if !peer.static_route {
        return None;
    }
    let reason = match route {
        None => "revoked: the static route that admitted it was removed by a reload".to_string(),
        // An ACL file that cannot be loaded denies new peers, but is a
        // typo more often than a decision: live channels are kept.
        Some(r)
            if r.authz
                .reloads()
                .is_some_and(|rx| rx.borrow().result.is_err()) =>
        {
            return None
        }
        Some(r) => match r.authz.check(&peer.dn) {
            crate::authz::Decision::Allow => return None,
            crate::authz::Decision::Deny { reason } => format!("revoked: {reason}"),
        },
    };
    Some(Revoked {
        cause: Cause::Acl,
        reason,
    })
}

/// The source gateway's side: its peer is the target (a gateway, or a
/// QEMU with native TLS), verified as a server for `server_name`. No ACL
/// here; `ca-crl.pem` in its PKI directory is watched, applies to new
/// handshakes ([`SourceRevocation::tls`]) and re-verifies live targets.
pub struct SourceRevocation {
    pub live: Arc<Live>,
    dir: std::path::PathBuf,
    server_name: rustls_pki_types::ServerName<'static>,
    keep_live: bool,
    tls: std::sync::RwLock<Arc<rustls::ClientConfig>>,
    /// The CRL taken last (with the `tls` built from it).
    check: Mutex<Option<Arc<crate::creds::crl_watch::PeerCheck>>>,
    crl_error: Mutex<Option<String>>,
    _watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl SourceRevocation {
    /// Starts watching `dir/ca-crl.pem`; `tls` is the configuration in
    /// force until a new CRL replaces it (keeping its ALPN protocols).
    pub fn start(
        dir: &std::path::Path,
        server_name: rustls_pki_types::ServerName<'static>,
        keep_live: bool,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Arc<SourceRevocation>, crate::authz::AuthzError> {
        let rev = Self::unwatched(dir, server_name, keep_live, tls);
        let weak = Arc::downgrade(&rev);
        let w = crate::creds::crl_watch::watch(dir, move |loaded| {
            if let Some(r) = weak.upgrade() {
                r.crl_changed(loaded);
            }
        })?;
        *rev._watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        Ok(rev)
    }

    fn unwatched(
        dir: &std::path::Path,
        server_name: rustls_pki_types::ServerName<'static>,
        keep_live: bool,
        tls: Arc<rustls::ClientConfig>,
    ) -> Arc<SourceRevocation> {
        Arc::new(SourceRevocation {
            live: Arc::default(),
            dir: dir.to_path_buf(),
            server_name,
            keep_live,
            tls: std::sync::RwLock::new(tls),
            check: Mutex::new(None),
            crl_error: Mutex::new(None),
            _watcher: Mutex::new(None),
        })
    }

    /// The client configuration for a new handshake.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A channel just registered as live whose handshake used `used`:
    /// if a CRL was taken since, it is judged by it (a change between the
    /// handshake and the registration would otherwise be missed).
    pub fn judge_since(&self, used: &Arc<rustls::ClientConfig>, p: &LivePeer) -> Option<Revoked> {
        if self.keep_live {
            return None;
        }
        let check = self.check.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if Arc::ptr_eq(used, &self.tls()) {
            return None;
        }
        check?.revoked(&p.chain).map(|reason| Revoked {
            cause: Cause::Crl,
            reason,
        })
    }

    fn crl_changed(
        &self,
        loaded: Result<crate::creds::crl_watch::Crls, crate::creds::tls::CredsError>,
    ) {
        use crate::creds::{crl_watch::PeerCheck, tls};
        let built = loaded.and_then(|crls| {
            let old = self.tls();
            let config = tls::client_config_with(&self.dir, &old.alpn_protocols, crls.clone())?;
            let check = PeerCheck::servers(&self.dir, crls, self.server_name.clone())?;
            Ok((config, check))
        });
        let (config, check) = match built {
            Ok(x) => x,
            Err(e) => {
                let why = crate::error::chain(&e);
                let mut last = self.crl_error.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(why.as_str()) {
                    tracing::error!(
                        error = %why, live = self.live.len(),
                        "the new ca-crl.pem cannot be used: the previous CRL stays in force for new handshakes and no live channel is re-checked (fix the file)"
                    );
                    *last = Some(why);
                }
                return;
            }
        };
        *self.crl_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let check = Arc::new(check);
        // The check first: a channel that sees the new configuration
        // finds the check that goes with it.
        *self.check.lock().unwrap_or_else(|p| p.into_inner()) = Some(check.clone());
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = config;
        let live = self.live.len();
        if self.keep_live {
            tracing::info!(
                live,
                "CRL reloaded: live channels kept (keep-live-on-acl-change)"
            );
            return;
        }
        let cut = self.live.recheck(|p| {
            check.revoked(&p.chain).map(|reason| Revoked {
                cause: Cause::Crl,
                reason,
            })
        });
        tracing::info!(live, closed = cut, "CRL reloaded: live channels re-checked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::decide::StaticRoute;
    use crate::authz::{Authz, Simple};
    use std::time::Duration;

    fn peer(dn: &str, static_route: bool) -> LivePeer {
        LivePeer {
            dn: dn.into(),
            chain: Vec::new(),
            static_route,
        }
    }

    fn route(authz: Arc<dyn Authz>) -> StaticRoute {
        StaticRoute {
            forward: "tcp:127.0.0.1:1".parse().unwrap(),
            authz,
            expect: Default::default(),
            nbd: None,
        }
    }

    /// Only the condemned channels are cut, once, with the first reason;
    /// a dropped guard leaves the table.
    #[tokio::test]
    async fn recheck_cuts_the_condemned_once() {
        let live = Arc::new(Live::default());
        let mut a = live.register(peer("CN=a", true));
        let mut b = live.register(peer("CN=b", true));
        assert_eq!(live.len(), 2);
        let acl = route(Arc::new(Simple::new("CN=b")));
        assert_eq!(live.recheck(|p| judge_acl(Some(&acl), p)), 1);
        let why = tokio::time::timeout(Duration::from_secs(1), a.revoked())
            .await
            .expect("a is cut");
        assert_eq!(why.cause, Cause::Acl);
        assert!(
            why.reason.starts_with("revoked: ") && why.reason.contains("CN=a"),
            "{why:?}"
        );
        // b is allowed: not cut.
        assert!(tokio::time::timeout(Duration::from_millis(50), b.revoked())
            .await
            .is_err());
        // A second judgement does not replace the first reason.
        let crl = |_: &LivePeer| {
            Some(Revoked {
                cause: Cause::Crl,
                reason: "revoked: x".into(),
            })
        };
        assert_eq!(live.recheck(crl), 1, "only b was still live");
        assert_eq!(a.revoked().await.cause, Cause::Acl);
        assert_eq!(b.revoked().await.cause, Cause::Crl);
        drop(a);
        drop(b);
        assert!(live.is_empty());
    }

    /// The ACL applies to the static route's channels only; a removed
    /// route condemns them all.
    #[test]
    fn acl_judgement_by_route() {
        let deny_all = route(Arc::new(crate::authz::DenyAll));
        assert_eq!(judge_acl(Some(&deny_all), &peer("CN=a", false)), None);
        let j = judge_acl(Some(&deny_all), &peer("CN=a", true)).unwrap();
        assert!(j.reason.contains("no authorization is configured"), "{j:?}");
        let gone = judge_acl(None, &peer("CN=a", true)).unwrap();
        assert!(gone.reason.contains("removed by a reload"), "{gone:?}");
        let any = route(Arc::new(crate::authz::AnyVerified));
        assert_eq!(judge_acl(Some(&any), &peer("CN=a", true)), None);
    }

    /// The source side: a target certificate revoked by a CRL taken after
    /// the channel's handshake is judged by it once registered; a channel
    /// whose handshake used the new configuration is not re-verified.
    #[test]
    fn source_judged_by_a_crl_taken_since_its_handshake() {
        use crate::creds::{crl_watch, pki, tls};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pki::init(d, &Default::default()).unwrap();
        let old = tls::client_config(d, &[tls::ALPN_MIGGATE]).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        // No watcher: the test makes the changes happen, one at a time.
        let rev = SourceRevocation::unwatched(d, name, false, old.clone());
        let target = LivePeer {
            dn: "CN=localhost".into(),
            chain: tls::certs(&d.join(tls::SERVER_CERT)).unwrap(),
            static_route: false,
        };
        assert_eq!(rev.judge_since(&old, &target), None);

        pki::revoke(d, &d.join(tls::SERVER_CERT), 30).unwrap();
        rev.crl_changed(crl_watch::load(d));
        let new = rev.tls();
        assert!(!Arc::ptr_eq(&old, &new));
        assert_eq!(new.alpn_protocols, vec![tls::ALPN_MIGGATE.to_vec()]);
        let why = rev.judge_since(&old, &target).expect("revoked since");
        assert_eq!(why.cause, Cause::Crl);
        assert!(why.reason.contains("ca-crl.pem"), "{why:?}");
        assert_eq!(rev.judge_since(&new, &target), None);
    }

    /// Waits for a reload (not the initial load) that loaded, or not.
    async fn loaded(rx: &mut watch::Receiver<crate::authz::ReloadState>, ok: bool) {
        let f = rx.wait_for(|s| s.generation > 0 && s.result.is_ok() == ok);
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("reloaded")
            .unwrap();
    }

    /// An ACL file that cannot be loaded denies new peers, but condemns no
    /// live channel; loaded again and denying, it does.
    #[tokio::test]
    async fn a_broken_acl_file_condemns_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.json");
        let deny = r#"{"rules": [{"match": "CN=a", "policy": "deny"}], "policy": "allow"}"#;
        std::fs::write(&path, r#"{"policy": "allow"}"#).unwrap();
        let file = crate::authz::ListFile::open(&path, true).unwrap();
        let mut rx = file.subscribe();
        let acl = route(file.clone());
        let a = peer("CN=a", true);
        assert_eq!(judge_acl(Some(&acl), &a), None);

        std::fs::write(&path, "{ broken").unwrap();
        loaded(&mut rx, false).await;
        assert_ne!(file.check("CN=a"), crate::authz::Decision::Allow);
        assert_eq!(judge_acl(Some(&acl), &a), None);

        std::fs::write(&path, deny).unwrap();
        loaded(&mut rx, true).await;
        let j = judge_acl(Some(&acl), &a).expect("denied");
        assert!(j.reason.contains("not allowed by ACL"), "{j:?}");
    }
}
