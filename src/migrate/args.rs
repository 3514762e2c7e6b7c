//! The command line of `miggate migrate` and its parsers; arguments built
//! in code (the demo, tests) get the same bounds from [`MigrateArgs::check`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::net::{Endpoint, HostPort};

/// Default `--x509-dir`: the layout QEMU's `tls-creds-x509` reads, in the
/// place the README's examples install it (QEMU's own default is
/// /etc/pki/qemu; a symlink makes both the same).
pub const DEFAULT_X509_DIR: &str = "/etc/pki/miggate";

/// QEMU's own maximum `downtime-limit` (MAX_MIGRATE_DOWNTIME: 2000 s), in ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// `--postcopy-after-passes` by default: the first pass sends all of RAM
/// whatever the guest does; the second, only what was dirtied meanwhile,
/// is the first that can converge. Not converging there is the sign.
pub const DEFAULT_POSTCOPY_AFTER_PASSES: u64 = 2;
/// Beyond this, precopy has had every chance: the option's upper bound.
pub const MAX_POSTCOPY_AFTER_PASSES: u64 = 1000;

#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The source QEMU's QMP socket: unix:PATH.
    #[arg(long, value_parser = parse_qmp)]
    pub source_qmp: PathBuf,
    /// The target's miggate daemon: unix:PATH of its API socket, or
    /// https://HOST:PORT (with --api-x509-dir).
    #[arg(
        long,
        required_unless_present = "native_tls",
        conflicts_with = "native_tls"
    )]
    pub target: Option<String>,
    /// PKI directory with the admin client certificate for an https:// daemon.
    #[arg(long)]
    pub api_x509_dir: Option<PathBuf>,
    /// The target QEMU's QMP socket, unix:PATH: as the daemon sees it (gateway
    /// mode: the daemon issues migrate-incoming there), or local (--native-tls).
    #[arg(long, value_parser = parse_qmp, required_unless_present_any = ["forward", "recover"])]
    pub target_qmp: Option<PathBuf>,
    /// Where the target QEMU already listens (tcp:HOST:PORT or unix:PATH on
    /// the daemon's host), instead of --target-qmp.
    #[arg(long, conflicts_with_all = ["target_qmp", "native_tls"])]
    pub forward: Option<Endpoint>,
    /// PKI directory in QEMU's layout with this side's client certificate.
    #[arg(long, default_value = DEFAULT_X509_DIR)]
    pub x509_dir: PathBuf,
    /// Gateway mode: the target gateway, HOST:PORT (default: the daemon's
    /// first listener). --native-tls: where the target QEMU listens
    /// (default 127.0.0.1 on a free port).
    #[arg(long)]
    pub connect: Option<String>,
    /// Name the target's certificate must carry; default: the host of --connect.
    #[arg(long)]
    pub tls_hostname: Option<String>,
    /// multifd channels (0: a single channel; at most 63, the daemon takes
    /// 1 + 63 channels per migration).
    #[arg(long, default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..i64::from(crate::control::server::MAX_CHANNELS)))]
    pub multifd: u8,
    /// Bandwidth cap in bytes/s (suffixes K, M, G: powers of 1024); default unlimited.
    #[arg(long, value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Longest acceptable pause of the guest at the end, in milliseconds
    /// (at most 2000000, QEMU's own limit).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_DOWNTIME_LIMIT_MS))]
    pub downtime_limit: Option<u64>,
    /// Seconds the registration (and its ticket) stays valid unused (1 to 86400).
    #[arg(long, default_value_t = crate::control::types::DEFAULT_EXPIRES_IN_SECS,
          value_parser = clap::value_parser!(u64).range(1..=crate::control::server::MAX_EXPIRES_IN_SECS))]
    pub expires_in: u64,
    /// Seconds a silent peer is tolerated by the source gateway (1 to 3600).
    #[arg(long, default_value_t = crate::timeouts::DEFAULT_STALL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=crate::timeouts::MAX_STALL_SECS))]
    pub stall_timeout: u64,
    /// Refresh each channel's TLS 1.3 keys after every N MiB sent, at most
    /// one update per 250 ms (as `miggate source --rekey-after-mib`).
    #[arg(long, value_name = "MIB", conflicts_with = "native_tls",
          value_parser = clap::value_parser!(u64).range(1..=crate::timeouts::MAX_REKEY_AFTER_MIB))]
    pub rekey_after_mib: Option<u64>,
    /// Use QEMU's own TLS on both ends: no gateways, no daemon.
    #[arg(long)]
    pub native_tls: bool,
    /// --native-tls: the target QEMU's PKI directory (default: --x509-dir).
    #[arg(long, requires = "native_tls")]
    pub target_x509_dir: Option<PathBuf>,
    /// --native-tls: allow this DN instead of our client certificate's.
    #[arg(long, requires = "native_tls", conflicts_with = "authz_list_file")]
    pub authz_identity: Option<String>,
    /// --native-tls: QEMU authz-list JSON file for the target's tls-authz.
    #[arg(long, requires = "native_tls")]
    pub authz_list_file: Option<PathBuf>,
    /// Switch to postcopy when precopy has not converged after
    /// --postcopy-after-passes passes: the VM then runs on the target and
    /// fetches the pages it lacks from the source (postcopy-ram on both
    /// QEMUs). Once switched, the migration cannot be cancelled.
    #[arg(long, conflicts_with = "native_tls")]
    pub postcopy: bool,
    /// --postcopy: passes over RAM precopy gets to converge (1 to 1000;
    /// pass 1 sends all of RAM).
    #[arg(long, value_name = "N", requires = "postcopy",
          default_value_t = DEFAULT_POSTCOPY_AFTER_PASSES,
          value_parser = clap::value_parser!(u64).range(1..=MAX_POSTCOPY_AFTER_PASSES))]
    pub postcopy_after_passes: u64,
    /// --postcopy: also postcopy-preempt (the pages the target faults on
    /// travel on a channel of their own, ahead of the background copy).
    #[arg(long, requires = "postcopy")]
    pub postcopy_preempt: bool,
    /// Recover migration ID, paused in postcopy (both QEMUs
    /// postcopy-paused): the daemon makes the target QEMU listen again and
    /// issues a new one-shot ticket, and the source QEMU resumes through a
    /// new source gateway (with --target and --source-qmp, as the first run).
    #[arg(long, value_name = "ID",
          conflicts_with_all = ["native_tls", "target_qmp", "forward", "postcopy", "multifd"])]
    pub recover: Option<String>,
    /// Copy the VM's writable disks too (storage migration without shared
    /// storage): the daemon exports the target QEMU's nodes of the same
    /// names over NBD, the source mirrors each disk into them through the
    /// gateway before the RAM migration, and the copies complete at the
    /// switch-over. Needs --target-qmp.
    #[arg(long, conflicts_with_all = ["native_tls", "forward", "recover", "postcopy"])]
    pub copy_storage: bool,
    /// --copy-storage of this disk only (its block node name on both
    /// QEMUs); repeat for each. Implies --copy-storage.
    #[arg(long, value_name = "NODE",
          conflicts_with_all = ["native_tls", "forward", "recover", "postcopy"])]
    pub disk: Vec<String>,
    /// One JSON object per line on stdout: steps, progress, and a final result.
    #[arg(long)]
    pub json: bool,
}

