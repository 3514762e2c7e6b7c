//! `miggate migrate`: one command that migrates a QEMU VM securely, end to
//! end, as `virsh migrate --tls` does.
//!
//! Gateway mode (default):
//!
//! ```text
//! source QEMU --QMP-- miggate migrate --HTTP--> miggate daemon --QMP--> target QEMU
//!      |                    | (in-process source gateway, ticket in memory)   ^
//!      +--unix socket---->  +====== TLS, ticket in the hello =====> target gateway
//!         (private 0700 directory; only the QEMU's pid is served)
//! ```
//!
//! 1. `query-status`, `query-migrate` (nothing in flight), `query-uuid`;
//! 2. `POST /v1/incoming`: VM UUID, allow = our client certificate's DN,
//!    channels = 1 + multifd, forward = the target QEMU (QMP: the daemon
//!    sets multifd to match and issues `migrate-incoming` itself);
//! 3. the source gateway starts in this process with the one-shot ticket,
//!    on a unix socket in a fresh private directory, serving only the pid
//!    of the QEMU behind the QMP socket (its `SO_PEERCRED`);
//! 4. the source QEMU gets `return-path` (always: without it QEMU calls a
//!    migration completed once the stream is in the socket, before the
//!    target loaded anything), `validate-uuid` (when the VM has a UUID),
//!    multifd, `max-bandwidth` (unlimited unless told: QEMU 7.2 caps it at
//!    32 MiB/s by default), `downtime-limit`, then `migrate`;
//! 5. progress from `query-migrate` until QEMU's verdict;
//! 6. a summary, or one sentence naming the cause of the failure and
//!    confirming the source VM's state.
//!
//! `--native-tls` does the same with QEMU's own TLS on both ends (see
//! [`native`]). SIGINT/SIGTERM cancel on both sides (`migrate_cancel`,
//! `DELETE /v1/migrations/{id}`).
//!
//! A VM started without `-uuid` has the nil UUID: the migration then goes
//! ahead, bound to the target by its one-shot ticket and the peer's DN
//! only, and the command says so.

pub mod cause;
pub mod managed;
pub mod native;
pub mod progress;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};
use uuid::Uuid;

use crate::creds::{dn, tls};
use crate::gate::Endpoint;
use crate::qmp::{MigrationInfo, Qmp, QmpError};
use managed::Managed;
use native::Native;
use progress::{bits_per_sec, bytes, duration, Reporter, Snapshot};

/// Default `--x509-dir`: the layout QEMU's `tls-creds-x509` reads, in the
/// place the README's examples install it (QEMU's own default is
/// /etc/pki/qemu; a symlink makes both the same).
pub const DEFAULT_X509_DIR: &str = "/etc/pki/miggate";

/// `max-bandwidth` unless told: QEMU's own default (32 MiB/s in 7.2) would
/// make a secure migration look slow for no reason. QEMU caps the value at
/// SIZE_MAX; 1 TiB/s is "unlimited" for any link.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// How often `query-migrate` is asked for progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// After `migrate_cancel`, how long QEMU may take to get to `cancelled`
/// (it waits for its migration thread to notice).
pub const CANCEL_WAIT: Duration = Duration::from_secs(15);

/// A completed migration's VM starts on the target a moment later.
pub const TARGET_RUNNING_WAIT: Duration = Duration::from_secs(5);

