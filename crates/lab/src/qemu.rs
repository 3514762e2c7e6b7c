//! A real QEMU process driven over QMP.
//!
//! Every method returns a [`LabError`] that carries QEMU's stderr, so that a
//! failure says why. For the raw form of any command, use the public `qmp`
//! field directly.

use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use uuid::Uuid;

use super::{guest, LabError};
use miggate::qmp::{MigrationInfo, MigrationParameters, Qmp, QmpError};

/// `max-bandwidth` that lifts QEMU's default cap (32 MiB/s in 7.2), so that
/// a timing measures the transport rather than the throttle: the value
/// `miggate migrate` sets, defined once in the product.
pub use miggate::qmp::UNLIMITED_BANDWIDTH;

/// From spawning QEMU to its QMP socket answering.
const SPAWN_DEADLINE: Duration = Duration::from_secs(15);
/// How long a QEMU whose QMP closed may take to exit.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// Polling period of status waits (QMP has no event for every state).
const POLL: Duration = Duration::from_millis(20);
/// Buffer of the streaming SHA-256 of RAM dumps.
const HASH_BUF: usize = 4 << 20;

/// Environment variable that picks the accelerator (`tcg` or `kvm`); the
/// older `MIGGATE_TEST_ACCEL` is honoured too.
pub const ACCEL_ENV: &str = "MIGGATE_ACCEL";
const ACCEL_ENV_OLD: &str = "MIGGATE_TEST_ACCEL";

/// Path of qemu-system-x86_64: `$QEMU_SYSTEM_X86_64`, else the first in
/// PATH, /usr/bin, /usr/local/bin.
pub fn qemu_binary() -> Result<PathBuf, LabError> {
    if let Some(p) = std::env::var_os("QEMU_SYSTEM_X86_64") {
        return Ok(PathBuf::from(p));
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/usr/local/bin".into()]);
    for dir in candidates {
        let p = dir.join("qemu-system-x86_64");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(LabError::QemuMissing)
}

/// Where `scripts/setup.sh` unpacks QEMU 10.0 (Debian's bookworm-backports
/// `qemu-system-x86`, `-common`, `-data` under `root/`); the same variable
/// as the script's overrides it.
pub const QEMU_10_DIR: &str = "/opt/miggate/qemu-10.0";
pub const QEMU_10_DIR_ENV: &str = "MIGGATE_QEMU10_DIR";

/// Which QEMU runs a VM. A migration's two sides may differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QemuVersion {
    /// The system's, from [`qemu_binary`]: QEMU 7.2 on Debian 12.
    #[default]
    System,
    /// QEMU 10.0 as `scripts/setup.sh` unpacks it into [`QEMU_10_DIR`].
    V10_0,
}

impl QemuVersion {
    /// The binary and the arguments it needs before any other.
    ///
    /// An unpacked QEMU's compiled-in data directory is the system's
    /// `/usr/share/qemu` (7.2's option ROMs), so the lab puts its own data
    /// first with `-L`, then SeaBIOS (the Debian package links
    /// `bios-256k.bin` there, and `dpkg -x` leaves that link dangling).
    /// Done here rather than by a wrapper script: the arguments show in
    /// every [`LabError::EarlyExit`], and there is nothing to install
    /// besides the unpacked tree.
    pub fn command(self) -> Result<(PathBuf, Vec<String>), LabError> {
        match self {
            QemuVersion::System => Ok((qemu_binary()?, Vec::new())),
            QemuVersion::V10_0 => {
                let dir = std::env::var_os(QEMU_10_DIR_ENV)
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(QEMU_10_DIR));
                let root = dir.join("root");
                let binary = root.join("usr/bin/qemu-system-x86_64");
                if !binary.is_file() {
                    return Err(LabError::Qemu10Missing { binary });
                }
                let data = root.join("usr/share/qemu");
                let args = vec![
                    "-L".into(),
                    data.display().to_string(),
                    "-L".into(),
                    "/usr/share/seabios".into(),
                ];
                Ok((binary, args))
            }
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QemuVersion::System => "system QEMU",
            QemuVersion::V10_0 => "QEMU 10.0",
        })
    }
}

