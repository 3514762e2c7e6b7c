//! `miggate demo`: a complete secure migration of a running guest between
//! two local QEMUs, told step by step. Everything lives in a temporary
//! directory: a PKI, two QEMUs (the lab's counting boot-sector guest), a
//! real `miggate daemon` process, and then exactly what `miggate migrate`
//! does, with its progress bar.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use miggate::control::client::{ApiAddr, ApiClient};
use miggate::creds::pki;
use miggate::migrate::progress::{duration, Reporter};
use miggate::migrate::{execute, MigrateArgs};
use miggate_lab::{self as lab, Guest, LabError, Qemu, QemuOpts};

/// Client certificate subject of the demo's PKI.
pub const DEMO_CLIENT_DN: &str = "O=miggate demo,CN=source.demo";

/// Small enough to migrate in a second or two under TCG on 2 cores.
pub const DEMO_RAM_MIB: u32 = 64;

/// SeaBIOS reaches the boot sector in a few seconds, even under TCG on a
/// busy machine; this is the patience for "the guest counts".
const GUEST_START: Duration = Duration::from_secs(45);

/// The daemon binds its sockets and validates its config in milliseconds.
const DAEMON_START: Duration = Duration::from_secs(20);

const DAEMON_POLL: Duration = Duration::from_millis(50);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep the temporary directory (PKI, config, logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// multifd channels for the migration (0: one channel).
    #[arg(long, default_value_t = 0)]
    pub multifd: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("creating the demo PKI")]
    Pki(#[from] pki::PkiError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the miggate daemon did not come up: {why}\n--- its log ({}) ---\n{log}", path.display())]
    Daemon {
        why: String,
        path: PathBuf,
        log: String,
    },
    #[error("{0}")]
    Migration(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// The daemon process; killed when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    async fn start(dir: &Path, pki: &Path) -> Result<(Daemon, ApiClient), DemoError> {
        let api_sock = dir.join("api.sock");
        // The daemon creates its runtime directory, private (0700).
        let run_dir = dir.join("run");
        let config = dir.join("daemon.toml");
        // A loopback listener on a port of the kernel's choice; the API
        // answer tells the source where it is.
        let text = format!(
            "[daemon]\nruntime_dir = {run:?}\n\n[api]\nsocket = {api:?}\n\n[[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = {pki:?}\n",
            run = run_dir.display().to_string(),
            api = api_sock.display().to_string(),
            pki = pki.display().to_string(),
        );
        std::fs::write(&config, text).map_err(io("writing the daemon's config"))?;
        let log = dir.join("daemon.log");
        let log_file = std::fs::File::create(&log).map_err(io("creating the daemon's log"))?;
        let exe = std::env::current_exe().map_err(io("finding the miggate binary"))?;
        let child = Command::new(exe)
            .args(["--log-format", "json", "daemon", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting miggate daemon"))?;
        let mut d = Daemon { child, log };
        let api = ApiClient::new(ApiAddr::Unix(api_sock)).map_err(|e| d.failed(e.to_string()))?;
        let deadline = Instant::now() + DAEMON_START;
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(d.failed(format!("it exited ({status})")));
            }
            match api.migrations().await {
                Ok(_) => return Ok((d, api)),
                Err(e) if Instant::now() > deadline => {
                    return Err(d.failed(format!("its API does not answer: {e}")))
                }
                Err(_) => tokio::time::sleep(DAEMON_POLL).await,
            }
        }
    }

    fn failed(&self, why: String) -> DemoError {
        DemoError::Daemon {
            why,
            path: self.log.clone(),
            log: std::fs::read_to_string(&self.log).unwrap_or_default(),
        }
    }

    /// The migration listener's address, from the daemon's "listening" log.
    fn listener(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "listening" && v["listen"].is_string())
            .and_then(|v| v["listen"].as_str().map(str::to_owned))
    }
}

