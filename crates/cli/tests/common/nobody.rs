//! Another local user: tests that prove a socket is closed to other users
//! connect as `nobody` through `runuser`, which needs root (CI runs the
//! tests as root). Not being root fails the test; it never skips.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub fn assert_root() {
    let me = std::fs::metadata("/proc/self").unwrap();
    assert_eq!(
        me.uid(),
        0,
        "these tests connect as user nobody through runuser: run them as root (CI does)"
    );
}

/// Tries to connect to the unix socket `path` as user nobody. Returns
/// socat's complaint; panics if the connection succeeded.
pub fn connect_as_nobody(path: &Path) -> String {
    assert_root();
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "socat", "-u", "OPEN:/dev/null"])
        .arg(format!("UNIX-CONNECT:{}", path.display()))
        .output()
        .expect("runuser and socat (scripts/setup.sh installs socat)");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "user nobody connected to {}: {err}",
        path.display()
    );
    err
}
