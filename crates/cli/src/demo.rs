//! `miggate demo`: a complete secure migration of a running guest between
//! two local QEMUs, told step by step. Everything lives in a temporary
//! directory: a PKI, two QEMUs (the lab's counting boot-sector guest), a
//! real `miggate daemon` process, and then exactly what `miggate migrate`
//! does, with its progress bar.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miggate::creds::pki;
use miggate::migrate::progress::{duration, Reporter};
use miggate::migrate::{execute, MigrateArgs};
use miggate_lab::{self as lab, Daemon, DaemonOpts, Guest, LabError, Miggate, Qemu, QemuOpts};

/// Client certificate subject of the demo's PKI.
pub const DEMO_CLIENT_DN: &str = "O=miggate demo,CN=source.demo";

/// Small enough to migrate in a second or two under TCG on 2 cores.
pub const DEMO_RAM_MIB: u32 = 64;

/// SeaBIOS reaches the boot sector in a few seconds, even under TCG on a
/// busy machine; this is the patience for "the guest counts".
const GUEST_START: Duration = Duration::from_secs(45);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep the temporary directory (PKI, config, logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// multifd channels for the migration (0: one channel).
    #[arg(long, default_value_t = 0)]
    pub multifd: u8,
    /// The QEMU of both sides: the system's, or 10.0 from scripts/setup.sh.
    #[arg(long, value_enum, default_value = "system")]
    pub qemu: miggate_bench::QemuArg,
    /// Storage migration too: the guest gets a disk of random bytes on
    /// the source (an empty one on the target), which `miggate migrate
    /// --copy-storage` copies through the gateway's NBD channels.
    #[arg(long)]
    pub copy_storage: bool,
}

/// The demo disk's size (--copy-storage).
const DEMO_DISK_MIB: usize = 128;
/// Its block node name on both QEMUs, and its device's id.
const DEMO_DISK_NODE: &str = "disk0";

/// `opts` with a virtio disk backed by the raw image `image`.
fn with_disk(mut opts: QemuOpts, image: &Path) -> QemuOpts {
    opts.extra_args.extend([
        "-blockdev".into(),
        format!("driver=file,filename={},node-name=file0", image.display()),
        "-blockdev".into(),
        format!("driver=raw,file=file0,node-name={DEMO_DISK_NODE}"),
        "-device".into(),
        format!("virtio-blk-pci,drive={DEMO_DISK_NODE},id=vd0"),
    ]);
    opts
}