/// Exit codes: 0 success, 1 the migration failed or was not started,
/// 2 invalid usage, 128 + signal when interrupted (130 SIGINT, 143 SIGTERM).
pub const EXIT_FAILED: u8 = 1;
/// QEMU's own maximum `downtime-limit` (MAX_MIGRATE_DOWNTIME: 2000 s), in ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
pub const EXIT_USAGE: u8 = 2;

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
    #[arg(long, value_parser = parse_qmp, required_unless_present = "forward")]
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
            json: false,
        }
    }

    /// Within range: clap bounds the command line, `check` arguments
    /// built in code (demo, tests).
    fn stall(&self) -> Duration {
        Duration::from_secs(self.stall_timeout)
    }

    fn check(&self) -> Result<(), String> {
        if self.native_tls && self.target_qmp.is_none() {
            return Err(
                "--native-tls needs --target-qmp (the target QEMU's local QMP socket)".into(),
            );
        }
        if !self.native_tls && self.target.is_none() {
            return Err("give --target (the target's miggate daemon) or --native-tls".into());
        }
        if !self.native_tls && self.target_qmp.is_none() && self.forward.is_none() {
            return Err("give --target-qmp or --forward".into());
        }
        // The command line's bounds, for arguments built in code.
        use crate::timeouts::{bounded_secs, MAX_REKEY_AFTER_MIB, MAX_STALL_SECS};
        bounded_secs("--stall-timeout", self.stall_timeout, 1, MAX_STALL_SECS)
            .map_err(|e| e.to_string())?;
        bounded_secs(
            "--expires-in",
            self.expires_in,
            1,
            crate::control::server::MAX_EXPIRES_IN_SECS,
        )
        .map_err(|e| e.to_string())?;
        if let Some(m) = self
            .rekey_after_mib
            .filter(|m| !(1..=MAX_REKEY_AFTER_MIB).contains(m))
        {
            return Err(format!(
                "--rekey-after-mib must be from 1 to {MAX_REKEY_AFTER_MIB} MiB, not {m}"
            ));
        }
        if u32::from(self.multifd) >= crate::control::server::MAX_CHANNELS {
            return Err(format!(
                "--multifd must be at most {}, not {}",
                crate::control::server::MAX_CHANNELS - 1,
                self.multifd
            ));
        }
        if let Some(ms) = self.downtime_limit.filter(|ms| *ms > MAX_DOWNTIME_LIMIT_MS) {
            return Err(format!(
                "--downtime-limit must be at most {MAX_DOWNTIME_LIMIT_MS} ms, not {ms}"
            ));
        }
        Ok(())
    }
}

/// `unix:PATH` (a bare absolute path is accepted too).
pub fn parse_qmp(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:").unwrap_or(s) {
        "" => Err("a QMP socket is unix:PATH".into()),
        p if s.starts_with("unix:") || p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(format!("{s:?}: a QMP socket is unix:PATH")),
    }
}

/// Bytes, with an optional K/M/G/T suffix (powers of 1024, "iB" optional).
pub fn parse_size(s: &str) -> Result<u64, String> {
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
                _ => return Err(format!("{s:?}: unknown unit {c:?} (K, M, G, T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes (e.g. 100M)"))?;
    match n.checked_shl(shift).filter(|v| v >> shift == n) {
        Some(0) => Err("a bandwidth of 0 would never finish".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too large")),
    }
}

/// HOST of HOST:PORT (brackets of an IPv6 literal removed).
pub(crate) fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// An error and its sources on one line, without repeating a source its
/// parent's message already includes.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let text = src.to_string();
        if !s.contains(&text) {
            s = format!("{s}: {text}");
        }
        cur = src.source();
    }
    s
}

/// A signal that interrupts the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    Int,
    Term,
}

impl Interrupt {
    fn name(self) -> &'static str {
        match self {
            Interrupt::Int => "SIGINT",
            Interrupt::Term => "SIGTERM",
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            Interrupt::Int => 130,
            Interrupt::Term => 143,
        }
    }
}

struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> Interrupt {
        tokio::select! {
            _ = self.int.recv() => Interrupt::Int,
            _ = self.term.recv() => Interrupt::Term,
        }
    }
}

/// A migration that did not complete: the sentence and the exit code.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sentence: String,
    pub exit_code: u8,
    /// The source VM's state when the sentence was written.
    pub source_status: Option<String>,
    pub migration_id: Option<String>,
}