impl MigrateArgs {
    /// The options every migration starts from; the demo and tests fill in the rest.
    pub fn new(source_qmp: PathBuf, x509_dir: PathBuf) -> MigrateArgs {
        MigrateArgs {
            source_qmp,
            target: None,
            api_x509_dir: None,
            target_qmp: None,
            forward: None,
            x509_dir,
            connect: None,
            tls_hostname: None,
            multifd: 0,
            max_bandwidth: None,
            downtime_limit: None,
            expires_in: crate::control::types::DEFAULT_EXPIRES_IN_SECS,
            stall_timeout: crate::timeouts::DEFAULT_STALL.as_secs(),
            rekey_after_mib: None,
            native_tls: false,
            target_x509_dir: None,
            authz_identity: None,
            authz_list_file: None,
            postcopy: false,
            postcopy_after_passes: DEFAULT_POSTCOPY_AFTER_PASSES,
            postcopy_preempt: false,
            recover: None,
            copy_storage: false,
            disk: Vec::new(),
            json: false,
        }
    }

    /// Disks are copied (`--copy-storage` or `--disk`).
    pub fn copies_storage(&self) -> bool {
        self.copy_storage || !self.disk.is_empty()
    }

    /// Within range: clap bounds the command line, `check` arguments
    /// built in code (demo, tests).
    pub(super) fn stall(&self) -> Duration {
        Duration::from_secs(self.stall_timeout)
    }

