//! The static route's bindings on disk (`miggate target --state-dir`), so
//! that a postcopy migration split across two hosts can still be recovered
//! after the target gateway restarts (a crash, `kill -9`, an upgrade).
//!
//! Without it the token hashes live only in the process: a restarted
//! gateway refuses the source's resumed main channel ("no paused main
//! channel has this binding token") and the VM stays paused on both hosts.
//! The file holds what the process holds: each static-route binding's
//! SHA-256, peer DN and the end of its recovery window, never a token.
//! A binding live when the process died is paused on the next start (its
//! main channel died with the process). Writing the file needs the state
//! directory, which is the gateway user's alone (0700, checked): whoever
//! can write it could only add hashes of tokens they would still have to
//! present over TLS with an authorized certificate.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "bindings.json";
const VERSION: u32 = 1;
/// Entries read at most: a file from a gateway with [`super::binding::MAX_PAUSED`]
/// paused bindings plus live ones; anything larger is not ours.
const MAX_ENTRIES: usize = 4 * super::binding::MAX_PAUSED;
const MAX_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create or inspect the state directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the state directory {} is not a directory owned by this user (uid {me}) with mode 0700 or \
         stricter (it is {what}): others could plant or read postcopy recovery state; \
         `chown` it to this user and `chmod 700` it, or give a new path",
        path.display()
    )]
    Unsafe {
        path: PathBuf,
        me: u32,
        what: String,
    },
    #[error("cannot read the recovery state {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the recovery state {} is not miggate's ({why}); move it away to start without it", path.display())]
    Parse { path: PathBuf, why: String },
}

#[derive(Serialize, Deserialize)]
struct Doc {
    version: u32,
    bindings: Vec<Saved>,
}

/// One binding as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// SHA-256 of the token, hex.
    pub sha256: String,
    pub peer_dn: String,
    /// End of its recovery window, seconds since the epoch.
    pub until: u64,
}

/// Seconds since the epoch, `after` from now.
pub fn unix_after(after: Duration) -> u64 {
    (SystemTime::now() + after)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long until `until` (seconds since the epoch); zero if past.
pub fn left(until: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Duration::from_secs(until.saturating_sub(now))
}

/// The state file of a directory made private (created 0700 if missing).
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// Prepares `dir` and reads the bindings saved there (none if the
    /// file does not exist yet); expired ones are dropped.
    pub fn open(dir: &Path) -> Result<(StateFile, Vec<Saved>), StateError> {
        prepare(dir)?;
        let path = dir.join(FILE);
        let read = |source| StateError::Read {
            path: path.clone(),
            source,
        };
        let saved = match std::fs::File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(read)?.len();
                let parse = |why: String| StateError::Parse {
                    path: path.clone(),
                    why,
                };
                if len > MAX_BYTES {
                    return Err(parse(format!("{len} bytes, more than {MAX_BYTES}")));
                }
                let doc: Doc = serde_json::from_reader(std::io::BufReader::new(f))
                    .map_err(|e| parse(e.to_string()))?;
                if doc.version != VERSION {
                    return Err(parse(format!(
                        "version {}, expected {VERSION}",
                        doc.version
                    )));
                }
                if doc.bindings.len() > MAX_ENTRIES {
                    return Err(parse(format!("{} entries", doc.bindings.len())));
                }
                for b in &doc.bindings {
                    if b.sha256.len() != 64 || hex::decode(&b.sha256).is_err() {
                        return Err(parse(format!(
                            "a hash that is not SHA-256 hex: {:?}",
                            b.sha256
                        )));
                    }
                }
                doc.bindings
                    .into_iter()
                    .filter(|b| !left(b.until).is_zero())
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(read(e)),
        };
        Ok((StateFile { path }, saved))
    }

    /// Replaces the file with `bindings` (a temporary file renamed into
    /// place: a crash leaves the old file or the new one, never half).
    pub fn save(&self, bindings: Vec<Saved>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let doc = Doc {
            version: VERSION,
            bindings,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(&doc).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)
    }
}

fn prepare(dir: &Path) -> Result<(), StateError> {
    let io = |source| StateError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(io)?;
    let me = rustix::process::geteuid().as_raw();
    let what = if m.file_type().is_symlink() {
        Some("a symbolic link".to_string())
    } else if !m.is_dir() {
        Some("not a directory".to_string())
    } else if m.uid() != me || m.mode() & 0o077 != 0 {
        Some(format!(
            "owned by uid {}, mode {:04o}",
            m.uid(),
            m.mode() & 0o7777
        ))
    } else {
        None
    };
    match what {
        Some(what) => Err(StateError::Unsafe {
            path: dir.to_path_buf(),
            me,
            what,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn saved(n: u8, until: u64) -> Saved {
        Saved {
            sha256: hex::encode([n; 32]),
            peer_dn: format!("CN=h{n}"),
            until,
        }
    }

    #[test]
    fn saves_and_reads_back_dropping_expired_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let (f, none) = StateFile::open(&dir).unwrap();
        assert!(none.is_empty());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let live = saved(1, unix_after(Duration::from_secs(3600)));
        f.save(vec![live.clone(), saved(2, 1)]).unwrap();
        let file_mode = std::fs::metadata(dir.join(FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(file_mode, 0o600);
        let (_, back) = StateFile::open(&dir).unwrap();
        assert_eq!(back, vec![live]);
    }

    #[test]
    fn refuses_an_open_directory_and_a_foreign_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = StateFile::open(&dir).err().unwrap().to_string();
        assert!(e.contains("mode 0755") && e.contains("chmod 700"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(
            dir.join(FILE),
            b"{\"version\":1,\"bindings\":[{\"sha256\":\"zz\",\"peer_dn\":\"x\",\"until\":9}]}",
        )
        .unwrap();
        let e = StateFile::open(&dir).err().unwrap().to_string();
        assert!(e.contains("not miggate's") && e.contains("SHA-256"), "{e}");
        std::fs::write(dir.join(FILE), b"garbage").unwrap();
        assert!(StateFile::open(&dir).is_err());
    }
}
