//! QEMU's authz-list-file: an authz-list read from a JSON file and, with
//! refresh, reloaded live when the file changes.
//!
//! Behaviour taken from authz/listfile.c, with the differences noted:
//! - the initial load must succeed, or the object (here: the program) fails;
//! - with refresh QEMU watches the *directory* for the file's name
//!   (qemu_file_monitor_add_watch(dir, file)), so editors that replace the
//!   file by rename are seen; so does this;
//! - a reload that fails leaves no list and every check is denied until a
//!   later reload succeeds ("If an error occurs during reloading, all
//!   authorizations will fail until the file is next successfully loaded",
//!   qapi/authz.json);
//! - QEMU reloads only on MODIFIED/CREATED events and keeps the old list when
//!   the file is deleted; here deletion (or renaming it away) also reloads, so
//!   a removed ACL denies instead of silently staying in force;
//! - QEMU ignores attribute changes (IN_ATTRIB); so does this, which also keeps
//!   the atime update of our own read from triggering another reload;
//! - QEMU refuses a relative file name with refresh; here it is resolved
//!   against the current directory at open time.
//!
//! Reload happens on a plain thread fed by notify's own thread, so no tokio
//! runtime is needed, yet callers inside one can await reloads through
//! [`ListFile::subscribe`].

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::watch;

use super::list::{AclError, List};
use super::{Authz, AuthzError, Decision};

/// Quiet time that ends a burst of events (an editor's write, fsync, rename).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Upper bound on coalescing, so a file rewritten continuously still reloads.
const MAX_DELAY: Duration = Duration::from_millis(500);

/// The outcome of the latest (re)load, as seen through [`ListFile::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadState {
    /// 0 for the initial load, +1 for each reload.
    pub generation: u64,
    /// The number of rules loaded, or why the file could not be loaded.
    pub result: Result<usize, String>,
}

/// An authz-list loaded from a file, optionally kept in sync with it.
pub struct ListFile {
    shared: Arc<Shared>,
    // Dropping the watcher stops notify's thread, which drops the event
    // sender and so ends our reload thread. Mutex only to make this Sync.
    _watcher: Mutex<Option<RecommendedWatcher>>,
}

struct Shared {
    path: PathBuf,
    /// The list in force, or the message saying why there is none. Swapped
    /// whole; readers clone the Arc and drop the lock before matching.
    current: RwLock<Arc<Result<List, String>>>,
    generation: AtomicU64,
    tx: watch::Sender<ReloadState>,
}

