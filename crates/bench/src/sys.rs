//! What the benchmark reads from the system: CPU time and RSS of processes
//! (from /proc, no libc: the crate forbids unsafe code), listening sockets,
//! free ports, installed programs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Kernel clock ticks per second in /proc/PID/stat. USER_HZ is fixed at 100
/// in the Linux ABI on every architecture this project runs on.
const USER_HZ: f64 = 100.0;

/// How often `wait_listening` looks at /proc/net/tcp.
const LISTEN_POLL: Duration = Duration::from_millis(10);

/// User + system CPU seconds of process `pid` so far, all its threads
/// included (fields 14 and 15 of /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Sum of `cpu_seconds` over `pids` (a process that is gone counts 0).
pub fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_seconds(p)).sum()
}

/// Resident set size of `pid` in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open descriptors of a process (0 if it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A port on 127.0.0.1 that nothing listens on right now (for peers that
/// cannot report the port they bound, like stunnel and socat).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether some socket listens on 127.0.0.1:`port` (or 0.0.0.0), per
/// /proc/net/tcp. Looking instead of connecting: a probe connection would
/// be the one connection a non-forking socat serves.
fn listening(port: u16) -> bool {
    const TCP_LISTEN: &str = "0A";
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[3] == TCP_LISTEN && want.iter().any(|w| w == f[1])
    })
}

/// Waits until something listens on 127.0.0.1:`port`.
pub async fn wait_listening(port: u16, timeout: Duration, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !listening(port) {
        if tokio::time::Instant::now() > deadline {
            bail!("{what} is not listening on 127.0.0.1:{port} after {timeout:?}");
        }
        tokio::time::sleep(LISTEN_POLL).await;
    }
    Ok(())
}

/// The first of `names` found in PATH (or /usr/bin, /usr/sbin).
pub fn which(names: &[&str]) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    names.iter().find_map(|n| {
        dirs.iter()
            .cloned()
            .chain([
                "/usr/bin".into(),
                "/usr/sbin".into(),
                "/usr/local/bin".into(),
            ])
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

/// Median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 0 {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    })
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_and_rss_are_readable() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(100.0));
        assert_eq!(quantile(&v, 0.99), Some(198.0));
    }

    #[tokio::test]
    async fn sees_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        wait_listening(port, Duration::from_secs(1), "test")
            .await
            .unwrap();
    }
}
