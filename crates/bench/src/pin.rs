//! `--pin`: the source side of a migration (source QEMU, source gateway or
//! stunnel/socat client) on one CPU set, the target side on another, as if
//! they ran on two hosts, so that each side's CPU per GiB is what one
//! hypervisor would pay.
//!
//! A process is pinned after it started, thread by thread
//! (`sched_setaffinity` on every task in /proc/PID/task): threads it creates
//! later (QEMU's migration and multifd threads, tokio's blocking pool)
//! inherit the mask of the thread that creates them.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rustix::process::Pid;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// A set of CPUs as `taskset -c` spells it: `0`, `0-3`, `0,2,4-5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    #[cfg(test)]
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    fn cpu_set(&self) -> CpuSet {
        let mut s = CpuSet::new();
        for &c in &self.0 {
            s.set(c);
        }
        s
    }
}

impl FromStr for CpuList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let num = |n: &str| {
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c < CpuSet::MAX_CPU)
                    .ok_or_else(|| format!("{n:?} in {s:?} is not a CPU number"))
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("CPU range {part:?} runs backwards"));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(num(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Runs of consecutive CPUs as ranges, like taskset prints them.
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Where each side runs: `SOURCE/TARGET` CPU lists, e.g. `0/1` or
/// `0-7/8-15`; `halves` splits the CPUs this process may use in two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinSpec {
    pub source: CpuList,
    pub target: CpuList,
}

/// What `--pin` means without a value.
pub const HALVES: &str = "halves";

impl PinSpec {
    /// Parses `SOURCE/TARGET` or `halves` (split of `available`, the CPUs
    /// this process may run on, lower half to the source).
    pub fn parse(s: &str, available: &[usize]) -> Result<PinSpec, String> {
        let spec = if s == HALVES {
            if available.len() < 2 {
                return Err(format!(
                    "--pin needs two CPUs to split, this process may use {}",
                    available.len()
                ));
            }
            let (a, b) = available.split_at(available.len() / 2);
            PinSpec {
                source: CpuList(a.to_vec()),
                target: CpuList(b.to_vec()),
            }
        } else {
            let (a, b) = s
                .split_once('/')
                .ok_or_else(|| format!("--pin {s:?}: expected SOURCE/TARGET, e.g. 0/1"))?;
            PinSpec {
                source: a.parse()?,
                target: b.parse()?,
            }
        };
        for (side, l) in [("source", &spec.source), ("target", &spec.target)] {
            if l.0.is_empty() {
                return Err(format!("--pin {s:?}: no CPU for the {side} side"));
            }
            if let Some(c) = l.0.iter().find(|c| !available.contains(c)) {
                return Err(format!(
                    "--pin {s:?}: CPU {c} of the {side} side is not one this process may use ({})",
                    CpuList(available.to_vec())
                ));
            }
        }
        if spec.source.0.iter().any(|c| spec.target.0.contains(c)) {
            return Err(format!(
                "--pin {s:?}: the two sides share CPUs (two hosts do not)"
            ));
        }
        Ok(spec)
    }
}

impl fmt::Display for PinSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "source side on CPU {}, target side on CPU {}",
            self.source, self.target
        )
    }
}

/// The CPUs this process may run on.
pub fn available() -> Result<Vec<usize>> {
    let set = sched_getaffinity(None).context("sched_getaffinity of this process")?;
    Ok((0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect())
}

fn tids(pid: u32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let mut v: Vec<i32> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Pins every thread of `pid` to `cpus`, then checks that each one's mask
/// is exactly that (a thread created while the first pass ran is caught by
/// the next; a thread that exits meanwhile is no error).
pub fn pin_process(pid: u32, cpus: &CpuList) -> Result<()> {
    let want = cpus.cpu_set();
    for _ in 0..10 {
        let mut changed = false;
        for tid in tids(pid)? {
            let Some(p) = Pid::from_raw(tid) else {
                continue;
            };
            match sched_getaffinity(Some(p)) {
                Ok(have) if have == want => continue,
                Ok(_) => {}
                // Gone since the listing.
                Err(_) => continue,
            }
            match sched_setaffinity(Some(p), &want) {
                Ok(()) => changed = true,
                Err(rustix::io::Errno::SRCH) => {}
                Err(e) => bail!("sched_setaffinity of thread {tid} of process {pid}: {e}"),
            }
        }
        if !changed {
            return Ok(());
        }
    }
    bail!("process {pid} keeps creating threads: could not pin them all to CPU {cpus}")
}

/// Whether every thread of `pid` may run only on `cpus` (after a run: the
/// threads created during the migration inherited the mask).
pub fn is_pinned(pid: u32, cpus: &CpuList) -> bool {
    let want = cpus.cpu_set();
    tids(pid).is_ok_and(|t| {
        t.iter().all(|&tid| {
            Pid::from_raw(tid)
                .and_then(|p| sched_getaffinity(Some(p)).ok())
                .map_or(true, |have| have == want)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!("0".parse::<CpuList>().unwrap().cpus(), [0]);
        assert_eq!("3,0-2".parse::<CpuList>().unwrap().cpus(), [0, 1, 2, 3]);
        assert_eq!("1,1,2".parse::<CpuList>().unwrap().cpus(), [1, 2]);
        assert_eq!(
            "0-2,5,7-8".parse::<CpuList>().unwrap().to_string(),
            "0-2,5,7-8"
        );
        for bad in ["", "a", "2-1", "-1", "0,,1", "99999"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pin_specs() {
        let two = [0, 1];
        let s = PinSpec::parse("0/1", &two).unwrap();
        assert_eq!((s.source.cpus(), s.target.cpus()), (&[0][..], &[1][..]));
        assert_eq!(PinSpec::parse(HALVES, &two).unwrap(), s);
        let eight: Vec<usize> = (0..8).collect();
        let h = PinSpec::parse(HALVES, &eight).unwrap();
        assert_eq!(
            h.to_string(),
            "source side on CPU 0-3, target side on CPU 4-7"
        );
        // Odd count: the target gets the extra CPU.
        let h = PinSpec::parse(HALVES, &[0, 1, 2]).unwrap();
        assert_eq!((h.source.cpus(), h.target.cpus()), (&[0][..], &[1, 2][..]));
        for bad in ["0", "0/", "/1", "0-1/1", "0/2", "x/1"] {
            assert!(PinSpec::parse(bad, &two).is_err(), "{bad:?} accepted");
        }
        assert!(PinSpec::parse(HALVES, &[0]).is_err());
    }

    #[test]
    fn pins_a_real_process() {
        let cpus = available().unwrap();
        let one = CpuList(vec![cpus[cpus.len() - 1]]);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        if cpus.len() > 1 {
            assert!(!is_pinned(pid, &one), "not pinned before");
        }
        pin_process(pid, &one).unwrap();
        assert!(is_pinned(pid, &one));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
