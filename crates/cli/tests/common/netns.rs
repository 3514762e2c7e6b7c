//! A network path a test can cut for real: two network namespaces joined
//! by a veth pair on a private /30, created by the test and deleted when
//! dropped (also when the test fails). Processes run inside one with
//! `ip netns exec`; unix sockets (paths in the file system) still reach
//! them from the root namespace, so the QEMUs stay there.
//!
//! The cut takes the link down on one side and blackholes the peer's
//! address there: packets vanish, nobody gets a reset or an ICMP error,
//! as when a cable or a switch dies (`tc netem` does not work on the
//! machines these tests run on). Only timeouts end the connections then.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::gateway::{Miggate, BIN};

/// Address of side A (the source gateway's) and side B on the veth pair.
/// Private to the two namespaces, so every pair can use the same ones.
pub const ADDR_A: &str = "10.213.0.1";
pub const ADDR_B: &str = "10.213.0.2";
const PREFIX: &str = "/30";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces `a` and `b`, a veth pair between them.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    dev_a: String,
    dev_b: String,
    created: Vec<String>,
}

/// `ip ARGS...`, panicking with its stderr.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2, apt-get install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetnsPair {
    /// Creates both namespaces (named after this process and a counter),
    /// the veth pair and the addresses. Fails with what to do where
    /// `ip netns` is unavailable (it needs root, or CAP_SYS_ADMIN and
    /// CAP_NET_ADMIN).
    pub fn create() -> NetnsPair {
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut p = NetnsPair {
            a: format!("miggate-{pid}-{n}-a"),
            b: format!("miggate-{pid}-{n}-b"),
            // Interface names: 15 bytes at most.
            dev_a: format!("mg{pid}a{n}"),
            dev_b: format!("mg{pid}b{n}"),
            created: Vec::new(),
        };
        for ns in [p.a.clone(), p.b.clone()] {
            let out = Command::new("ip").args(["netns", "add", &ns]).output();
            match out {
                Ok(o) if o.status.success() => p.created.push(ns),
                Ok(o) => panic!(
                    "this test needs network namespaces: `ip netns add {ns}` failed: {} \
                     (run the tests as root, with iproute2)",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => panic!(
                    "this test needs network namespaces: cannot run `ip netns add` ({e}): \
                     apt-get install iproute2, and run the tests as root"
                ),
            }
        }
        let (a, b, da, db) = (&p.a, &p.b, &p.dev_a, &p.dev_b);
        ip(&["link", "add", da, "type", "veth", "peer", "name", db]);
        ip(&["link", "set", da, "netns", a]);
        ip(&["link", "set", db, "netns", b]);
        for (ns, dev, addr) in [(a, da, ADDR_A), (b, db, ADDR_B)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}{PREFIX}"),
                "dev",
                dev,
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        p
    }

    /// The `miggate` binary run inside namespace `ns`: a wrapper script in
    /// `dir` that execs `ip netns exec NS miggate "$@"`, so the process
    /// the lab starts keeps its pid through both execs.
    pub fn miggate_in(&self, ns: &str, dir: &Path) -> Miggate {
        use std::os::unix::fs::PermissionsExt;
        let path: PathBuf = dir.join(format!("miggate-in-{ns}"));
        let script = format!("#!/bin/sh\nexec ip netns exec '{ns}' '{BIN}' \"$@\"\n");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        Miggate::new(path)
    }

    /// Cuts the path: side A's link down and B's address blackholed there.
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", &self.dev_a, "down"]);
        ip(&["-n", &self.a, "route", "add", "blackhole", ADDR_B]);
    }

    /// Brings the path back.
    pub fn restore(&self) {
        ip(&["-n", &self.a, "route", "del", "blackhole", ADDR_B]);
        ip(&["-n", &self.a, "link", "set", &self.dev_a, "up"]);
    }
}

impl Drop for NetnsPair {
    /// Deleting a namespace deletes its end of the veth pair, and so the
    /// pair. Errors are printed, not raised: this may run while unwinding.
    fn drop(&mut self) {
        for ns in &self.created {
            match Command::new("ip").args(["netns", "del", ns]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "ip netns del {ns}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("ip netns del {ns}: {e}"),
            }
        }
    }
}