    /// Checks what clap checks on the command line, for arguments built in
    /// code too, and says which mode the arguments ask for, so that the
    /// steps after it need not check again.
    pub(super) fn check(&self) -> Result<Plan<'_>, ArgsError> {
        let plan = match (
            &self.recover,
            self.native_tls,
            &self.target,
            &self.target_qmp,
            &self.forward,
        ) {
            (Some(_), true, ..) => return Err(ArgsError::RecoverNative),
            (Some(_), false, None, ..) => return Err(ArgsError::NoTarget),
            (Some(id), false, Some(target), ..) => Plan::Recover { target, id },
            (None, true, _, Some(qmp), _) => Plan::Native { target_qmp: qmp },
            (None, true, _, None, _) => return Err(ArgsError::NativeNeedsTargetQmp),
            (None, false, None, _, _) => return Err(ArgsError::NoTarget),
            (None, false, Some(t), Some(qmp), _) => Plan::Gateway {
                target: t,
                forward: TargetForward::Qmp(qmp),
            },
            (None, false, Some(t), None, Some(ep)) => Plan::Gateway {
                target: t,
                forward: TargetForward::Endpoint(ep),
            },
            (None, false, Some(_), None, None) => return Err(ArgsError::NoForward),
        };
        use crate::timeouts::{bounded_secs, OutOfRange, MAX_REKEY_AFTER_MIB, MAX_STALL_SECS};
        bounded_secs("--stall-timeout", self.stall_timeout, 1, MAX_STALL_SECS)?;
        bounded_secs(
            "--expires-in",
            self.expires_in,
            1,
            crate::control::server::MAX_EXPIRES_IN_SECS,
        )?;
        if let Some(m) = self
            .rekey_after_mib
            .filter(|m| !(1..=MAX_REKEY_AFTER_MIB).contains(m))
        {
            return Err(ArgsError::Range(OutOfRange {
                field: "--rekey-after-mib".into(),
                value: m,
                min: 1,
                max: MAX_REKEY_AFTER_MIB,
                unit: "MiB",
            }));
        }
        if u32::from(self.multifd) >= crate::control::server::MAX_CHANNELS {
            return Err(ArgsError::AtMost {
                option: "--multifd",
                max: u64::from(crate::control::server::MAX_CHANNELS - 1),
                unit: "",
                value: self.multifd.into(),
            });
        }
        if self.copies_storage() {
            let qmp = matches!(
                plan,
                Plan::Gateway {
                    forward: TargetForward::Qmp(_),
                    ..
                }
            );
            if !qmp || self.postcopy {
                return Err(ArgsError::StorageNeedsTargetQmp);
            }
            if let Some(bad) = self
                .disk
                .iter()
                .find(|d| !crate::qmp::storage::node_name_ok(d))
            {
                return Err(ArgsError::DiskName(bad.clone()));
            }
        }
        if self.postcopy_preempt && !self.postcopy {
            return Err(ArgsError::PreemptNeedsPostcopy);
        }
        if self.postcopy && self.native_tls {
            return Err(ArgsError::PostcopyNative);
        }
        if !(1..=MAX_POSTCOPY_AFTER_PASSES).contains(&self.postcopy_after_passes) {
            return Err(ArgsError::Range(OutOfRange {
                field: "--postcopy-after-passes".into(),
                value: self.postcopy_after_passes,
                min: 1,
                max: MAX_POSTCOPY_AFTER_PASSES,
                unit: "passes",
            }));
        }
        if let Some(ms) = self.downtime_limit.filter(|ms| *ms > MAX_DOWNTIME_LIMIT_MS) {
            return Err(ArgsError::AtMost {
                option: "--downtime-limit",
                max: MAX_DOWNTIME_LIMIT_MS,
                unit: " ms",
                value: ms,
            });
        }
        Ok(plan)
    }
}