impl ListFile {
    /// Loads `path` (failure is an error: refuse to start rather than deny
    /// silently) and, if `refresh`, watches it for changes.
    pub fn open(path: impl AsRef<Path>, refresh: bool) -> Result<Arc<ListFile>, AuthzError> {
        let given = path.as_ref();
        let path = std::path::absolute(given).map_err(|source| AuthzError::Read {
            path: given.to_path_buf(),
            source,
        })?;
        let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else {
            return Err(AuthzError::NoFileName { path });
        };
        let name = name.to_os_string();
        let dir = dir.to_path_buf();

        // Watch before the first load so a change in between is not missed.
        let (watcher, events) = if refresh {
            let (w, rx) = watch_dir(&dir).map_err(|source| AuthzError::Watch {
                path: dir.clone(),
                source,
            })?;
            (Some(w), Some(rx))
        } else {
            (None, None)
        };

        let list = load(&path).map_err(|e| e.into_authz_error(&path))?;
        let rules = list.rules().len();
        tracing::info!(path = %path.display(), rules, refresh, "ACL file loaded");
        let (tx, _) = watch::channel(ReloadState {
            generation: 0,
            result: Ok(rules),
        });
        let shared = Arc::new(Shared {
            path,
            current: RwLock::new(Arc::new(Ok(list))),
            generation: AtomicU64::new(0),
            tx,
        });

        if let Some(rx) = events {
            let weak = Arc::downgrade(&shared);
            let reload = move || match weak.upgrade() {
                Some(shared) => {
                    shared.reload();
                    true
                }
                None => false,
            };
            std::thread::Builder::new()
                .name("miggate-acl-watch".into())
                .spawn(move || watch_loop(rx, name, reload))
                .map_err(|e| AuthzError::Watch {
                    path: dir,
                    source: notify::Error::io(e),
                })?;
        }
        Ok(Arc::new(ListFile {
            shared,
            _watcher: Mutex::new(watcher),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Follows reloads: the receiver starts at the current state and is
    /// notified after each reload has taken effect for [`Authz::check`].
    pub fn subscribe(&self) -> watch::Receiver<ReloadState> {
        self.shared.tx.subscribe()
    }

    /// The latest load outcome.
    pub fn state(&self) -> ReloadState {
        self.shared.tx.borrow().clone()
    }
}

impl Authz for ListFile {
    fn reloads(&self) -> Option<watch::Receiver<ReloadState>> {
        Some(self.subscribe())
    }

    fn check(&self, identity: &str) -> Decision {
        let current = self.shared.current();
        match &*current {
            Ok(list) => list.check(identity),
            Err(why) => Decision::Deny {
                reason: format!(
                    "ACL file {} cannot be loaded ({why}); denying every peer until it is fixed",
                    self.shared.path.display()
                ),
            },
        }
    }
}

impl std::fmt::Debug for ListFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListFile")
            .field("path", &self.shared.path)
            .field("state", &self.state())
            .finish()
    }
}

impl Shared {
    fn current(&self) -> Arc<Result<List, String>> {
        // A poisoned lock still holds a whole Arc: the swap cannot tear.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reload(&self) {
        // Read and parse with no lock held; only the swap is locked.
        let loaded = load(&self.path).map_err(|e| e.to_string());
        let result = loaded
            .as_ref()
            .map(|l| l.rules().len())
            .map_err(Clone::clone);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        match &result {
            Ok(rules) => tracing::info!(
                path = %self.path.display(), rules, generation, "ACL file reloaded"
            ),
            Err(error) => tracing::warn!(
                path = %self.path.display(), %error, generation,
                "ACL file cannot be loaded; denying every peer until it is fixed"
            ),
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        // After the swap, so a subscriber woken by this sees it in check().
        self.tx.send_replace(ReloadState { generation, result });
    }
}

enum LoadError {
    Read(std::io::Error),
    Invalid(AclError),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Read(e) => write!(f, "{e}"),
            LoadError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl LoadError {
    fn into_authz_error(self, path: &Path) -> AuthzError {
        let path = path.to_path_buf();
        match self {
            LoadError::Read(source) => AuthzError::Read { path, source },
            LoadError::Invalid(source) => AuthzError::Invalid { path, source },
        }
    }
}

fn load(path: &Path) -> Result<List, LoadError> {
    let bytes = std::fs::read(path).map_err(LoadError::Read)?;
    List::from_json(path.display().to_string(), &bytes).map_err(LoadError::Invalid)
}

/// Whether an event may have changed what `name` in the watched directory
/// contains.
fn relevant(ev: &notify::Result<notify::Event>, name: &OsStr) -> bool {
    let ev = match ev {
        Ok(ev) => ev,
        Err(e) => {
            // Events may have been lost: reload to be safe.
            tracing::warn!(error = %e, "file watcher error: reloading in case events were lost");
            return true;
        }
    };
    if ev.need_rescan() {
        return true;
    }
    let kind = match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        // Opens and reads, including our own.
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    };
    kind && ev.paths.iter().any(|p| p.file_name() == Some(name))
}

type Events = mpsc::Receiver<notify::Result<notify::Event>>;

/// A watcher of directory `dir` (not recursive) and its events.
fn watch_dir(dir: &Path) -> Result<(RecommendedWatcher, Events), notify::Error> {
    let (tx, rx) = mpsc::channel();
    let mut w = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })?;
    w.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((w, rx))
}

/// Watches the file at `path` the way the ACL file is watched (its
/// directory, so a rename into place or a deletion is seen; bursts
/// debounced) and calls `changed` on a thread of its own after each
/// change, until `changed` returns false or the returned watcher is
/// dropped. `ca-crl.pem` is watched with this too (`creds::crl_watch`).
pub fn watch_file(
    path: &Path,
    thread_name: &str,
    changed: impl FnMut() -> bool + Send + 'static,
) -> Result<RecommendedWatcher, AuthzError> {
    let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else {
        return Err(AuthzError::NoFileName {
            path: path.to_path_buf(),
        });
    };
    let name = name.to_os_string();
    let watch_err = |source| AuthzError::Watch {
        path: dir.to_path_buf(),
        source,
    };
    let (w, rx) = watch_dir(dir).map_err(watch_err)?;
    std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || watch_loop(rx, name, changed))
        .map_err(|e| watch_err(notify::Error::io(e)))?;
    Ok(w)
}