impl Failure {
    fn to_json(&self) -> Value {
        json!({
            "type": "result",
            "ok": false,
            "error": self.sentence,
            "exit_code": self.exit_code,
            "source_status": self.source_status,
            "migration_id": self.migration_id,
        })
    }
}

/// A completed migration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub mode: &'static str,
    pub migration_id: Option<String>,
    pub vm_uuid: Option<Uuid>,
    /// Our client certificate's DN (what the target authorizes).
    pub source_dn: String,
    /// The DN the target daemon admitted (gateway mode).
    pub admitted_dn: Option<String>,
    /// The target's certificate DN, as the source gateway verified it.
    pub target_dn: Option<String>,
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub bytes: u64,
    pub throughput_bps: u64,
    pub passes: u64,
    pub channels: u32,
    /// The target VM's state (native TLS mode, where we can ask it).
    pub target_status: Option<String>,
    pub source_status: Option<String>,
}

impl Summary {
    fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a summary serialises");
        v["type"] = json!("result");
        v["ok"] = json!(true);
        v
    }

    /// The closing words: what happened, how fast, who was trusted.
    pub fn human(&self) -> String {
        let mut s = format!(
            "migration completed in {}",
            duration(Duration::from_millis(self.total_time_ms))
        );
        if let Some(d) = self.downtime_ms {
            s += &format!(" (guest paused {d} ms)");
        }
        s += &format!(
            ": {} sent at {} over {} channel{}",
            bytes(self.bytes),
            bits_per_sec(self.throughput_bps),
            self.channels,
            if self.channels == 1 { "" } else { "s" }
        );
        if self.passes > 0 {
            s += &format!(
                " in {} pass{}",
                self.passes,
                if self.passes == 1 { "" } else { "es" }
            );
        }
        match (&self.migration_id, &self.admitted_dn) {
            (Some(id), Some(dn)) => {
                s += &format!("\n  the target daemon admitted {dn} as migration {id}")
            }
            (Some(id), None) => s += &format!("\n  migration {id} at the target daemon"),
            _ => s += &format!("\n  the target QEMU authorized {}", self.source_dn),
        }
        if let Some(t) = &self.target_dn {
            s += &format!("; target certificate {t}");
        }
        if let Some(vm) = self.vm_uuid {
            s += &format!("\n  VM {vm}");
        }
        if let Some(t) = &self.target_status {
            s += &format!(" is {t} on the target");
        }
        s
    }
}

/// `miggate migrate`: runs it, prints, and returns the exit code.
pub async fn run(args: MigrateArgs) -> u8 {
    let mut rep = Reporter::new(args.json);
    match execute(&args, &mut rep).await {
        Ok(summary) => {
            rep.result(&summary.to_json(), &summary.human());
            0
        }
        Err(f) => {
            rep.result(&f.to_json(), &f.sentence);
            f.exit_code
        }
    }
}

enum Side {
    Managed(Box<Managed>),
    Native(Box<Native>),
}

impl Side {
    fn uri(&self) -> String {
        match self {
            Side::Managed(m) => m.uri(),
            Side::Native(n) => n.uri().to_string(),
        }
    }

    fn id(&self) -> Option<String> {
        match self {
            Side::Managed(m) => Some(m.id.clone()),
            Side::Native(_) => None,
        }
    }
}

/// The migration, with its progress on `rep`; the demo calls this too.
pub async fn execute(args: &MigrateArgs, rep: &mut Reporter) -> Result<Summary, Failure> {
    let usage = |sentence: String| Failure {
        sentence,
        exit_code: EXIT_USAGE,
        source_status: None,
        migration_id: None,
    };
    args.check().map_err(|e| usage(format!("{e}.")))?;
    let mut signals = Signals::new().map_err(|e| usage(format!("cannot handle signals: {e}.")))?;
    let path = &args.source_qmp;
    let mut src = Qmp::connect_unix(path).await.map_err(|e| Failure {
        sentence: format!(
            "migration not started: cannot connect to the source QEMU's QMP socket {}: {}; nothing was changed.",
            path.display(),
            chain(&e)
        ),
        exit_code: EXIT_FAILED,
        source_status: None,
        migration_id: None,
    })?;
    let before = match src.query_status().await {
        Ok(s) => s,
        Err(e) => {
            return Err(Failure {
                sentence: format!(
                    "migration not started: the source QEMU does not answer query-status: {}; nothing was changed.",
                    chain(&e)
                ),
                exit_code: EXIT_FAILED,
                source_status: None,
                migration_id: None,
            })
        }
    };
    let mut m = Migration {
        args,
        src,
        before,
        side: None,
    };
    m.go(rep, &mut signals).await
}