/// Arguments that cannot work together or are out of range (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("--native-tls needs --target-qmp (the target QEMU's local QMP socket)")]
    NativeNeedsTargetQmp,
    #[error("give --target (the target's miggate daemon) or --native-tls")]
    NoTarget,
    #[error("give --target-qmp or --forward")]
    NoForward,
    #[error("--postcopy-preempt needs --postcopy")]
    PreemptNeedsPostcopy,
    // native.rs prepares the target QEMU without postcopy-ram.
    #[error("--postcopy goes through the target's daemon: not with --native-tls")]
    PostcopyNative,
    #[error("--recover goes through the target's daemon: not with --native-tls")]
    RecoverNative,
    #[error("--copy-storage and --disk need --target and --target-qmp (the daemon exports the target QEMU's disks), without --postcopy")]
    StorageNeedsTargetQmp,
    #[error("--disk {0:?} is not a QEMU block node name")]
    DiskName(String),
    #[error(transparent)]
    Range(#[from] crate::timeouts::OutOfRange),
    #[error("{option} must be at most {max}{unit}, not {value}")]
    AtMost {
        option: &'static str,
        max: u64,
        unit: &'static str,
        value: u64,
    },
}

/// The mode the arguments ask for, with what that mode needs.
#[derive(Debug, Clone, Copy)]
pub enum Plan<'a> {
    /// Through the target's miggate daemon (`--target`).
    Gateway {
        target: &'a str,
        forward: TargetForward<'a>,
    },
    /// QEMU's own TLS on both ends.
    Native { target_qmp: &'a Path },
    /// Recovery of a registered migration paused in postcopy.
    Recover { target: &'a str, id: &'a str },
}

/// Where the daemon sends the stream: a target QEMU it prepares over QMP,
/// or an endpoint where the target QEMU already listens.
#[derive(Debug, Clone, Copy)]
pub enum TargetForward<'a> {
    Qmp(&'a Path),
    Endpoint(&'a Endpoint),
}

/// An option value clap could not take (its message ends up after
/// `invalid value '...' for '--option':`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("a QMP socket is unix:PATH")]
    EmptyQmp,
    #[error("{0:?}: a QMP socket is unix:PATH")]
    NotUnix(String),
    #[error("{given:?}: unknown unit {unit:?} (K, M, G, T)")]
    Unit { given: String, unit: char },
    #[error("{0:?} is not a size in bytes (e.g. 100M)")]
    NotSize(String),
    #[error("a bandwidth of 0 would never finish")]
    Zero,
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// `unix:PATH` (a bare absolute path is accepted too).
pub fn parse_qmp(s: &str) -> Result<PathBuf, ValueError> {
    match s.strip_prefix("unix:").unwrap_or(s) {
        "" => Err(ValueError::EmptyQmp),
        p if s.starts_with("unix:") || p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(ValueError::NotUnix(s.to_string())),
    }
}

/// Bytes, with an optional K/M/G/T suffix (powers of 1024, "iB" optional).
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(ValueError::Unit {
                        given: s.to_string(),
                        unit: c,
                    })
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| ValueError::NotSize(s.to_string()))?;
    match n.checked_shl(shift).filter(|v| v >> shift == n) {
        Some(0) => Err(ValueError::Zero),
        Some(v) => Ok(v),
        None => Err(ValueError::TooLarge(s.to_string())),
    }
}

