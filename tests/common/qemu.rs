//! Real QEMU processes for integration tests, driven over QMP.
//!
//! Every method panics with QEMU's stderr on failure: a test harness should
//! fail loudly and say why. For the `Result` form of any command, use the
//! public `qmp` field directly.
#![allow(dead_code)] // each integration test binary uses a different subset

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use miggate::qmp::{MigrationInfo, Qmp, QmpError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use uuid::Uuid;

use super::guest;

/// `max-bandwidth` value that lifts QEMU's default 128 MiB/s cap, so that a
/// timing measures the transport rather than the throttle.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

const SPAWN_DEADLINE: Duration = Duration::from_secs(15);

/// Path of qemu-system-x86_64. Panics when it is missing: the tests must
/// fail, not skip, on a machine that cannot run them.
pub fn qemu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("QEMU_SYSTEM_X86_64") {
        return PathBuf::from(p);
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/usr/local/bin".into()]);
    for dir in candidates {
        let p = dir.join("qemu-system-x86_64");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "qemu-system-x86_64 not found: install it with \
         'sudo apt-get install --no-install-recommends qemu-system-x86'"
    );
}

/// Whether /dev/kvm can be opened read-write.
pub fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The accelerator every test VM uses: KVM when usable, TCG otherwise;
/// `MIGGATE_TEST_ACCEL=tcg|kvm` overrides (on a nested host whose KVM exits
/// are slow, TCG boots the counter guest ~10x faster).
pub fn accel() -> &'static str {
    match std::env::var("MIGGATE_TEST_ACCEL").as_deref() {
        Ok("tcg") => "tcg",
        Ok("kvm") => "kvm",
        Ok(other) => panic!("MIGGATE_TEST_ACCEL={other:?}: expected tcg or kvm"),
        Err(_) if kvm_available() => "kvm",
        Err(_) => "tcg",
    }
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
    /// `-machine none`: no guest at all, for QMP-only tests.
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
}

#[derive(Debug, Clone)]
pub struct QemuOpts {
    pub ram_mib: u32,
    pub guest: Guest,
    pub uuid: Option<Uuid>,
    /// Start with `-incoming defer`; call `migrate_incoming` later.
    pub incoming: bool,
    pub tls: Option<NativeTls>,
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
    pub async fn spawn(opts: QemuOpts) -> Qemu {
        let dir = tempfile::Builder::new()
            .prefix("miggate-qemu-")
            .tempdir()
            .expect("tempdir");
        let qmp_path = dir.path().join("qmp.sock");
        let stderr_path = dir.path().join("stderr.log");
        let ram = format!("{}M", opts.ram_mib);
        let ram_bytes = u64::from(opts.ram_mib) << 20;
        let accel = accel();

        let mut args: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-accel".into(),
            accel.into(),
            "-m".into(),
            ram.clone(),
        ];
        let mut push = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
        match opts.guest {
            Guest::PausedRandomRam { seed } => {
                // The RAMBlock takes the backend's id ("ram0"), so source
                // (file backend) and destination (ram backend) match.
                let backend = if opts.incoming {
                    format!("memory-backend-ram,id=ram0,size={ram}")
                } else {
                    let len = ram_bytes as usize;
                    let file = tokio::task::spawn_blocking(move || {
                        guest::random_ram_file(seed, len).expect("write guest RAM file")
                    })
                    .await
                    .unwrap();
                    // share=off: a private mapping, QEMU never writes back.
                    format!(
                        "memory-backend-file,id=ram0,size={ram},mem-path={},share=off",
                        file.display()
                    )
                };
                push(&["-object", &backend, "-machine", "pc,memory-backend=ram0"]);
                push(&["-S"]);
            }
            Guest::RunningCounter => {
                // Each side has its own copy: IDE disks cannot be read-only,
                // and nothing writes to it anyway.
                let disk = dir.path().join("boot.img");
                guest::write_boot_disk(&disk).expect("write boot disk");
                push(&[
                    "-object",
                    &format!("memory-backend-ram,id=ram0,size={ram}"),
                    "-machine",
                    "pc,memory-backend=ram0",
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

        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("stdout file");
        let binary = qemu_binary();
        let mut child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()));

        // QEMU creates the socket once it is listening; retry until then.
        let deadline = Instant::now() + SPAWN_DEADLINE;
        let qmp = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "QEMU exited ({status}) before QMP was up.\nargs: {args:?}\nstderr:\n{}",
                    read_text(&stderr_path)
                );
            }
            match Qmp::connect_unix(&qmp_path).await {
                Ok(q) => break q,
                Err(e) if Instant::now() > deadline => panic!(
                    "QMP at {} not up after {SPAWN_DEADLINE:?}: {e}\nstderr:\n{}",
                    qmp_path.display(),
                    read_text(&stderr_path)
                ),
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
        q.set_capabilities(&[("events", true)]).await;
        if let Some(tls) = q.opts.tls.clone() {
            q.add_native_tls_objects(&tls).await;
        }
        q
    }