struct Migration<'a> {
    args: &'a MigrateArgs,
    src: Qmp,
    /// The source VM's state when we started.
    before: String,
    side: Option<Side>,
}

impl Migration<'_> {
    async fn go(&mut self, rep: &mut Reporter, signals: &mut Signals) -> Result<Summary, Failure> {
        let prepared = tokio::select! {
            r = self.prepare(rep) => r,
            sig = signals.recv() => Err(Stop::Interrupted(sig)),
        };
        let (uuid, dn) = match prepared {
            Ok(x) => x,
            Err(stop) => return Err(self.not_started(stop).await),
        };
        let uri = self.side.as_ref().expect("prepared").uri();
        rep.step(&format!(
            "source QEMU: migrating to {uri} (return-path on{}{}, {})",
            if uuid.is_some() {
                ", validate-uuid on"
            } else {
                ""
            },
            if self.args.multifd > 0 {
                format!(", multifd {} channels", self.args.multifd)
            } else {
                String::new()
            },
            match self.args.max_bandwidth {
                Some(b) => format!("max {}/s", bytes(b)),
                None => "bandwidth unlimited".into(),
            }
        ));
        let started = Instant::now();
        if let Err(e) = self
            .src
            .execute("migrate", Some(json!({ "uri": uri })))
            .await
        {
            return Err(self
                .not_started(Stop::Cause(format!("source QEMU: {}", chain(&e))))
                .await);
        }

        // Progress until QEMU's verdict or a signal.
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let info = loop {
            tokio::select! {
                _ = tick.tick() => {}
                sig = signals.recv() => return self.interrupted(sig, rep).await,
            }
            let info = match self.src.query_migrate().await {
                Ok(i) => i,
                Err(e) => {
                    return Err(self
                        .failed(rep, Some(format!("source QEMU: {}", chain(&e))), None)
                        .await)
                }
            };
            rep.progress(&Snapshot::from_info(&info, started.elapsed()));
            if let Some(Side::Managed(mg)) = &mut self.side {
                // At the end, ask now: a fast migration beats the poll's pace.
                mg.poll_admission(rep, info.is_terminal()).await;
            }
            if info.is_terminal() {
                break info;
            }
        };
        rep.finish_progress();
        match info.status.as_deref() {
            Some("completed") => Ok(self.summary(rep, &info, started.elapsed(), uuid, dn).await),
            _ => Err(self.failed(rep, None, Some(&info)).await),
        }
    }

    /// Everything before `migrate`: the VM, our identity, the target side,
    /// the source's capabilities and parameters.
    async fn prepare(&mut self, rep: &mut Reporter) -> Result<(Option<Uuid>, String), Stop> {
        let q = |e: QmpError| Stop::Cause(format!("source QEMU: {}", chain(&e)));
        let info = self.src.query_migrate().await.map_err(q)?;
        if let Some(status) = info.status.as_deref().filter(|_| !info.is_terminal()) {
            if status != "none" {
                return Err(Stop::Cause(format!(
                    "a migration of this VM is already in progress (QEMU status {status})"
                )));
            }
        }
        let v = self.src.execute("query-uuid", None).await.map_err(q)?;
        let uuid = v["UUID"]
            .as_str()
            .and_then(|s| s.parse::<Uuid>().ok())
            .filter(|u| !u.is_nil());
        let dn = client_dn(&self.args.x509_dir).map_err(Stop::Cause)?;
        rep.step(&format!(
            "source QEMU at {}: VM {} is {}; this side authenticates as {dn}",
            self.args.source_qmp.display(),
            uuid.map_or_else(|| "(no -uuid)".to_string(), |u| u.to_string()),
            self.before,
        ));
        if uuid.is_none() {
            let bound = if self.args.native_tls {
                "the target QEMU's tls-authz"
            } else {
                "the one-shot ticket and the peer's DN"
            };
            rep.note(&format!("the VM was started without -uuid: the stream cannot prove which VM it is; it is bound to this migration by {bound} only"));
        }

        self.side = Some(if self.args.native_tls {
            Side::Native(Box::new(
                Native::prepare(self.args, &mut self.src, &dn, rep)
                    .await
                    .map_err(Stop::Cause)?,
            ))
        } else {
            // Stale native TLS settings would wrap TLS inside the gateway's TLS.
            self.src
                .execute("migrate-set-parameters", Some(json!({"tls-creds": ""})))
                .await
                .map_err(q)?;
            // The QEMU behind the QMP socket is the only process the
            // source gateway will take a stream from.
            let qemu = self.src.peer_cred().map_err(|e| {
                Stop::Cause(format!(
                    "cannot read the source QEMU's credentials from its QMP socket: {e}"
                ))
            })?;
            Side::Managed(Box::new(
                Managed::prepare(self.args, uuid, &dn, &qemu, rep)
                    .await
                    .map_err(Stop::Cause)?,
            ))
        });

        let caps = [
            ("return-path", true),
            ("validate-uuid", uuid.is_some()),
            ("multifd", self.args.multifd > 0),
        ];
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.src
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": caps })),
            )
            .await
            .map_err(q)?;
        let mut params = json!({
            "max-bandwidth": self.args.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
        });
        if let Some(ms) = self.args.downtime_limit {
            params["downtime-limit"] = json!(ms);
        }
        if self.args.multifd > 0 {
            params["multifd-channels"] = json!(self.args.multifd);
        }
        self.src
            .execute("migrate-set-parameters", Some(params))
            .await
            .map_err(q)?;
        Ok((uuid, dn))
    }

    /// The source VM's state as the end of a sentence.
    async fn vm_clause(&mut self) -> (String, Option<String>) {
        match self.src.query_status().await {
            Ok(now) => (cause::source_vm(&self.before, Ok(&now)), Some(now)),
            Err(e) => (cause::source_vm(&self.before, Err(&chain(&e))), None),
        }
    }

    /// A failure before `migrate` ran: the registration is withdrawn.
    async fn not_started(&mut self, stop: Stop) -> Failure {
        let id = self.side.as_ref().and_then(Side::id);
        if let Some(Side::Managed(m)) = &self.side {
            let _ = m.cancel().await;
        }
        // A `migrate` interrupted while in flight may have started it.
        let _ = self.src.execute("migrate_cancel", None).await;
        let (vm, now) = self.vm_clause().await;
        let (lead, why, code) = match stop {
            Stop::Cause(c) => ("migration not started", c, EXIT_FAILED),
            Stop::Interrupted(sig) => (
                "migration not started",
                format!("interrupted by {}", sig.name()),
                sig.exit_code(),
            ),
        };
        Failure {
            sentence: cause::sentence(lead, &why, &vm),
            exit_code: code,
            source_status: now,
            migration_id: id,
        }
    }

    /// QEMU's verdict was not "completed" (or QMP broke): find the cause.
    async fn failed(
        &mut self,
        rep: &mut Reporter,
        known: Option<String>,
        info: Option<&MigrationInfo>,
    ) -> Failure {
        rep.finish_progress();
        let source_qemu = info.and_then(|i| i.error_desc.clone());
        let status = info.and_then(|i| i.status.clone());
        let (records, view, target_qemu) = match &mut self.side {
            Some(Side::Managed(m)) => {
                let (r, v) = m.failure_evidence().await;
                (r, v, None)
            }
            Some(Side::Native(n)) => (Vec::new(), None, n.target_error().await),
            None => (Vec::new(), None, None),
        };
        let why = known.unwrap_or_else(|| {
            cause::cause(&cause::Evidence {
                gateway: &records,
                daemon: view.as_ref(),
                target_qemu: target_qemu.as_deref(),
                source_qemu: source_qemu.as_deref(),
            })
        });
        let lead = match status.as_deref() {
            Some("cancelled") => "migration cancelled",
            _ => "migration failed",
        };
        let (vm, now) = self.vm_clause().await;
        Failure {
            sentence: cause::sentence(lead, &why, &vm),
            exit_code: EXIT_FAILED,
            source_status: now,
            migration_id: self.side.as_ref().and_then(Side::id),
        }
    }

    /// SIGINT/SIGTERM while migrating: cancel on both sides, then report.
    async fn interrupted(
        &mut self,
        sig: Interrupt,
        rep: &mut Reporter,
    ) -> Result<Summary, Failure> {
        rep.finish_progress();
        rep.step(&format!(
            "{}: cancelling the migration on both sides",
            sig.name()
        ));
        // The daemon first: a source QEMU that cancels closes its channels
        // cleanly, which the daemon could take for the end of the stream.
        let daemon = match &self.side {
            Some(Side::Managed(m)) => match m.cancel().await {
                Ok(v) => format!(
                    "the target daemon marked migration {} {}, ",
                    v.id,
                    v.state.as_str()
                ),
                Err(e) => format!("the target daemon did not confirm ({e}), "),
            },
            _ => String::new(),
        };
        let source = match self.src.execute("migrate_cancel", None).await {
            Ok(_) => "the source QEMU cancelled it".to_string(),
            Err(e) => format!("migrate_cancel failed ({})", chain(&e)),
        };
        // Wait for QEMU to get out of the migration before saying where the VM is.
        let deadline = Instant::now() + CANCEL_WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            match self.src.query_migrate().await {
                Ok(i) if i.is_terminal() => {
                    last = i.status;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => break,
            }
        }
        if last.as_deref() == Some("completed") {
            rep.note("the migration completed before it could be cancelled");
        }
        let (vm, now) = self.vm_clause().await;
        let why = format!(
            "interrupted by {}: {daemon}{source}{}",
            sig.name(),
            last.map_or_else(String::new, |s| format!(" (QEMU status {s})"))
        );
        Err(Failure {
            sentence: cause::sentence("migration cancelled", &why, &vm),
            exit_code: sig.exit_code(),
            source_status: now,
            migration_id: self.side.as_ref().and_then(Side::id),
        })
    }

    async fn summary(
        &mut self,
        rep: &mut Reporter,
        info: &MigrationInfo,
        elapsed: Duration,
        uuid: Option<Uuid>,
        dn: String,
    ) -> Summary {
        let ram = info.ram.clone().unwrap_or_default();
        // QEMU 7.2 reports total-time 0 for a guest that is not running.
        let total_ms = match info.total_time {
            Some(t) if t > 0 => t,
            _ => elapsed.as_millis() as u64,
        };
        let throughput = ram.transferred.saturating_mul(8_000) / total_ms.max(1);
        let source_status = self.src.query_status().await.ok();
        let mut s = Summary {
            mode: if self.args.native_tls {
                "native-tls"
            } else {
                "gateway"
            },
            migration_id: None,
            vm_uuid: uuid,
            source_dn: dn,
            admitted_dn: None,
            target_dn: None,
            total_time_ms: total_ms,
            downtime_ms: info.downtime,
            setup_time_ms: info.setup_time,
            bytes: ram.transferred,
            throughput_bps: throughput,
            passes: ram.dirty_sync_count,
            channels: 1 + u32::from(self.args.multifd),
            target_status: None,
            source_status,
        };
        match &mut self.side {
            Some(Side::Managed(m)) => {
                s.migration_id = Some(m.id.clone());
                s.target_dn = m.target_dn();
                if let Some(v) = m.settled_view().await {
                    if v.state != crate::control::types::Phase::Completed {
                        rep.note(&format!(
                            "QEMU reports the migration completed, but the target daemon recorded migration {} as {}{}",
                            v.id,
                            v.state.as_str(),
                            v.reason.as_deref().map_or_else(String::new, |r| format!(": {r}"))
                        ));
                    }
                    s.admitted_dn = v.peer_dn;
                }
            }
            Some(Side::Native(n)) => {
                let want = if self.before == "running" {
                    "running"
                } else {
                    "paused"
                };
                s.target_status = n.target_status(want).await;
            }
            None => {}
        }
        s
    }
}