/// Whether /dev/kvm can be opened read-write.
pub fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The default accelerator: KVM when usable, TCG otherwise;
/// `MIGGATE_ACCEL=tcg|kvm` overrides (on a nested host whose KVM exits are
/// slow, TCG boots the counter guest ~10x faster).
pub fn accel() -> Result<Accel, LabError> {
    for var in [ACCEL_ENV, ACCEL_ENV_OLD] {
        match std::env::var(var).as_deref() {
            Ok("tcg") => return Ok(Accel::Tcg),
            Ok("kvm") => return Ok(Accel::Kvm),
            Ok(other) => {
                return Err(LabError::BadAccel {
                    var,
                    value: other.to_owned(),
                })
            }
            Err(_) => {}
        }
    }
    Ok(if kvm_available() {
        Accel::Kvm
    } else {
        Accel::Tcg
    })
}

/// What runs inside the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Paused (`-S`) PC whose RAM block `ram0` starts out holding
    /// `guest::random_ram(seed, ram)`. On an `incoming` VM the RAM is a plain
    /// `memory-backend-ram` with the same id: contents come from the source.
    PausedRandomRam { seed: u64 },
    /// PC booting `guest::boot_sector()`, which counts at
    /// `guest::COUNTER_ADDR` and dirties pages forever.
    RunningCounter,
    /// `-machine none`: no guest at all, for QMP-only uses.
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    Server,
    Client,
}

/// QEMU's own TLS (`tls-creds-x509`) on this VM's migration channel.
#[derive(Debug, Clone)]
pub struct NativeTls {
    /// PKI directory in QEMU's layout (ca-cert.pem, server-cert.pem, ...).
    pub dir: PathBuf,
    pub endpoint: TlsEndpoint,
    /// Server only: adds `authz-simple` with this DN as `tls-authz`.
    pub authz_identity: Option<String>,
    /// GnuTLS priority string (`tls-creds-x509,priority=`), e.g. to limit
    /// the versions; `None`: GnuTLS's defaults.
    pub priority: Option<String>,
}

#[derive(Debug, Clone)]
pub struct QemuOpts {
    pub ram_mib: u32,
    pub guest: Guest,
    pub uuid: Option<Uuid>,
    /// Start with `-incoming defer`; call `migrate_incoming` later.
    pub incoming: bool,
    pub tls: Option<NativeTls>,
    /// None: [`accel()`].
    pub accel: Option<Accel>,
    /// Where random RAM files are cached; None: [`guest::default_cache_dir`].
    pub ram_cache: Option<PathBuf>,
    /// Which QEMU binary runs this VM.
    pub qemu: QemuVersion,
    /// Machine type of a PC guest (`-machine`); None: `pc`, the binary's
    /// newest. Across versions both sides need the older one, e.g.
    /// `pc-i440fx-7.2`.
    pub machine: Option<String>,
    pub extra_args: Vec<String>,
}

impl Default for QemuOpts {
    fn default() -> Self {
        QemuOpts {
            ram_mib: 128,
            guest: Guest::Empty,
            uuid: None,
            incoming: false,
            tls: None,
            accel: None,
            ram_cache: None,
            qemu: QemuVersion::System,
            machine: None,
            extra_args: Vec::new(),
        }
    }
}

impl QemuOpts {
    pub fn new(guest: Guest, ram_mib: u32) -> Self {
        QemuOpts {
            ram_mib,
            guest,
            ..Default::default()
        }
    }

    /// The same VM configuration as a migration destination.
    pub fn as_incoming(&self) -> Self {
        QemuOpts {
            incoming: true,
            ..self.clone()
        }
    }