/// HOST of HOST:PORT (brackets of an IPv6 literal removed); a string that
/// is not HOST:PORT is returned whole, to fail where it is used.
pub(crate) fn host_of(addr: &str) -> String {
    addr.parse::<HostPort>()
        .map_or_else(|_| addr.to_string(), |hp| hp.host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_needs_a_daemon_and_is_bounded_too() {
        let mut a = MigrateArgs::new("/q".into(), "/pki".into());
        a.recover = Some("m1".into());
        assert_eq!(a.check().unwrap_err(), ArgsError::NoTarget);
        a.target = Some("unix:/run/miggate/api.sock".into());
        assert!(matches!(a.check().unwrap(), Plan::Recover { id: "m1", .. }));
        a.stall_timeout = 0;
        assert!(a.check().is_err());
        a.stall_timeout = 30;
        a.native_tls = true;
        assert_eq!(a.check().unwrap_err(), ArgsError::RecoverNative);

        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            m: MigrateArgs,
        }
        let base = [
            "miggate",
            "--source-qmp",
            "unix:/q",
            "--target",
            "unix:/api",
        ];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        // No --target-qmp: the registration names the target QEMU already.
        let c = parse(&["--recover", "m1", "--connect", "h:1"]).unwrap();
        assert_eq!(c.m.recover.as_deref(), Some("m1"));
        assert!(parse(&[]).is_err(), "a first run needs --target-qmp");
        for bad in [
            &["--recover", "m1", "--postcopy"][..],
            &["--recover", "m1", "--target-qmp", "unix:/t"],
            &["--recover", "m1", "--multifd", "2"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arguments_built_in_code_are_bounded_like_the_command_line() {
        let mut a = MigrateArgs::new("/q".into(), "/pki".into());
        a.target = Some("unix:/run/miggate/api.sock".into());
        a.forward = Some(Endpoint::Tcp("127.0.0.1:1".parse().unwrap()));
        a.check().unwrap();
        a.stall_timeout = u64::MAX;
        let e = a.check().unwrap_err().to_string();
        assert!(
            e.starts_with("--stall-timeout must be from 1 to 3600 seconds"),
            "{e}"
        );
        a.stall_timeout = 30;
        a.expires_in = 0;
        assert!(a
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("--expires-in must be from 1"));
        a.expires_in = 60;
        a.rekey_after_mib = Some(u64::MAX);
        assert!(a
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("--rekey-after-mib must be from 1"));
        a.rekey_after_mib = None;
        a.multifd = 64;
        assert!(a
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("--multifd must be at most 63"));
    }

    #[test]
    fn postcopy_options_are_checked_for_arguments_built_in_code() {
        let mut a = MigrateArgs::new("/q".into(), "/pki".into());
        a.target = Some("unix:/run/miggate/api.sock".into());
        a.target_qmp = Some("/run/t.qmp".into());
        a.postcopy_preempt = true;
        assert_eq!(a.check().unwrap_err(), ArgsError::PreemptNeedsPostcopy);
        a.postcopy = true;
        a.check().unwrap();
        a.postcopy_after_passes = 0;
        assert_eq!(
            a.check().unwrap_err().to_string(),
            "--postcopy-after-passes must be from 1 to 1000 passes, not 0"
        );
        a.postcopy_after_passes = 1;
        a.check().unwrap();
        a.native_tls = true;
        assert_eq!(a.check().unwrap_err(), ArgsError::PostcopyNative);
    }

    /// What clap refuses on the command line, before `check`.
    #[test]
    fn postcopy_command_line() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            m: MigrateArgs,
        }
        let base = [
            "miggate",
            "--source-qmp",
            "unix:/q",
            "--target",
            "unix:/api",
            "--target-qmp",
            "unix:/t",
        ];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        let c = parse(&["--postcopy"]).unwrap();
        assert!(c.m.postcopy && !c.m.postcopy_preempt);
        assert_eq!(c.m.postcopy_after_passes, DEFAULT_POSTCOPY_AFTER_PASSES);
        let c = parse(&[
            "--postcopy",
            "--postcopy-after-passes",
            "1",
            "--postcopy-preempt",
        ])
        .unwrap();
        assert_eq!(c.m.postcopy_after_passes, 1);
        assert!(c.m.postcopy_preempt);
        for bad in [
            &["--postcopy-preempt"][..],
            &["--postcopy-after-passes", "3"],
            &["--postcopy", "--postcopy-after-passes", "0"],
            &["--postcopy", "--native-tls"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
        let e = parse(&["--postcopy-preempt"]).unwrap_err().to_string();
        assert!(e.contains("--postcopy"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
        assert!(parse_size("0").is_err());
        assert!(parse_size("8X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn qmp_addresses() {
        assert_eq!(parse_qmp("unix:/run/q.sock"), Ok("/run/q.sock".into()));
        assert_eq!(parse_qmp("/run/q.sock"), Ok("/run/q.sock".into()));
        assert!(parse_qmp("unix:").is_err());
        assert!(parse_qmp("tcp:1.2.3.4:5").is_err());
        assert_eq!(host_of("[::1]:5"), "::1");
        assert_eq!(host_of("dst.example.org:49152"), "dst.example.org");
    }
}
