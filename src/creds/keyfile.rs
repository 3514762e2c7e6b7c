//! Reading a private key file, refused when other users could read it.
//!
//! Like OpenSSH's "UNPROTECTED PRIVATE KEY FILE", a key whose mode grants
//! anything to group or others (`mode & 0o077 != 0`), or that is owned by
//! neither the user miggate runs as nor root, is not used: whoever else can
//! read it can impersonate this host. The file is opened (following
//! symlinks: the file checked is the file read), its metadata taken from
//! the open descriptor, and the key read from that same descriptor, so the
//! file cannot be swapped between the check and the read.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Permission bits a private key may not have: any for group or others.
pub const FORBIDDEN_MODE: u32 = 0o077;

/// Why a private key file was not used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{file}: private key is accessible by other users (mode {mode:04o}, owner {owner}): \
         refusing to use it; run `chmod 600 {path}`",
        file = Shown(path, real),
        path = path.display(),
    )]
    TooOpen {
        path: PathBuf,
        /// The file it resolves to, when `path` is (or goes through) a symlink.
        real: Option<PathBuf>,
        mode: u32,
        owner: User,
    },
    #[error(
        "{file}: private key is owned by {owner}, not by {me} (the user miggate runs as) or root \
         (mode {mode:04o}): refusing to use it; run `chown {me_id} {path}` and `chmod 600 {path}`, \
         or run miggate as its owner",
        file = Shown(path, real),
        path = path.display(),
        me_id = me.uid,
    )]
    NotOwner {
        path: PathBuf,
        real: Option<PathBuf>,
        mode: u32,
        owner: User,
        me: User,
    },
}

impl KeyFileError {
    /// The file named in the error (as given, not resolved).
    pub fn path(&self) -> &Path {
        match self {
            KeyFileError::Read { path, .. }
            | KeyFileError::TooOpen { path, .. }
            | KeyFileError::NotOwner { path, .. } => path,
        }
    }
}

/// A uid, with its name when /etc/passwd has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub name: Option<String>,
}

impl User {
    fn of(uid: u32) -> User {
        User {
            uid,
            name: user_name(uid),
        }
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// `path`, or `path (-> real)` when it resolves elsewhere.
struct Shown<'a>(&'a PathBuf, &'a Option<PathBuf>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(real) => write!(f, "{} (-> {})", self.0.display(), real.display()),
            None => write!(f, "{}", self.0.display()),
        }
    }
}

/// Reads the private key file `path` after checking, on the open
/// descriptor, that only its owner may access it and that its owner is the
/// user we run as or root. The contents are zeroed when dropped.
pub fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let io_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    check(path, &file)?;
    let mut pem = Zeroizing::new(Vec::new());
    file.read_to_end(&mut pem).map_err(io_err)?;
    Ok(pem)
}

/// The checks of [`read_private`], on an already open file (fstat).
fn check(path: &Path, file: &File) -> Result<(), KeyFileError> {
    let meta = file.metadata().map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    let uid = meta.uid();
    let me = rustix::process::geteuid().as_raw();
    // Only for the message: where a symlink led.
    let real = || {
        through_symlink(path)
            .then(|| std::fs::canonicalize(path).ok())
            .flatten()
    };
    if uid != me && uid != 0 {
        return Err(KeyFileError::NotOwner {
            path: path.to_path_buf(),
            real: real(),
            mode,
            owner: User::of(uid),
            me: User::of(me),
        });
    }
    if mode & FORBIDDEN_MODE != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.to_path_buf(),
            real: real(),
            mode,
            owner: User::of(uid),
        });
    }
    Ok(())
}

/// Whether `path`, or a directory on the way to it, is a symlink.
fn through_symlink(path: &Path) -> bool {
    let mut cur = PathBuf::new();
    path.components().any(|part| {
        cur.push(part);
        std::fs::symlink_metadata(&cur).is_ok_and(|m| m.is_symlink())
    })
}

/// The name of `uid` in /etc/passwd, if it has one (no NSS: this is only
/// for the message).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn owner_only_modes_are_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o700] {
            let path = key_file(dir.path(), &format!("k{mode:o}.pem"), mode);
            let pem = read_private(&path).unwrap();
            assert!(pem.starts_with(b"-----BEGIN"));
        }
    }

    #[test]
    fn group_or_other_bits_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o644, 0o610, 0o601, 0o660] {
            let path = key_file(dir.path(), &format!("k{mode:o}.pem"), mode);
            let err = read_private(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::TooOpen { mode: m, real: None, .. } if m == mode),
                "{err:?}"
            );
            let msg = err.to_string();
            let shown = path.display().to_string();
            assert!(msg.starts_with(&shown), "{msg}");
            assert!(msg.contains(&format!("mode 0{mode:o}")), "{msg}");
            let me = rustix::process::geteuid().as_raw();
            assert!(msg.contains(&format!("(uid {me})")), "{msg}");
            assert!(msg.contains(&format!("chmod 600 {shown}")), "{msg}");
        }
    }

    /// The file checked is the file read: a symlink's own mode (0777) does
    /// not matter, its target's does, and the message says where it leads.
    #[test]
    fn a_symlink_is_judged_by_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let open = key_file(dir.path(), "real-open.pem", 0o644);
        let link = dir.path().join("server-key.pem");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let err = read_private(&link).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, KeyFileError::TooOpen { mode: 0o644, .. }),
            "{msg}"
        );
        assert!(msg.contains("server-key.pem (-> "), "{msg}");
        assert!(msg.contains("real-open.pem)"), "{msg}");
        assert!(msg.contains("mode 0644"), "{msg}");

        let closed = key_file(dir.path(), "real-closed.pem", 0o600);
        let link2 = dir.path().join("client-key.pem");
        std::os::unix::fs::symlink(&closed, &link2).unwrap();
        read_private(&link2).unwrap();
    }

    /// As root (CI runs the tests as root), a key owned by another user is
    /// refused even at 0600; as another user, a key owned by root is fine.
    #[test]
    fn a_key_of_another_user_is_refused() {
        let me = rustix::process::geteuid().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), "k.pem", 0o600);
        let nobody = 65534;
        if me != 0 {
            // chown needs root; the check itself is the same.
            eprintln!("not root: cannot chown, testing only that our own key is read");
            read_private(&path).unwrap();
            return;
        }
        std::os::unix::fs::chown(&path, Some(nobody), None).unwrap();
        let err = read_private(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, KeyFileError::NotOwner { owner, mode: 0o600, .. } if owner.uid == nobody),
            "{msg}"
        );
        assert!(msg.contains("uid 65534"), "{msg}");
        assert!(msg.contains("mode 0600"), "{msg}");
        assert!(
            msg.contains(&format!("chown 0 {}", path.display())),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
        // Back to root: accepted again.
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        read_private(&path).unwrap();
    }

    #[test]
    fn a_missing_key_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_private(&dir.path().join("absent.pem")).unwrap_err();
        assert!(matches!(err, KeyFileError::Read { .. }), "{err:?}");
    }
}