/// Why a migration stopped before it started.
enum Stop {
    Cause(String),
    Interrupted(Interrupt),
}

/// The subject DN of `client-cert.pem`, as QEMU's tls-authz will see it.
pub fn client_dn(x509_dir: &std::path::Path) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    let path = x509_dir.join(tls::CLIENT_CERT);
    let cert = rustls_pki_types::CertificateDer::from_pem_file(&path)
        .map_err(|e| format!("cannot read the client certificate {}: {e}", path.display()))?;
    dn::subject_dn(&cert).map_err(|e| format!("{}: {}", path.display(), chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_built_in_code_are_bounded_like_the_command_line() {
        let mut a = MigrateArgs::new("/q".into(), "/pki".into());
        a.target = Some("unix:/run/miggate/api.sock".into());
        a.forward = Some(Endpoint::Tcp("127.0.0.1:1".into()));
        a.check().unwrap();
        a.stall_timeout = u64::MAX;
        let e = a.check().unwrap_err();
        assert!(
            e.starts_with("--stall-timeout must be from 1 to 3600 seconds"),
            "{e}"
        );
        a.stall_timeout = 30;
        a.expires_in = 0;
        assert!(a
            .check()
            .unwrap_err()
            .starts_with("--expires-in must be from 1"));
        a.expires_in = 60;
        a.rekey_after_mib = Some(u64::MAX);
        assert!(a
            .check()
            .unwrap_err()
            .starts_with("--rekey-after-mib must be from 1"));
        a.rekey_after_mib = None;
        a.multifd = 64;
        assert!(a
            .check()
            .unwrap_err()
            .starts_with("--multifd must be at most 63"));
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

    #[test]
    fn summary_words() {
        let s = Summary {
            mode: "gateway",
            migration_id: Some("m-1".into()),
            vm_uuid: None,
            source_dn: "O=a,CN=src".into(),
            admitted_dn: Some("O=a,CN=src".into()),
            target_dn: Some("CN=localhost".into()),
            total_time_ms: 2300,
            downtime_ms: Some(41),
            setup_time_ms: Some(3),
            bytes: 70 << 20,
            throughput_bps: 255_000_000,
            passes: 3,
            channels: 1,
            target_status: None,
            source_status: Some("postmigrate".into()),
        };
        assert_eq!(
            s.human(),
            "migration completed in 2.3 s (guest paused 41 ms): 70.0 MiB sent at 255 Mbit/s over 1 channel in 3 passes\n  \
             the target daemon admitted O=a,CN=src as migration m-1; target certificate CN=localhost"
        );
        let j = s.to_json();
        assert_eq!(j["type"], "result");
        assert_eq!(j["ok"], true);
        assert_eq!(j["downtime_ms"], 41);
    }

    #[test]
    fn error_chains_do_not_repeat() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: inner broke")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("inner broke")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect")]
        struct Conn(#[source] std::io::Error);
        assert_eq!(chain(&Outer(Inner)), "outer: inner broke");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(chain(&Conn(io)), "cannot connect: no such file");
    }
}