/// Calls `changed` after each burst of relevant events, until it returns
/// false or the watcher (the sender of `events`) is gone.
fn watch_loop(events: Events, name: OsString, mut changed: impl FnMut() -> bool) {
    while let Ok(first) = events.recv() {
        if !relevant(&first, &name) {
            continue;
        }
        // Coalesce the burst: wait for DEBOUNCE of quiet, at most MAX_DELAY.
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match events.recv_timeout(DEBOUNCE.min(left)) {
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if !changed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tokio::time::timeout;

    const ALICE: &str = "C=GB,O=Example Org,CN=alice.example.com";

    /// An ACL with `n` rules whose outcome for ALICE is `policy`; the rule
    /// count tells the reloads apart.
    fn acl(n: usize, policy: &str) -> String {
        let mut rules: Vec<String> = (1..n)
            .map(|i| format!(r#"{{"match": "CN=other{i}", "policy": "allow"}}"#))
            .collect();
        rules.push(format!(
            r#"{{"match": "*CN=alice.example.com", "policy": "{policy}", "format": "glob"}}"#
        ));
        format!(r#"{{"rules": [{}], "policy": "deny"}}"#, rules.join(",\n"))
    }

    /// Waits (bounded) for a reload newer than `after` that satisfies `pred`.
    async fn reload_where(
        rx: &mut watch::Receiver<ReloadState>,
        after: u64,
        pred: impl Fn(&Result<usize, String>) -> bool,
    ) -> ReloadState {
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if s.generation > after && pred(&s.result) {
                        return s.clone();
                    }
                }
                rx.changed().await.expect("ListFile dropped");
            }
        };
        timeout(Duration::from_secs(10), wait)
            .await
            .expect("timed out waiting for an ACL reload")
    }

    fn deny_reason(d: Decision) -> String {
        match d {
            Decision::Deny { reason } => reason,
            Decision::Allow => panic!("expected deny"),
        }
    }

    #[tokio::test]
    async fn live_reload_through_edits_renames_breakage_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.json");
        fs::write(&path, acl(1, "allow")).unwrap();
        let file = ListFile::open(&path, true).unwrap();
        let mut rx = file.subscribe();
        assert_eq!(rx.borrow().generation, 0);
        assert_eq!(file.check(ALICE), Decision::Allow);

        // Rewritten in place.
        let g = rx.borrow().generation;
        fs::write(&path, acl(2, "deny")).unwrap();
        let s = reload_where(&mut rx, g, |r| *r == Ok(2)).await;
        let reason = deny_reason(file.check(ALICE));
        let shown = path.display();
        assert_eq!(
            reason,
            format!(
                r#"peer {ALICE} not allowed by ACL {shown} (rule 2 "*CN=alice.example.com" deny)"#
            )
        );

        // Replaced by rename, as editors do.
        let tmp = dir.path().join(".acl.json.swp");
        fs::write(&tmp, acl(3, "allow")).unwrap();
        fs::rename(&tmp, &path).unwrap();
        let s = reload_where(&mut rx, s.generation, |r| *r == Ok(3)).await;
        assert_eq!(file.check(ALICE), Decision::Allow);

        // Broken: everyone denied, and the reason says why.
        fs::write(
            &path,
            "{\"rules\": [\n  {\"match\": \"x\", \"policy\": \"allow\"},\n]}",
        )
        .unwrap();
        let s = reload_where(&mut rx, s.generation, |r| {
            r.as_ref().is_err_and(|e| e.contains("trailing comma"))
        })
        .await;
        assert_eq!(
            deny_reason(file.check(ALICE)),
            format!(
                "ACL file {shown} cannot be loaded (line 3 column 1: trailing comma before ']' \
                 (QEMU's JSON parser rejects it too)); denying every peer until it is fixed"
            )
        );

        // Deleted: still denied, now for a missing file.
        fs::remove_file(&path).unwrap();
        let s = reload_where(&mut rx, s.generation, |r| {
            r.as_ref().is_err_and(|e| e.contains("No such file"))
        })
        .await;
        let reason = deny_reason(file.check(ALICE));
        assert!(reason.starts_with(&format!("ACL file {shown} cannot be loaded (No such file")));
        assert!(reason.ends_with("denying every peer until it is fixed"));

        // Fixed: access is back without a restart.
        fs::write(&path, acl(4, "allow")).unwrap();
        reload_where(&mut rx, s.generation, |r| *r == Ok(4)).await;
        assert_eq!(file.check(ALICE), Decision::Allow);
        assert_eq!(file.state().result, Ok(4));
    }

    #[tokio::test]
    async fn no_refresh_ignores_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.json");
        fs::write(&path, acl(1, "allow")).unwrap();
        let fixed = ListFile::open(&path, false).unwrap();
        // A refreshing twin tells us when the change has certainly been seen.
        let witness = ListFile::open(&path, true).unwrap();
        let mut rx = witness.subscribe();

        fs::write(&path, acl(2, "deny")).unwrap();
        reload_where(&mut rx, 0, |r| *r == Ok(2)).await;
        assert_ne!(witness.check(ALICE), Decision::Allow);
        assert_eq!(fixed.check(ALICE), Decision::Allow);
        assert_eq!(fixed.state().generation, 0);
        assert_eq!(fixed.state().result, Ok(1));
    }

    #[test]
    fn event_filter() {
        use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};
        let dir = Path::new("/etc/miggate");
        let name = OsStr::new("acl.json");
        let ev = |kind, file: &str| Ok(notify::Event::new(kind).add_path(dir.join(file)));
        let yes = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ];
        for k in yes {
            assert!(relevant(&ev(k, "acl.json"), name), "{k:?}");
            assert!(!relevant(&ev(k, "acl.json.swp"), name), "{k:?}");
            assert!(!relevant(&ev(k, "other.json"), name), "{k:?}");
        }
        let no = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        ];
        for k in no {
            assert!(!relevant(&ev(k, "acl.json"), name), "{k:?}");
        }
        // A rename onto our name reports both paths.
        let both = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(dir.join(".acl.json.swp"))
            .add_path(dir.join("acl.json"));
        assert!(relevant(&Ok(both), name));
        assert!(relevant(
            &Err(notify::Error::generic("queue overflow")),
            name
        ));
    }

    #[test]
    fn initial_load_failures_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let e = ListFile::open(&missing, true).unwrap_err();
        assert!(
            matches!(&e, AuthzError::Read { path, .. } if *path == missing),
            "{e:?}"
        );

        let bad = dir.path().join("bad.json");
        fs::write(&bad, r#"{"rules": [{"match": "a", "policy": "permit"}]}"#).unwrap();
        let e = ListFile::open(&bad, false).unwrap_err();
        let AuthzError::Invalid { path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*path, bad);
        assert!(source.message.contains("does not accept value 'permit'"));
        assert!(e.to_string().contains("bad.json"));

        assert!(matches!(
            ListFile::open("/", true),
            Err(AuthzError::NoFileName { .. })
        ));
    }

    #[test]
    fn works_without_a_runtime_and_drop_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.json");
        fs::write(&path, acl(1, "allow")).unwrap();
        let file = ListFile::open(&path, true).unwrap();
        let rx = file.subscribe();
        assert_eq!(file.check(ALICE), Decision::Allow);
        drop(file);
        // The reload thread holds only a weak reference, so the state (and
        // the sender) are gone as soon as the ListFile is.
        assert!(rx.has_changed().is_err());
    }
}
