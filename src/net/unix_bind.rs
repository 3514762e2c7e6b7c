//! Binding a unix socket that is never reachable with the wrong mode, and
//! that takes over a dead process's socket file but never a live one's.
//!
//! `bind(2)` creates the socket file with the process umask's mode, and a
//! `chmod` afterwards leaves a window in which anyone the umask lets in can
//! connect. `umask(2)` is process-wide (a multithreaded tokio process
//! cannot change it safely for one call) and needs `unsafe`. Instead:
//!
//! ```text
//! PARENT/.mgbXXXXXXXX/      fresh directory, 0700: nobody else can enter
//! PARENT/.mgbXXXXXXXX/s     bind here, chmod MODE (and chown) in private
//! PARENT/NAME               link(2) (or rename(2) over a stale socket)
//! ```
//!
//! The socket appears at its final path with its final mode and owner, in
//! one step. `link` fails if anything appeared at the path meanwhile, so a
//! file we did not check is never replaced; `rename` is used only over a
//! socket that was just found dead (nothing accepted a connection).
//!
//! What is at the path decides:
//! - nothing: bind;
//! - a socket nobody listens on (a killed process's): replaced, with a log line;
//! - a socket something listens on: [`UnixBindError::InUse`];
//! - anything else (file, directory, symlink): [`UnixBindError::NotASocket`],
//!   and it is left alone.
//!
//! The checks and the placement are as safe as the parent directory: one
//! that other users can write to lets them swap files under any process.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::private_dir::{PrivateDir, PrivateDirError};