/// SHA-256 of an image once its QEMU has flushed it.
async fn disk_sha256(q: &mut Qemu, image: &Path) -> Result<String, DemoError> {
    let flush = serde_json::json!({"command-line": "qemu-io -d vd0/virtio-backend flush"});
    q.cmd("human-monitor-command", flush).await?;
    let bytes = std::fs::read(image).map_err(io(format!("reading {}", image.display())))?;
    Ok(lab::sha256_hex(&bytes))
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

/// The target's daemon, its log also in `dir`/daemon.log (kept by `--keep`).
async fn start_daemon(dir: &Path, pki: &Path) -> Result<Daemon, DemoError> {
    let log = dir.join("daemon.log");
    let opts = DaemonOpts {
        log_file: Some(log.clone()),
        ..DaemonOpts::default()
    };
    Miggate::current_exe()?
        .daemon(dir, pki, &opts)
        .await
        .map_err(|e| DemoError::Daemon {
            why: e.to_string(),
            log: std::fs::read_to_string(&log).unwrap_or_default(),
            path: log,
        })
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
    let mut opts = QemuOpts::new(Guest::RunningCounter, DEMO_RAM_MIB);
    opts.uuid = Some(vm_uuid);
    opts.qemu = args.qemu.into();
    let disks = if args.copy_storage {
        let (s, d) = (dir.join("source-disk.img"), dir.join("target-disk.img"));
        let random = lab::guest::random_ram(0xd15c, DEMO_DISK_MIB << 20);
        std::fs::write(&s, random).map_err(io(format!("writing {}", s.display())))?;
        let f = std::fs::File::create(&d).map_err(io(format!("creating {}", d.display())))?;
        f.set_len((DEMO_DISK_MIB as u64) << 20)
            .map_err(io(format!("sizing {}", d.display())))?;
        Some((s, d))
    } else {
        None
    };
    let (src_qmp, dst_qmp) = (dir.join("source.qmp"), dir.join("target.qmp"));
    let (src_opts, dst_opts) = match &disks {
        Some((s, d)) => (with_disk(opts.clone(), s), with_disk(opts.as_incoming(), d)),
        None => (opts.clone(), opts.as_incoming()),
    };
    let (mut src, mut dst) =
        Qemu::pair(src_opts.with_qmp(&src_qmp), dst_opts.with_qmp(&dst_qmp)).await?;
    let accel = lab::accel()?;
    // The version QEMU itself announces, not the one asked for.
    let version = src.qmp.qemu_version().map_or_else(
        || opts.qemu.to_string(),
        |(a, b, c)| format!("QEMU {a}.{b}.{c}"),
    );
    rep.step(&format!(
        "[2/5] {version}: source (pid {}) boots a guest that counts and dirties its memory; target (pid {}) waits with -incoming defer; both VM {vm_uuid}, {DEMO_RAM_MIB} MiB, {accel}",
        src.pid().unwrap_or(0),
        dst.pid().unwrap_or(0),
    ));
    if disks.is_some() {
        rep.step(&format!(
            "      each has a {DEMO_DISK_MIB} MiB virtio disk, node {DEMO_DISK_NODE}: random bytes on the source, zeroes on the target (no shared storage)"
        ));
    }
    src.wait_running_and_counting(GUEST_START).await?;
    rep.step(&format!(
        "      the guest runs on the source: its counter is at {}",
        src.guest_counter().await?
    ));

    // 3. The target's daemon.
    let daemon = start_daemon(&dir, &pki_dir).await?;
    rep.step(&format!(
        "[3/5] miggate daemon (pid {}): control API on unix:{}, migration listener {} (TLS, client certificate required)",
        daemon.gw.pid().unwrap_or(0),
        dir.join("api.sock").display(),
        daemon.gw.addr
    ));

    // 4. Exactly what `miggate migrate` does.
    rep.step(&format!(
        "[4/5] miggate migrate --source-qmp unix:{} --target unix:{} --target-qmp unix:{} --x509-dir {}{}",
        src_qmp.display(),
        dir.join("api.sock").display(),
        dst_qmp.display(),
        pki_dir.display(),
        if disks.is_some() { " --copy-storage" } else { "" }
    ));
    let mut margs = MigrateArgs::new(src_qmp, pki_dir.clone());
    margs.target = Some(format!("unix:{}", dir.join("api.sock").display()));
    margs.target_qmp = Some(dst_qmp);
    margs.multifd = args.multifd;
    margs.copy_storage = disks.is_some();
    match execute(&margs, &mut rep).await {
        Ok(summary) => rep.result(&serde_json::Value::Null, &summary.human()),
        Err(f) => {
            rep.result(&serde_json::Value::Null, &f.sentence);
            return Err(DemoError::Migration(format!(
                "the migration did not complete (daemon log: {})",
                dir.join("daemon.log").display()
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
    if let Some((s, d)) = &disks {
        let (a, b) = (
            disk_sha256(&mut src, s).await?,
            disk_sha256(&mut dst, d).await?,
        );
        if a != b {
            return Err(DemoError::Migration(format!(
                "the target's disk differs from the source's (SHA-256 {b} against {a})"
            )));
        }
        rep.step(&format!(
            "      and its disk arrived whole: both images hash to SHA-256 {}...",
            &a[..16]
        ));
    }
    drop(daemon);
    drop((src, dst));
    if args.keep {
        let kept = tmp.keep();
        rep.step(&format!("kept {}", kept.display()));
    }
    rep.step(&format!("demo done in {}", duration(t0.elapsed())));
    Ok(())
}