    /// With a second QMP socket at `path`, for `miggate migrate` or the
    /// daemon: a QMP socket serves one client, and [`Qemu`] keeps the first.
    pub fn with_qmp(mut self, path: &Path) -> Self {
        self.extra_args.extend([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", path.display()),
        ]);
        self
    }
}

pub const TLS_CREDS_ID: &str = "tls0";
pub const TLS_AUTHZ_ID: &str = "authz0";

/// A running QEMU process; killed on drop.
pub struct Qemu {
    pub qmp: Qmp,
    child: Child,
    dir: TempDir,
    opts: QemuOpts,
    stderr_path: PathBuf,
    dumps: u32,
    migrate_started: Option<SystemTime>,
    migration_ended: Option<SystemTime>,
}

impl Qemu {
    /// Both QEMUs of one migration, started together: `src`, and `dst`
    /// (usually `src.as_incoming()`).
    pub async fn pair(src: QemuOpts, dst: QemuOpts) -> Result<(Qemu, Qemu), LabError> {
        let (src, dst) = tokio::join!(Qemu::spawn(src), Qemu::spawn(dst));
        Ok((src?, dst?))
    }

    /// [`Qemu::pair`] of `opts` and `opts.as_incoming()`, each with a spare
    /// QMP socket in `dir` ([`QemuOpts::with_qmp`]): `source.qmp` and
    /// `target.qmp`, returned with them.
    pub async fn pair_with_qmp(
        opts: &QemuOpts,
        dir: &Path,
    ) -> Result<(Qemu, Qemu, PathBuf, PathBuf), LabError> {
        let (sq, tq) = (dir.join("source.qmp"), dir.join("target.qmp"));
        let (src, dst) =
            Qemu::pair(opts.clone().with_qmp(&sq), opts.as_incoming().with_qmp(&tq)).await?;
        Ok((src, dst, sq, tq))
    }

    pub async fn spawn(opts: QemuOpts) -> Result<Qemu, LabError> {
        let (binary, mut args) = opts.qemu.command()?;
        let accel = match opts.accel {
            Some(a) => a,
            None => accel()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("miggate-qemu-")
            .tempdir()
            .map_err(|e| LabError::io("creating a temp dir for QEMU", e))?;
        let qmp_path = dir.path().join("qmp.sock");
        let stderr_path = dir.path().join("stderr.log");
        let ram = format!("{}M", opts.ram_mib);
        let ram_bytes = u64::from(opts.ram_mib) << 20;

        let machine = format!(
            "{},memory-backend=ram0",
            opts.machine.as_deref().unwrap_or("pc")
        );
        let common: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-accel".into(),
            accel.as_str().into(),
            "-m".into(),
            ram.clone(),
        ];
        args.extend(common);
        let mut push = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
        match opts.guest {
            Guest::PausedRandomRam { seed } => {
                // The RAMBlock takes the backend's id ("ram0"), so source
                // (file backend) and destination (ram backend) match.
                let backend = if opts.incoming {
                    format!("memory-backend-ram,id=ram0,size={ram}")
                } else {
                    let len = ram_bytes as usize;
                    let cache = opts
                        .ram_cache
                        .clone()
                        .unwrap_or_else(guest::default_cache_dir);
                    let file = tokio::task::spawn_blocking(move || {
                        guest::random_ram_file(seed, len, &cache)
                    })
                    .await
                    .expect("RAM file task panicked")?;
                    // share=off: a private mapping, QEMU never writes back.
                    format!(
                        "memory-backend-file,id=ram0,size={ram},mem-path={},share=off",
                        file.display()
                    )
                };
                push(&["-object", &backend, "-machine", &machine]);
                push(&["-S"]);
            }
            Guest::RunningCounter => {
                // Each side has its own copy: IDE disks cannot be read-only,
                // and nothing writes to it anyway.
                let disk = dir.path().join("boot.img");
                guest::write_boot_disk(&disk)
                    .map_err(|e| LabError::io(format!("writing {}", disk.display()), e))?;
                push(&[
                    "-object",
                    &format!("memory-backend-ram,id=ram0,size={ram}"),
                    "-machine",
                    &machine,
                    "-drive",
                    &format!("file={},format=raw,if=ide,index=0", disk.display()),
                    "-boot",
                    "c",
                ]);
            }
            Guest::Empty => push(&["-machine", "none", "-S"]),
        }
        if let Some(uuid) = opts.uuid {
            push(&["-uuid", &uuid.to_string()]);
        }
        if opts.incoming {
            push(&["-incoming", "defer"]);
        }
        args.extend(opts.extra_args.iter().cloned());

        let create = |p: PathBuf| {
            std::fs::File::create(&p)
                .map_err(|e| LabError::io(format!("creating {}", p.display()), e))
        };
        let stderr = create(stderr_path.clone())?;
        let stdout = create(dir.path().join("stdout.log"))?;
        let mut child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LabError::Spawn {
                binary: binary.clone(),
                source,
            })?;