/// Runs the demo; `Ok` when the guest runs on the destination afterwards.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let t0 = Instant::now();
    let mut rep = Reporter::new(false);
    let tmp = tempfile::Builder::new()
        .prefix("miggate-demo-")
        .tempdir()
        .map_err(io("creating a temporary directory"))?;
    let dir = tmp.path().to_path_buf();
    rep.step(&format!(
        "miggate demo: a live migration of a running guest between two local QEMUs, secured by miggate (working in {})",
        dir.display()
    ));

    // 1. Certificates in QEMU's tls-creds-x509 layout.
    let pki_dir = dir.join("pki");
    let opts = pki::InitOptions {
        client_dn: DEMO_CLIENT_DN.into(),
        ..Default::default()
    };
    pki::init(&pki_dir, &opts)?;
    rep.step(&format!(
        "[1/5] PKI: a CA, a server certificate for {} and a client certificate for {DEMO_CLIENT_DN}",
        opts.hostnames.join(", ")
    ));

    // 2. Two QEMUs. Each gets a second QMP socket: the lab keeps the first,
    // `migrate` uses the source's, the daemon the target's.
    let vm_uuid = uuid::Uuid::new_v4();
    let src_qmp = dir.join("source.qmp");
    let dst_qmp = dir.join("target.qmp");
    let qmp_arg = |p: &Path| {
        vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", p.display()),
        ]
    };
    let mut src_opts = QemuOpts::new(Guest::RunningCounter, DEMO_RAM_MIB);
    src_opts.uuid = Some(vm_uuid);
    let mut dst_opts = src_opts.as_incoming();
    src_opts.extra_args = qmp_arg(&src_qmp);
    dst_opts.extra_args = qmp_arg(&dst_qmp);
    let (src, dst) = tokio::join!(Qemu::spawn(src_opts), Qemu::spawn(dst_opts));
    let (mut src, mut dst) = (src?, dst?);
    let accel = lab::accel()?;
    rep.step(&format!(
        "[2/5] QEMU: source (pid {}) boots a guest that counts and dirties its memory; target (pid {}) waits with -incoming defer; both VM {vm_uuid}, {DEMO_RAM_MIB} MiB, {accel}",
        src.pid().unwrap_or(0),
        dst.pid().unwrap_or(0),
    ));
    src.wait_running_and_counting(GUEST_START).await?;
    rep.step(&format!(
        "      the guest runs on the source: its counter is at {}",
        src.guest_counter().await?
    ));

    // 3. The target's daemon.
    let (daemon, _api) = Daemon::start(&dir, &pki_dir).await?;
    rep.step(&format!(
        "[3/5] miggate daemon (pid {}): control API on unix:{}, migration listener {} (TLS, client certificate required)",
        daemon.child.id().unwrap_or(0),
        dir.join("api.sock").display(),
        daemon.listener().unwrap_or_else(|| "up".into())
    ));

    // 4. Exactly what `miggate migrate` does.
    rep.step(&format!(
        "[4/5] miggate migrate --source-qmp unix:{} --target unix:{} --target-qmp unix:{} --x509-dir {}",
        src_qmp.display(),
        dir.join("api.sock").display(),
        dst_qmp.display(),
        pki_dir.display()
    ));
    let mut margs = MigrateArgs::new(src_qmp, pki_dir.clone());
    margs.target = Some(format!("unix:{}", dir.join("api.sock").display()));
    margs.target_qmp = Some(dst_qmp);
    margs.multifd = args.multifd;
    match execute(&margs, &mut rep).await {
        Ok(summary) => rep.result(&serde_json::Value::Null, &summary.human()),
        Err(f) => {
            rep.result(&serde_json::Value::Null, &f.sentence);
            return Err(DemoError::Migration(format!(
                "the migration did not complete (daemon log: {})",
                daemon.log.display()
            )));
        }
    }

    rep.step("      (the guest touched little of its RAM: untouched pages are zero pages, which QEMU sends as short markers, so most of the RAM costs almost no bytes)");

    // 5. The proof: the guest goes on counting on the destination.
    let stopped_at = src.guest_counter().await?;
    let src_state = src.query_status().await?;
    dst.wait_running_and_counting(GUEST_START).await?;
    let now = dst.guest_counter().await?;
    rep.step(&format!(
        "[5/5] the guest runs on the destination: the source stopped ({src_state}) with the counter at {stopped_at}, the destination has counted on to {now}"
    ));
    drop(daemon);
    drop((src, dst));
    if args.keep {
        let kept = tmp.keep();
        rep.step(&format!("kept {}", kept.display()));
    }
    rep.step(&format!("demo done in {}", duration(t0.elapsed())));
    Ok(())
}