    // object-add rather than -object: no ",," escaping of DNs and paths.
    async fn add_native_tls_objects(&mut self, tls: &NativeTls) {
        let endpoint = match tls.endpoint {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        };
        self.cmd(
            "object-add",
            json!({
                "qom-type": "tls-creds-x509",
                "id": TLS_CREDS_ID,
                "dir": tls.dir.to_str().expect("UTF-8 PKI path"),
                "endpoint": endpoint,
                "verify-peer": true,
            }),
        )
        .await;
        if let Some(identity) = &tls.authz_identity {
            assert_eq!(tls.endpoint, TlsEndpoint::Server, "authz is server-side");
            self.cmd(
                "object-add",
                json!({"qom-type": "authz-simple", "id": TLS_AUTHZ_ID, "identity": identity}),
            )
            .await;
        }
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

    /// Runs a command that must succeed; panics with QEMU's stderr otherwise.
    pub async fn cmd(&mut self, command: &str, arguments: Value) -> Value {
        let args = (!arguments.is_null()).then_some(arguments);
        match self.qmp.execute(command, args.clone()).await {
            Ok(v) => v,
            Err(e) => panic!(
                "{command} {}: {e}\nstderr:\n{}",
                args.unwrap_or_default(),
                self.stderr_text()
            ),
        }
    }

    pub async fn set_capabilities(&mut self, caps: &[(&str, bool)]) {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await;
    }

    pub async fn set_parameters(&mut self, params: Value) {
        self.cmd("migrate-set-parameters", params).await;
    }

    /// Points migration at the `NativeTls` objects: tls-creds, plus
    /// tls-authz on a server with an identity, plus tls-hostname if given
    /// (a client checks the server certificate against it).
    pub async fn set_native_tls_parameters(&mut self, hostname: Option<&str>) {
        let tls = self
            .opts
            .tls
            .clone()
            .expect("set_native_tls_parameters on a VM without QemuOpts::tls");
        let mut p = json!({ "tls-creds": TLS_CREDS_ID });
        if tls.authz_identity.is_some() {
            p["tls-authz"] = json!(TLS_AUTHZ_ID);
        }
        if let Some(h) = hostname {
            p["tls-hostname"] = json!(h);
        }
        self.set_parameters(p).await;
    }

    pub async fn migrate_incoming(&mut self, uri: &str) {
        self.cmd("migrate-incoming", json!({ "uri": uri })).await;
    }

    /// `migrate-incoming tcp:127.0.0.1:0` and returns the port QEMU bound.
    pub async fn migrate_incoming_any_port(&mut self) -> u16 {
        self.migrate_incoming("tcp:127.0.0.1:0").await;
        let info = self.query_migrate().await;
        let port = info.raw["socket-address"][0]["port"]
            .as_str()
            .and_then(|p| p.parse().ok());
        port.unwrap_or_else(|| panic!("no listening port in query-migrate: {}", info.raw))
    }

    pub async fn migrate(&mut self, uri: &str) {
        self.migrate_started = Some(SystemTime::now());
        self.migration_ended = None;
        self.cmd("migrate", json!({ "uri": uri })).await;
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

    pub async fn query_migrate(&mut self) -> MigrationInfo {
        match self.qmp.query_migrate().await {
            Ok(i) => i,
            Err(e) => panic!("query-migrate: {e}\nstderr:\n{}", self.stderr_text()),
        }
    }

    pub async fn query_status(&mut self) -> String {
        match self.qmp.query_status().await {
            Ok(s) => s,
            Err(e) => panic!("query-status: {e}\nstderr:\n{}", self.stderr_text()),
        }
    }

    /// Waits for completed/failed/cancelled, driven by MIGRATION events.
    /// A destination QEMU exits when an incoming migration fails; that is
    /// reported as `failed` with its stderr as `error_desc`.
    pub async fn wait_migration_end(&mut self, timeout: Duration) -> MigrationInfo {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_event_status: Option<String> = None;
        loop {
            let info = match self.qmp.query_migrate().await {
                Ok(info) => info,
                Err(QmpError::Closed | QmpError::Io { .. }) => return self.exited_info().await,
                Err(e) => panic!("query-migrate: {e}\nstderr:\n{}", self.stderr_text()),
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
                return info;
            }
            // The event says terminal but query-migrate does not (yet): trust the event.
            if let Some(s) = last_event_status.as_deref() {
                if matches!(s, "completed" | "failed" | "cancelled") {
                    return MigrationInfo {
                        status: Some(s.to_owned()),
                        ..info
                    };
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
                Ok(Err(QmpError::Closed | QmpError::Io { .. })) => return self.exited_info().await,
                Ok(Err(e)) => panic!("waiting for MIGRATION events: {e}"),
                Err(_) => panic!(
                    "migration did not end within {timeout:?}; last query-migrate: {}\nstderr:\n{}",
                    info.raw,
                    self.stderr_text()
                ),
            }
        }
    }

    async fn exited_info(&mut self) -> MigrationInfo {
        let status = match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(st)) => st.to_string(),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => "QMP closed, process still alive after 5 s".into(),
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
    pub async fn wait_status(&mut self, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.query_status().await;
            if now == status {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "VM status {now:?}, not {status:?}, after {timeout:?}\nstderr:\n{}",
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// All guest RAM below 4 GiB as the guest sees it, saved to a file in
    /// this VM's tempdir: `pmemsave` of guest-physical 0..ram size. That
    /// range is RAM except the legacy window 0xA0000..0x100000 (VGA hole,
    /// option ROM and BIOS shadows), whose contents also migrate, so both
    /// sides dump the same thing.
    pub async fn ram_dump_file(&mut self) -> PathBuf {
        assert!(self.ram_bytes() <= 0xB000_0000, "RAM split above 4 GiB");
        self.dumps += 1;
        let path = self.dir.path().join(format!("pmem-{}.bin", self.dumps));
        let size = self.ram_bytes();
        self.cmd(
            "pmemsave",
            json!({"val": 0, "size": size, "filename": path.to_str().unwrap()}),
        )
        .await;
        let len = std::fs::metadata(&path).expect("pmemsave dump").len();
        assert_eq!(len, size, "pmemsave wrote a short file");
        path
    }

    /// `ram_dump_file()` read into memory.
    pub async fn ram_dump(&mut self) -> Vec<u8> {
        let path = self.ram_dump_file().await;
        let data = tokio::fs::read(&path).await.expect("read pmemsave dump");
        let _ = tokio::fs::remove_file(&path).await;
        data
    }

    /// SHA-256 (hex) of `ram_dump()`.
    pub async fn ram_sha256(&mut self) -> String {
        let path = self.ram_dump_file().await;
        let hash = file_sha256(&path).await;
        let _ = tokio::fs::remove_file(&path).await;
        hash
    }

    /// The RunningCounter guest's counter, read with HMP `xp`.
    pub async fn guest_counter(&mut self) -> u32 {
        let cmd = format!("xp /1wx {:#x}", guest::COUNTER_ADDR);
        let out = match self.qmp.hmp(&cmd).await {
            Ok(o) => o,
            Err(e) => panic!("{cmd}: {e}\nstderr:\n{}", self.stderr_text()),
        };
        // "0000000000000500: 0x0001e240\r\n"
        out.split_once(": 0x")
            .and_then(|(_, v)| u32::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("cannot parse {cmd:?} output {out:?}"))
    }

    /// The VM is `running` and its counter moves forward within a deadline.
    /// The deadline is generous because SeaBIOS takes ~6 s to reach the boot
    /// sector under the (nested, slow-exit) KVM of the CI machine.
    pub async fn assert_running_and_counting(&mut self) {
        let timeout = Duration::from_secs(60);
        self.wait_status("running", timeout).await;
        let first = self.guest_counter().await;
        let deadline = Instant::now() + timeout;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.guest_counter().await;
            // Wrapping: the counter may pass 2^32 under KVM.
            let ahead = now.wrapping_sub(first);
            if ahead != 0 && ahead < 1 << 31 {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "guest counter stuck at {now:#x} (was {first:#x}) for {timeout:?}\nstderr:\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
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

/// SHA-256 (hex) of a file. Uses coreutils' `sha256sum` when present: the
/// `sha2` crate in a debug build hashes ~25 MiB/s, 5 s per 128 MiB guest.
pub async fn file_sha256(path: &Path) -> String {
    if let Ok(out) = Command::new("sha256sum").arg(path).output().await {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(hash) = text.split_whitespace().next() {
                return hash.to_owned();
            }
        }
    }
    let data = tokio::fs::read(path).await.expect("read file to hash");
    tokio::task::spawn_blocking(move || sha256_hex(&data))
        .await
        .unwrap()
}

/// SHA-256 (hex) of `len` zero bytes: what an untouched guest's RAM hashes
/// to. Hashes a sparse file, so it costs no disk space.
pub async fn zero_sha256(len: u64) -> String {
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().set_len(len).expect("set_len");
    file_sha256(f.path()).await
}
