//! The daemon's runtime directory. The target QEMUs of QMP-forward
//! registrations listen in it (`incoming-<uuid>.sock`, created by QEMU with
//! QEMU's umask), and the API socket is there by default. Whoever can
//! connect to an incoming socket is that QEMU's main channel, around every
//! check the gateway makes, so the directory is the access control: it is
//! the daemon's alone.
//!
//! Mode 0700, or 0710 when the API socket inside it is meant for a group
//! (`api.socket_mode` with group bits): the API's users must reach their
//! socket, and that costs nothing, since they can register (admit) any
//! migration anyway; without read permission they cannot list the
//! directory, and an incoming socket's name carries a random UUID told
//! only to its QEMU. Not 0750: listing would hand those names out. The
//! target QEMU therefore runs as the daemon's user (or root) to create its
//! socket here.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create the runtime directory {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot inspect the runtime directory {}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the runtime directory {} is a symbolic link: give the directory's own path", path.display())]
    Symlink { path: PathBuf },
    #[error("the runtime directory {} exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "the runtime directory {} is owned by uid {owner}, not by the daemon (uid {daemon}): \
         its owner could reach the target QEMUs' incoming sockets; chown it to the daemon's user or remove it",
        path.display()
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        daemon: u32,
    },
    #[error(
        "the runtime directory {} has mode {mode:04o}, more open than {max:04o}: other users could \
         reach the target QEMUs' incoming sockets in it; chmod {max:04o} it, or remove it and let the daemon create it",
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32, max: u32 },
}

/// The most open mode the runtime directory may have (see the module doc).
pub fn max_mode(group_reaches_api: bool) -> u32 {
    if group_reaches_api {
        0o710
    } else {
        0o700
    }
}

/// Creates the runtime directory with `max` (its parents as the umask says),
/// or checks the one that exists: a directory, owned by the daemon, no more
/// open than `max`. Refusing beats fixing: a directory someone else made or
/// opened may already hold their sockets.
pub fn prepare(path: &Path, max: u32) -> Result<(), RuntimeDirError> {
    let create = |source| RuntimeDirError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(create)?;
    }
    match std::fs::DirBuilder::new().mode(max).create(path) {
        Ok(()) => {
            // The umask may have taken bits off `max` (0710 under 0077):
            // from more closed to final, never through more open.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(max)).map_err(create)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create(e)),
    }
    check(path, max, rustix::process::geteuid().as_raw())
}

fn check(path: &Path, max: u32, daemon: u32) -> Result<(), RuntimeDirError> {
    let m = std::fs::symlink_metadata(path).map_err(|source| RuntimeDirError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    if m.file_type().is_symlink() {
        return Err(RuntimeDirError::Symlink { path });
    }
    if !m.is_dir() {
        return Err(RuntimeDirError::NotADirectory { path });
    }
    if m.uid() != daemon {
        return Err(RuntimeDirError::Owner {
            path,
            owner: m.uid(),
            daemon,
        });
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o777 & !max != 0 {
        return Err(RuntimeDirError::TooOpen { path, mode, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn created_private_with_its_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/run");
        prepare(&dir, max_mode(false)).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // Found as it was left: accepted again.
        prepare(&dir, max_mode(false)).unwrap();
        let dir = tmp.path().join("api-group");
        prepare(&dir, max_mode(true)).unwrap();
        assert_eq!(mode(&dir), 0o710);
    }

    #[test]
    fn an_existing_directory_more_open_or_not_ours_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare(&dir, max_mode(false)).unwrap_err().to_string();
        assert!(
            e.ends_with("has mode 0755, more open than 0700: other users could reach the target QEMUs' incoming sockets in it; chmod 0700 it, or remove it and let the daemon create it"),
            "{e}"
        );
        assert_eq!(mode(&dir), 0o755, "refused, not changed");
        // 0710 only where the API's group must reach its socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o710)).unwrap();
        assert!(prepare(&dir, max_mode(false)).is_err());
        prepare(&dir, max_mode(true)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(prepare(&dir, max_mode(true)).is_err());

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let owner = std::fs::metadata(&dir).unwrap().uid();
        let e = check(&dir, 0o700, owner + 1).unwrap_err();
        assert!(
            matches!(e, RuntimeDirError::Owner { owner: o, .. } if o == owner),
            "{e}"
        );

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            prepare(&link, 0o700),
            Err(RuntimeDirError::Symlink { .. })
        ));
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            prepare(&file, 0o700),
            Err(RuntimeDirError::NotADirectory { .. })
        ));
    }
}