        // QEMU creates the socket once it is listening; retry until then.
        let deadline = Instant::now() + SPAWN_DEADLINE;
        let qmp = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| LabError::io("waiting for QEMU", e))?
            {
                return Err(LabError::EarlyExit {
                    status: status.to_string(),
                    args,
                    stderr: read_text(&stderr_path),
                });
            }
            match Qmp::connect_unix(&qmp_path).await {
                Ok(q) => break q,
                Err(source) if Instant::now() > deadline => {
                    return Err(LabError::QmpNotUp {
                        path: qmp_path,
                        after: SPAWN_DEADLINE,
                        source: Box::new(source),
                        stderr: read_text(&stderr_path),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };

        let mut q = Qemu {
            qmp,
            child,
            dir,
            opts,
            stderr_path,
            dumps: 0,
            migrate_started: None,
            migration_ended: None,
        };
        // MIGRATION events are what wait_migration_end waits on.
        q.set_capabilities(&[("events", true)]).await?;
        if let Some(tls) = q.opts.tls.clone() {
            q.add_native_tls_objects(&tls).await?;
        }
        Ok(q)
    }

    // object-add rather than -object: no ",," escaping of DNs and paths.
    async fn add_native_tls_objects(&mut self, tls: &NativeTls) -> Result<(), LabError> {
        let endpoint = match tls.endpoint {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        };
        let dir = tls.dir.to_str().ok_or_else(|| {
            self.unexpected(format!("PKI path {} is not UTF-8", tls.dir.display()))
        })?;
        let mut creds = json!({
            "qom-type": "tls-creds-x509",
            "id": TLS_CREDS_ID,
            "dir": dir,
            "endpoint": endpoint,
            "verify-peer": true,
        });
        if let Some(p) = &tls.priority {
            creds["priority"] = json!(p);
        }
        self.cmd("object-add", creds).await?;
        if let Some(identity) = &tls.authz_identity {
            if tls.endpoint != TlsEndpoint::Server {
                return Err(self.unexpected("tls-authz is server-side only".into()));
            }
            self.cmd(
                "object-add",
                json!({"qom-type": "authz-simple", "id": TLS_AUTHZ_ID, "identity": identity}),
            )
            .await?;
        }
        Ok(())
    }

    pub fn opts(&self) -> &QemuOpts {
        &self.opts
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ram_bytes(&self) -> u64 {
        u64::from(self.opts.ram_mib) << 20
    }

    pub fn stderr_text(&self) -> String {
        read_text(&self.stderr_path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn unexpected(&self, what: String) -> LabError {
        LabError::Unexpected {
            what,
            stderr: self.stderr_text(),
        }
    }

    fn qmp_err(&self, command: impl Into<String>, source: QmpError) -> LabError {
        LabError::Qmp {
            command: command.into(),
            source: Box::new(source),
            stderr: self.stderr_text(),
        }
    }

    /// Runs a command that must succeed (a null `arguments` sends none).
    pub async fn cmd(&mut self, command: &str, arguments: Value) -> Result<Value, LabError> {
        let args = (!arguments.is_null()).then_some(arguments);
        match self.qmp.execute(command, args.clone()).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.qmp_err(format!("{command} {}", args.unwrap_or_default()), e)),
        }
    }

    pub async fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), LabError> {
        match self.qmp.set_capabilities(caps.iter().copied()).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.qmp_err(format!("migrate-set-capabilities {caps:?}"), e)),
        }
    }

    /// `migrate-set-parameters` with the members of `params` (a JSON object,
    /// as the tests write them).
    pub async fn set_parameters(&mut self, params: Value) -> Result<(), LabError> {
        let Value::Object(other) = params else {
            return Err(
                self.unexpected(format!("migration parameters must be an object: {params}"))
            );
        };
        self.set_typed_parameters(&MigrationParameters {
            other,
            ..Default::default()
        })
        .await
    }

    pub async fn set_typed_parameters(
        &mut self,
        params: &MigrationParameters,
    ) -> Result<(), LabError> {
        match self.qmp.set_parameters(params).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.qmp_err(format!("migrate-set-parameters {params:?}"), e)),
        }
    }

    /// Lifts QEMU's default bandwidth cap.
    pub async fn set_unlimited_bandwidth(&mut self) -> Result<(), LabError> {
        self.set_typed_parameters(&MigrationParameters {
            max_bandwidth: Some(UNLIMITED_BANDWIDTH),
            ..Default::default()
        })
        .await
    }

    /// Points migration at the `NativeTls` objects: tls-creds, plus
    /// tls-authz on a server with an identity, plus tls-hostname if given
    /// (a client checks the server certificate against it).
    pub async fn set_native_tls_parameters(
        &mut self,
        hostname: Option<&str>,
    ) -> Result<(), LabError> {
        let Some(tls) = self.opts.tls.clone() else {
            return Err(
                self.unexpected("set_native_tls_parameters on a VM without QemuOpts::tls".into())
            );
        };
        let mut p = json!({ "tls-creds": TLS_CREDS_ID });
        if tls.authz_identity.is_some() {
            p["tls-authz"] = json!(TLS_AUTHZ_ID);
        }
        if let Some(h) = hostname {
            p["tls-hostname"] = json!(h);
        }
        self.set_parameters(p).await
    }

    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), LabError> {
        match self.qmp.migrate_incoming(uri).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.qmp_err(format!("migrate-incoming {uri}"), e)),
        }
    }

    /// `migrate-incoming tcp:127.0.0.1:0` and returns the port QEMU bound.
    pub async fn migrate_incoming_any_port(&mut self) -> Result<u16, LabError> {
        self.migrate_incoming("tcp:127.0.0.1:0").await?;
        let info = self.query_migrate().await?;
        let port = info.raw["socket-address"][0]["port"]
            .as_str()
            .and_then(|p| p.parse().ok());
        port.ok_or_else(|| {
            self.unexpected(format!("no listening port in query-migrate: {}", info.raw))
        })
    }

    pub async fn migrate(&mut self, uri: &str) -> Result<(), LabError> {
        self.migrate_started = Some(SystemTime::now());
        self.migration_ended = None;
        match self.qmp.migrate(uri).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.qmp_err(format!("migrate {uri}"), e)),
        }
    }

    /// Wall time of the last outgoing migration: from the `migrate` call to
    /// the timestamp of QEMU's terminal MIGRATION event (seen by
    /// `wait_migration_end`). Prefer this to query-migrate's `total-time`,
    /// which QEMU 7.2 sometimes reports as 0 for a guest that is not running.
    pub fn migration_duration(&self) -> Option<Duration> {
        self.migration_ended?
            .duration_since(self.migrate_started?)
            .ok()
    }

    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, LabError> {
        match self.qmp.query_migrate().await {
            Ok(i) => Ok(i),
            Err(e) => Err(self.qmp_err("query-migrate", e)),
        }
    }

    pub async fn query_status(&mut self) -> Result<String, LabError> {
        match self.qmp.query_status().await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.qmp_err("query-status", e)),
        }
    }

    /// Drops MIGRATION events of an earlier migration, so that waiting for
    /// the end of the next one cannot return an old "failed". A command
    /// round trip first: QMP delivers every event emitted before a response
    /// ahead of it.
    pub async fn forget_old_events(&mut self) -> Result<(), LabError> {
        self.query_status().await?;
        self.qmp.take_queued_events();
        Ok(())
    }

    /// Waits for completed/failed/cancelled, driven by MIGRATION events.
    /// A destination QEMU exits when an incoming migration fails; that is
    /// reported as `failed` with its stderr as `error_desc`.
    pub async fn wait_migration_end(
        &mut self,
        timeout: Duration,
    ) -> Result<MigrationInfo, LabError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_event_status: Option<String> = None;
        loop {
            let info = match self.qmp.query_migrate().await {
                Ok(info) => info,
                Err(QmpError::Closed | QmpError::Io { .. }) => return Ok(self.exited_info().await),
                Err(e) => return Err(self.qmp_err("query-migrate", e)),
            };
            if info.is_terminal() {
                // The terminal event is usually queued already; its
                // timestamp is when QEMU got there, not when we looked.
                let ev_time = self
                    .qmp
                    .queued_events()
                    .filter(|e| e.name == "MIGRATION" && e.data["status"] == info.raw["status"])
                    .map(|e| e.timestamp.to_system_time())
                    .last();
                self.migration_ended = Some(ev_time.unwrap_or_else(SystemTime::now));
                return Ok(info);
            }
            // The event says terminal but query-migrate does not (yet): trust the event.
            if let Some(s) = last_event_status.as_deref() {
                if matches!(s, "completed" | "failed" | "cancelled") {
                    return Ok(MigrationInfo {
                        status: Some(s.to_owned()),
                        ..info
                    });
                }
            }
            let ev = tokio::time::timeout_at(deadline, self.qmp.next_event()).await;
            match ev {
                Ok(Ok(ev)) => {
                    if ev.name == "MIGRATION" {
                        last_event_status = ev.data["status"].as_str().map(str::to_owned);
                        self.migration_ended = Some(ev.timestamp.to_system_time());
                    }
                }
                Ok(Err(QmpError::Closed | QmpError::Io { .. })) => {
                    return Ok(self.exited_info().await)
                }
                Ok(Err(e)) => return Err(self.qmp_err("waiting for MIGRATION events", e)),
                Err(_) => {
                    return Err(LabError::Timeout {
                        what: format!(
                            "the end of the migration (last query-migrate: {})",
                            info.raw
                        ),
                        after: timeout,
                        stderr: self.stderr_text(),
                    })
                }
            }
        }
    }

    async fn exited_info(&mut self) -> MigrationInfo {
        let status = match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(Ok(st)) => st.to_string(),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => format!("QMP closed, process still alive after {EXIT_WAIT:?}"),
        };
        MigrationInfo {
            status: Some("failed".into()),
            error_desc: Some(format!(
                "QEMU exited ({status}); stderr:\n{}",
                self.stderr_text()
            )),
            ..Default::default()
        }
    }

    /// Waits until `query-status` reports `status`.
    pub async fn wait_status(&mut self, status: &str, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.query_status().await?;
            if now == status {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!("VM status {status:?} (it is {now:?})"),
                    after: timeout,
                    stderr: self.stderr_text(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// All guest RAM below 4 GiB as the guest sees it, saved to a file in
    /// this VM's tempdir: `pmemsave` of guest-physical 0..ram size. That
    /// range is RAM except the legacy window 0xA0000..0x100000 (VGA hole,
    /// option ROM and BIOS shadows), whose contents also migrate, so both
    /// sides dump the same thing.
    pub async fn ram_dump_file(&mut self) -> Result<PathBuf, LabError> {
        if self.ram_bytes() > 0xB000_0000 {
            return Err(
                self.unexpected("RAM split above 4 GiB: cannot dump it in one piece".into())
            );
        }
        self.dumps += 1;
        let path = self.dir.path().join(format!("pmem-{}.bin", self.dumps));
        let size = self.ram_bytes();
        let file = path.to_str().expect("temp paths are UTF-8").to_owned();
        self.cmd(
            "pmemsave",
            json!({"val": 0, "size": size, "filename": file}),
        )
        .await?;
        let len = std::fs::metadata(&path)
            .map_err(|e| LabError::io(format!("reading {}", path.display()), e))?
            .len();
        if len != size {
            return Err(self.unexpected(format!("pmemsave wrote {len} bytes, not {size}")));
        }
        Ok(path)
    }

    /// `ram_dump_file()` read into memory.
    pub async fn ram_dump(&mut self) -> Result<Vec<u8>, LabError> {
        let path = self.ram_dump_file().await?;
        let data = tokio::fs::read(&path)
            .await
            .map_err(|e| LabError::io(format!("reading {}", path.display()), e))?;
        let _ = tokio::fs::remove_file(&path).await;
        Ok(data)
    }

    /// SHA-256 (hex) of `ram_dump()`.
    pub async fn ram_sha256(&mut self) -> Result<String, LabError> {
        let path = self.ram_dump_file().await?;
        let hash = file_sha256(&path).await;
        let _ = tokio::fs::remove_file(&path).await;
        hash
    }

    /// The RunningCounter guest's counter, read with HMP `xp`.
    pub async fn guest_counter(&mut self) -> Result<u32, LabError> {
        let cmd = format!("xp /1wx {:#x}", guest::COUNTER_ADDR);
        let out = match self.qmp.hmp(&cmd).await {
            Ok(o) => o,
            Err(e) => return Err(self.qmp_err(cmd, e)),
        };
        // "0000000000000500: 0x0001e240\r\n"
        out.split_once(": 0x")
            .and_then(|(_, v)| u32::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| self.unexpected(format!("cannot parse {cmd:?} output {out:?}")))
    }

    /// The VM is `running` and its counter moves forward within `timeout`
    /// (generous: SeaBIOS takes ~6 s to reach the boot sector under a
    /// nested, slow-exit KVM).
    pub async fn wait_running_and_counting(&mut self, timeout: Duration) -> Result<(), LabError> {
        self.wait_status("running", timeout).await?;
        let first = self.guest_counter().await?;
        let deadline = Instant::now() + timeout;
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.guest_counter().await?;
            // Wrapping: the counter may pass 2^32 under KVM.
            let ahead = now.wrapping_sub(first);
            if ahead != 0 && ahead < 1 << 31 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!("the guest counter moving (stuck at {now:#x}, was {first:#x})"),
                    after: timeout,
                    stderr: self.stderr_text(),
                });
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 (hex) of a file, streamed (RAM dumps are up to GiBs). sha2 uses
/// the CPU's SHA extensions; the dev profile builds it with opt-level 3.
pub async fn file_sha256(path: &Path) -> Result<String, LabError> {
    let err = |e| LabError::io(format!("hashing {}", path.display()), e);
    let mut f = tokio::fs::File::open(path).await.map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = f.read(&mut buf).await.map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-256 (hex) of `len` zero bytes: what an untouched guest's RAM hashes
/// to. No file, no allocation of `len`.
pub fn zero_sha256(len: u64) -> String {
    let zeros = vec![0u8; HASH_BUF];
    let mut hasher = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(HASH_BUF as u64) as usize;
        hasher.update(&zeros[..n]);
        left -= n as u64;
    }
    hex::encode(hasher.finalize())
}
