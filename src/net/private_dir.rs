//! A fresh directory only its owner can enter (mode 0700), removed with
//! its contents when dropped: the place where unix sockets get their final
//! mode before anyone else can reach them ([`super::unix_bind`]) and where
//! the source QEMU's local hop lives (`migrate`).
//!
//! The mode is given at `mkdir(2)` (the umask can only take bits away, so
//! the directory is never more open than 0700), then set to exactly 0700
//! in case the umask took some of the owner's. The name is random and
//! `mkdir` fails on anything already there, so a name another user placed
//! (a symlink, a directory of theirs) is never used: we draw another.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::distributions::{Alphanumeric, DistString};

/// Random characters in a name: 62^8 names, and short enough for a socket
/// path inside to fit `sun_path` (108 bytes).
const RANDOM_CHARS: usize = 8;

/// How many taken names to step over before giving up: with random names a
/// second collision already means something is wrong.
const ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
#[error("cannot create a private directory in {}", parent.display())]
pub struct PrivateDirError {
    pub parent: PathBuf,
    #[source]
    pub source: io::Error,
}

/// A directory of mode 0700 created by [`PrivateDir::create_in`]; removed
/// with everything in it on drop.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `PARENT/PREFIXxxxxxxxx`. The parent must exist.
    pub fn create_in(parent: &Path, prefix: &str) -> Result<PrivateDir, PrivateDirError> {
        let err = |source| PrivateDirError {
            parent: parent.to_path_buf(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        for _ in 0..ATTEMPTS {
            let name = format!(
                "{prefix}{}",
                Alphanumeric.sample_string(&mut rand::thread_rng(), RANDOM_CHARS)
            );
            let path = parent.join(name);
            match builder.create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(err(e)),
            }
            // Owned from here: removed if the chmod fails.
            let dir = PrivateDir { path };
            std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))
                .map_err(err)?;
            return Ok(dir);
        }
        Err(err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "every name tried was taken",
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Best effort: a leftover directory is only untidy, never open.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// The umask is process-wide; rather than change it under the other
    /// tests, a child process (this test binary, filtered to one test)
    /// runs under each umask: `sh -c 'umask U; exec ...'`.
    #[test]
    fn mode_is_exactly_0700_whatever_the_umask() {
        if let Ok(parent) = std::env::var("MIGGATE_PRIVATE_DIR_PARENT") {
            let d = PrivateDir::create_in(Path::new(&parent), ".t").unwrap();
            assert_eq!(mode_of(d.path()), 0o700);
            println!("MODE-OK");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        for umask in ["000", "022", "077", "277", "777"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
                .arg(&exe)
                .args([
                    "--exact",
                    "net::private_dir::tests::mode_is_exactly_0700_whatever_the_umask",
                    "--nocapture",
                ])
                .env("MIGGATE_PRIVATE_DIR_PARENT", tmp.path())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("MODE-OK"),
                "umask {umask}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Each child's directory went with it.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn names_are_unique_and_prefixed() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PrivateDir> = (0..64)
            .map(|_| PrivateDir::create_in(tmp.path(), ".mgb").unwrap())
            .collect();
        let names: HashSet<_> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
        assert_eq!(names.len(), dirs.len());
        for d in &dirs {
            let name = d.path().file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(".mgb"), "{name}");
            assert_eq!(name.len(), ".mgb".len() + RANDOM_CHARS);
            assert_eq!(d.path().parent(), Some(tmp.path()));
        }
    }

    #[test]
    fn dropped_with_its_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let d = PrivateDir::create_in(tmp.path(), "p-").unwrap();
        let path = d.path().to_path_buf();
        std::fs::write(path.join("f"), "x").unwrap();
        std::fs::create_dir(path.join("sub")).unwrap();
        std::fs::write(path.join("sub/g"), "y").unwrap();
        drop(d);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_parent_is_an_error_that_names_it() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("nope");
        let e = PrivateDir::create_in(&parent, "p-").unwrap_err();
        assert_eq!(e.parent, parent);
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