#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("another process is listening on {}; refusing to replace its socket", path.display())]
    InUse { path: PathBuf },
    #[error("cannot tell whether a process is listening on {}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} has no file name to bind", path.display())]
    NoFileName { path: PathBuf },
    #[error("no private directory to bind {} in", path.display())]
    PrivateDir {
        path: PathBuf,
        #[source]
        source: PrivateDirError,
    },
    #[error("cannot bind a unix socket for {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot give the socket for {} mode {mode:04o}", path.display())]
    Mode {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot give the socket for {} to uid {uid}", path.display())]
    Owner {
        path: PathBuf,
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot put the new socket in place at {}", path.display())]
    Place {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Who may connect: the socket file's permission bits and, optionally, its
/// owner (root handing a socket to a QEMU that runs as another user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub mode: u32,
    pub owner: Option<u32>,
}

impl Access {
    /// The owner alone: read and write for the process's own user.
    pub const OWNER_ONLY: Access = Access {
        mode: 0o600,
        owner: None,
    };

    pub fn mode(mode: u32) -> Access {
        Access { mode, owner: None }
    }
}

/// A bound listener.
#[derive(Debug)]
pub struct Bound {
    pub listener: UnixListener,
    /// A dead socket file was at the path and was replaced.
    pub replaced_stale: bool,
}

/// Binds a listening unix socket at `path` with `access` in force from its
/// first moment there (see the module documentation). Must run inside a
/// tokio runtime. The parent directory must exist.
pub fn bind(path: &Path, access: Access) -> Result<Bound, UnixBindError> {
    let stale = check_path(path)?;
    let name_len = path.file_name().map(|n| n.len());
    if name_len.is_none() {
        return Err(UnixBindError::NoFileName {
            path: path.to_path_buf(),
        });
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A short name: the temporary path must fit sun_path (108 bytes) too.
    let private =
        PrivateDir::create_in(parent, ".mgb").map_err(|source| UnixBindError::PrivateDir {
            path: path.to_path_buf(),
            source,
        })?;
    let tmp = private.path().join("s");
    let std_listener =
        std::os::unix::net::UnixListener::bind(&tmp).map_err(|source| UnixBindError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(access.mode)).map_err(
        |source| UnixBindError::Mode {
            path: path.to_path_buf(),
            mode: access.mode,
            source,
        },
    )?;
    if let Some(uid) = access.owner {
        std::os::unix::fs::chown(&tmp, Some(uid), None).map_err(|source| UnixBindError::Owner {
            path: path.to_path_buf(),
            uid,
            source,
        })?;
    }
    let placed = if stale {
        std::fs::rename(&tmp, path)
    } else {
        std::fs::hard_link(&tmp, path)
    };
    placed.map_err(|source| UnixBindError::Place {
        path: path.to_path_buf(),
        source,
    })?;
    // `private` (and the temporary name, if linked) goes when dropped here.
    drop(private);
    if stale {
        tracing::info!(
            path = %path.display(),
            "replaced a stale socket file: no process was listening on it"
        );
    }
    let listener = std_listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(std_listener))
        .map_err(|source| UnixBindError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Bound {
        listener,
        replaced_stale: stale,
    })
}

/// `Ok(false)`: nothing there; `Ok(true)`: a dead socket to replace.
fn check_path(path: &Path) -> Result<bool, UnixBindError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(UnixBindError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(UnixBindError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    // Non-blocking: a live listener with a full backlog must not hang us.
    let probe =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).and_then(|s| {
            s.set_nonblocking(true)?;
            s.connect(&socket2::SockAddr::unix(path)?)
        });
    match probe {
        // Something accepted (or queued) the connection: it is alive.
        Ok(()) => Err(UnixBindError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(UnixBindError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        // Removed between the two looks: nothing there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(UnixBindError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Modes both tighter and looser than what the umask would give
    /// (0777 & ~umask for a socket): the result is exactly what was asked.
    #[tokio::test]
    async fn mode_is_exactly_the_one_asked() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o660, 0o666, 0o777, 0o000] {
            let path = dir.path().join(format!("s{mode:o}.sock"));
            let b = bind(&path, Access::mode(mode)).unwrap();
            assert_eq!(mode_of(&path), mode, "asked {mode:o}");
            assert!(!b.replaced_stale);
        }
        // No private directory is left behind.
        assert!(entries(dir.path()).iter().all(|e| e.ends_with(".sock")));
    }

    #[tokio::test]
    async fn the_socket_accepts_connections_at_its_final_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.sock");
        let b = bind(&path, Access::OWNER_ONLY).unwrap();
        let (c, s) = tokio::join!(tokio::net::UnixStream::connect(&path), b.listener.accept());
        c.unwrap();
        s.unwrap();
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // A killed process leaves its socket file; dropping a std listener
        // does the same (it does not unlink).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let b = bind(&path, Access::mode(0o640)).unwrap();
        assert!(b.replaced_stale);
        assert_eq!(mode_of(&path), 0o640);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        assert_eq!(entries(dir.path()), ["g.sock"]);
    }

    #[tokio::test]
    async fn live_socket_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let live = bind(&path, Access::OWNER_ONLY).unwrap();
        let e = bind(&path, Access::OWNER_ONLY).unwrap_err();
        assert!(matches!(e, UnixBindError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("another process is listening on"));
        // The first listener still owns the path.
        let (c, s) = tokio::join!(
            tokio::net::UnixStream::connect(&path),
            live.listener.accept()
        );
        c.unwrap();
        s.unwrap();
        assert_eq!(entries(dir.path()), ["g.sock"]);
    }

    #[tokio::test]
    async fn files_that_are_not_sockets_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "keep me").unwrap();
        let e = bind(&file, Access::OWNER_ONLY).unwrap_err();
        assert!(matches!(e, UnixBindError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

        let sub = dir.path().join("a-directory");
        std::fs::create_dir(&sub).unwrap();
        let e = bind(&sub, Access::OWNER_ONLY).unwrap_err();
        assert!(matches!(e, UnixBindError::NotASocket { .. }), "{e}");
        assert!(sub.is_dir());

        // A symlink to a dead socket is not ours to follow or replace.
        let target = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&target).unwrap());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = bind(&link, Access::OWNER_ONLY).unwrap_err();
        assert!(matches!(e, UnixBindError::NotASocket { .. }), "{e}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            entries(dir.path()),
            ["a-directory", "dead.sock", "link.sock", "notes.txt"]
        );
    }

    #[tokio::test]
    async fn a_missing_parent_directory_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope/g.sock");
        let e = bind(&path, Access::OWNER_ONLY).unwrap_err();
        assert!(matches!(e, UnixBindError::PrivateDir { .. }), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
