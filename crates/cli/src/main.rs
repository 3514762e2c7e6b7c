//! The `miggate` command line: argument parsing and wiring. The gateways,
//! the daemon and `migrate` live in the `miggate` library; `demo` (below)
//! and `bench` (crate `miggate-bench`) drive the QEMU lab (`miggate-lab`).

mod demo;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rustls_pki_types::ServerName;

use miggate::admit::Expectation;
use miggate::authz::AuthzConfig;
use miggate::creds::{pki, tls};
use miggate::gate::{source, target};
use miggate::net::{unix_bind, Endpoint, HostPort};

#[derive(Parser)]
#[command(
    name = "miggate",
    version,
    about = "Secure gateway for VM live migration"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Certificates in QEMU's tls-creds-x509 directory layout.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Target gateway: TLS in (client certificate required), plain out to the target QEMU.
    Target(TargetArgs),
    /// Source gateway: plain in from the source QEMU, TLS out to the target.
    Source(SourceArgs),
    /// Managed mode: target listeners for registered migrations (one-shot
    /// tickets), a control API, metrics (see docs/daemon.example.toml).
    Daemon {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Validate the configuration (certificates, ACLs, paths), print it
        /// with every default filled in, and exit.
        #[arg(long)]
        check: bool,
    },
    /// Side-by-side migration benchmark: plain, QEMU TLS, stunnel, socat, miggate.
    Bench(miggate_bench::BenchArgs),
    /// Migrate a QEMU VM end to end: the target daemon's API, a source
    /// gateway with a one-shot ticket, progress, and a summary or the cause.
    Migrate(miggate::migrate::MigrateArgs),
    /// A complete secure migration of a running guest between two local QEMUs.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA, a server and a client certificate and keys in DIR.
    Init {
        dir: PathBuf,
        /// Name (DNS or IP) the server certificate is valid for; repeat for more.
        /// Default: localhost, 127.0.0.1, ::1.
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        /// Subject of the client certificate, e.g. "O=Example Org,CN=src.example.com".
        #[arg(long, default_value = pki::DEFAULT_CLIENT_DN)]
        client_dn: String,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 365, value_parser = days_range())]
        days: u32,
    },
    /// Issue another client certificate from the CA in CA_DIR into a new directory OUT.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        client_dn: String,
        #[arg(long, default_value_t = 365, value_parser = days_range())]
        days: u32,
    },
    /// Revoke a certificate issued by the CA in CA_DIR: (re)writes CA_DIR/ca-crl.pem.
    /// Copy it into the target hosts' directories and reload them.
    Revoke {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate to revoke (PEM), e.g. a source host's client-cert.pem.
        cert: PathBuf,
        /// Days until the revocation list must be renewed.
        #[arg(long, default_value_t = 30, value_parser = days_range())]
        days: u32,
    },
}

/// `--days`: a certificate or CRL validity the date arithmetic can hold.
fn days_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(miggate::timeouts::MAX_DAYS))
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("authz").required(true).args(["authz_identity", "authz_list_file", "allow_any_verified_peer"])))]
struct TargetArgs {
    /// Address to listen on for TLS connections, HOST:PORT (port 0 picks one).
    #[arg(long)]
    listen: String,
    /// PKI directory in QEMU's layout (uses server-cert/key, ca-cert, ca-crl).
    #[arg(long)]
    x509_dir: PathBuf,
    /// Where the target QEMU listens: tcp:HOST:PORT or unix:PATH. A unix
    /// path containing {uuid} is chosen per VM: each channel goes to the
    /// socket named by the VM UUID its stream carries (one gateway pair
    /// for many VMs; needs validate-uuid and -uuid; no postcopy).
    #[arg(long)]
    forward: Endpoint,
    /// Storage migration: where the target QEMU's NBD server listens
    /// (nbd-server-start), tcp:HOST:PORT or unix:PATH. NBD channels from
    /// an authorized source go there, for the exports of --nbd-export only.
    #[arg(long, value_name = "ENDPOINT", requires = "nbd_export")]
    forward_nbd: Option<Endpoint>,
    /// An NBD export an NBD channel may ask for (repeat for each disk).
    #[arg(long, value_name = "NAME", requires = "forward_nbd")]
    nbd_export: Vec<String>,
    /// Allow exactly this client certificate DN (QEMU authz-simple).
    #[arg(long)]
    authz_identity: Option<String>,
    /// QEMU authz-list JSON file, reloaded when it changes (QEMU authz-list-file).
    #[arg(long)]
    authz_list_file: Option<PathBuf>,
    /// Do not reload --authz-list-file when it changes.
    #[arg(long, requires = "authz_list_file")]
    no_refresh: bool,
    /// Allow any peer whose certificate chains to the CA (no DN check).
    #[arg(long)]
    allow_any_verified_peer: bool,
    /// Refuse streams that do not carry this VM UUID (main channel's
    /// configuration/uuid with QEMU's validate-uuid; multifd init packets).
    #[arg(long)]
    expect_uuid: Option<uuid::Uuid>,
    /// Seconds a peer may stay silent before it is cut off (1 to 3600).
    #[arg(long, default_value_t = miggate::timeouts::DEFAULT_STALL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=miggate::timeouts::MAX_STALL_SECS))]
    stall_timeout: u64,
    /// Seconds a peer has to complete the TLS handshake.
    #[arg(long, default_value_t = miggate::timeouts::DEFAULT_HANDSHAKE.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=miggate::timeouts::MAX_HANDSHAKE.as_secs()))]
    handshake_timeout: u64,
    /// Connections not yet admitted (TLS handshake, hello, stream check)
    /// at one time; more are closed at once and counted as overload.
    #[arg(long, default_value_t = miggate::timeouts::DEFAULT_MAX_PENDING,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=miggate::timeouts::MAX_PENDING as u64))]
    max_pending: usize,
    /// The same, per source IP address.
    #[arg(long, default_value_t = miggate::timeouts::DEFAULT_MAX_PENDING_PER_IP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=miggate::timeouts::MAX_PENDING as u64))]
    max_pending_per_ip: usize,
    /// ACL file reloads and ca-crl.pem changes apply to new connections
    /// only. By default they also close the live channels of a peer no
    /// longer allowed (its source QEMU's migration fails, the VM keeps
    /// running on the source).
    #[arg(long)]
    keep_live_on_acl_change: bool,
    /// Refresh each channel's TLS 1.3 keys after every N MiB this side
    /// sends (towards the source: the return path, postcopy pages), at
    /// most one per 250 ms. Without it, this side's keys change only in
    /// answer to a source's key update request, when it next sends data.
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=miggate::timeouts::MAX_REKEY_AFTER_MIB))]
    rekey_after_mib: Option<u64>,
    /// Keep the postcopy recovery state (hashes of binding tokens) in this
    /// private directory (created 0700), so that a migration paused in
    /// postcopy can still be recovered through this gateway after it
    /// restarts. Without it, a restart loses those recoveries. One
    /// directory per gateway process.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct SourceArgs {
    /// Where the source QEMU migrates to: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    listen: Endpoint,
    /// Storage migration: where the source QEMU's NBD client connects (the
    /// `server` of its `nbd` block node), tcp:HOST:PORT or unix:PATH; its
    /// connections go to the target gateway as NBD channels. Same local
    /// peer rules as --listen.
    #[arg(long, value_name = "ENDPOINT")]
    listen_nbd: Option<Endpoint>,
    /// The target gateway (or a target QEMU with native TLS), HOST:PORT.
    #[arg(long)]
    connect: String,
    /// PKI directory in QEMU's layout (uses client-cert/key, ca-cert, ca-crl).
    #[arg(long)]
    x509_dir: PathBuf,
    /// Name the target's certificate must carry; default: the host in --connect.
    #[arg(long)]
    tls_hostname: Option<String>,
    /// Seconds a peer may stay silent before it is cut off (1 to 3600).
    #[arg(long, default_value_t = miggate::timeouts::DEFAULT_STALL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=miggate::timeouts::MAX_STALL_SECS))]
    stall_timeout: u64,
    /// File holding the one-shot ticket of a registered migration (from
    /// the target daemon). Also read from $MIGGATE_TICKET_FILE; the ticket
    /// itself from $MIGGATE_TICKET. Never on the command line, where ps shows it.
    #[arg(long, env = "MIGGATE_TICKET_FILE")]
    ticket_file: Option<PathBuf>,
    /// Carry the recovery of a registered postcopy migration cut while
    /// another gateway carried it: a file holding the binding_token of the
    /// daemon's POST /v1/migrations/{id}/recover answer (its ticket goes in
    /// --ticket-file). Needs --listen unix: with --source-qmp or --source-pid:
    /// the token resumes that QEMU's cut main channel.
    #[arg(long, value_name = "FILE", requires = "ticket_file")]
    resume_token_file: Option<PathBuf>,
    /// Refresh each channel's TLS 1.3 keys after every N MiB sent (a
    /// KeyUpdate that also asks the target to refresh its own), at most
    /// one per 250 ms (QEMU's GnuTLS refuses more than 8 per second).
    /// Default: only at the cipher's limits, which a migration rarely reaches.
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=miggate::timeouts::MAX_REKEY_AFTER_MIB))]
    rekey_after_mib: Option<u64>,
    /// --listen unix: the socket's mode, octal, in force from the moment it
    /// exists (whatever the umask).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode, default_value = "0600")]
    listen_mode: u32,
    /// --listen unix: accept connections from this process only (the source
    /// QEMU; its multifd threads share its pid). Others are refused at once.
    #[arg(long, value_name = "PID", conflicts_with = "source_qmp")]
    source_pid: Option<i32>,
    /// --listen unix: accept connections only from the QEMU serving this
    /// QMP socket (unix:PATH); its pid comes from the socket's peer
    /// credentials (SO_PEERCRED), without speaking QMP.
    #[arg(long, value_name = "unix:PATH", value_parser = miggate::migrate::parse_qmp)]
    source_qmp: Option<PathBuf>,
    /// A new ca-crl.pem applies to new connections only. By default a
    /// live channel whose target's certificate it revokes is also closed
    /// (the source QEMU's migration fails, the VM keeps running).
    #[arg(long)]
    keep_live_on_acl_change: bool,
}

/// A file mode in octal (`600`, `0600`, `0o600`), permission bits only.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode from 0000 to 0777")),
    }
}

/// The ticket for `miggate source`, from a file or the environment.
fn source_ticket(file: Option<&std::path::Path>) -> Result<Option<miggate::admit::ticket::Ticket>> {
    use miggate::admit::ticket::Ticket;
    let text = match (file, std::env::var("MIGGATE_TICKET")) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the ticket file {}", path.display()))?,
        (None, Ok(t)) => t,
        (None, Err(_)) => return Ok(None),
    };
    Ok(Some(Ticket::parse(&text).context("invalid ticket")?))
}

/// The binding token of `--resume-token-file`, for a listener that
/// serves one known QEMU process (whose cut main channel it resumes).
fn resume_token(
    file: Option<&std::path::Path>,
    listener: &source::LocalListener,
) -> Result<Option<miggate::wire::frames::Secret>> {
    let Some(path) = file else { return Ok(None) };
    if !matches!(listener, source::LocalListener::Unix { only: Some(_), .. }) {
        bail!("--resume-token-file needs --listen unix:PATH with --source-qmp or --source-pid: the token resumes the cut main channel of that QEMU");
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the resume token file {}", path.display()))?;
    // Same form as a ticket (64 hex digits), and zeroed the same way.
    let token = miggate::admit::ticket::Ticket::parse(&text)
        .with_context(|| format!("{}: not a binding token", path.display()))?;
    Ok(Some(miggate::wire::frames::Secret::new(token.expose())))
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colour only for a person at a terminal, not in files or journald.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn stall(secs: u64) -> Result<Duration> {
    // clap has bounded it already; this keeps the library's own check.
    Ok(miggate::timeouts::bounded_secs(
        "--stall-timeout",
        secs,
        1,
        miggate::timeouts::MAX_STALL_SECS,
    )?)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // migrate and demo report every outcome in their own words; log lines
    // would only repeat them over the progress bar.
    let quiet = matches!(cli.cmd, Cmd::Migrate(_) | Cmd::Demo(_));
    init_logging(cli.log_format, if quiet { "error" } else { "info" });
    match cli.cmd {
        Cmd::Pki(cmd) => run_pki(cmd),
        Cmd::Target(args) => runtime()?.block_on(run_target(args)),
        Cmd::Source(args) => runtime()?.block_on(run_source(args)),
        Cmd::Daemon { config, check } if check => {
            print!("{}", miggate::daemon::run::check(&config)?);
            Ok(())
        }
        Cmd::Daemon { config, .. } => Ok(runtime()?.block_on(miggate::daemon::run(&config))?),
        Cmd::Bench(args) => runtime()?.block_on(miggate_bench::run(args)),
        Cmd::Migrate(args) => {
            let code = runtime()?.block_on(miggate::migrate::run(args));
            std::process::exit(code.into())
        }
        Cmd::Demo(args) => Ok(runtime()?.block_on(demo::run(args))?),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_pki(cmd: PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            hostnames,
            client_dn,
            days,
        } => {
            let mut opts = pki::InitOptions {
                client_dn,
                days,
                ..Default::default()
            };
            if !hostnames.is_empty() {
                opts.hostnames = hostnames;
            }
            pki::init(&dir, &opts)?;
            println!(
                "created CA, server ({}) and client ({}) certificates in {}",
                opts.hostnames.join(", "),
                opts.client_dn,
                dir.display()
            );
            println!(
                "note: {} is the CA's private key; keep it off the migration hosts",
                dir.join(pki::CA_KEY).display()
            );
        }
        PkiCmd::Issue {
            ca_dir,
            out,
            client_dn,
            days,
        } => {
            pki::issue_client(&ca_dir, &out, &client_dn, days)?;
            println!("issued client certificate {client_dn} in {}", out.display());
        }
        PkiCmd::Revoke { ca_dir, cert, days } => {
            let n = pki::revoke(&ca_dir, &cert, days)?;
            println!(
                "revoked {}; {} now lists {n} revoked certificate(s)",
                cert.display(),
                ca_dir.join(tls::CA_CRL).display()
            );
        }
    }
    Ok(())
}

async fn run_target(a: TargetArgs) -> Result<()> {
    let stall = stall(a.stall_timeout)?;
    let choice = AuthzConfig::from_cli(
        a.authz_identity,
        a.authz_list_file,
        a.no_refresh,
        a.allow_any_verified_peer,
    )?;
    let authz = choice.build()?;
    let tls = tls::server_config(&a.x509_dir, &[tls::ALPN_MIGGATE])?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(
        role = "target",
        listen = %listener.local_addr()?,
        forward = %a.forward,
        authz = ?choice,
        expect_uuid = a.expect_uuid.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
        "listening"
    );
    if let Some(Endpoint::Unix(p)) = &a.forward_nbd {
        if p.to_string_lossy()
            .contains(miggate::admit::UUID_PLACEHOLDER)
        {
            bail!("--forward-nbd cannot be chosen per VM: an NBD channel carries no VM UUID");
        }
    }
    let route = target::StaticRoute {
        forward: a.forward,
        authz,
        expect: Expectation {
            uuid: a.expect_uuid,
        },
        nbd: a.forward_nbd.map(|forward| target::NbdRoute {
            forward,
            exports: a.nbd_export,
        }),
    };
    let limits = target::Limits {
        handshake: Duration::from_secs(a.handshake_timeout),
        max_pending: a.max_pending,
        max_pending_per_ip: a.max_pending_per_ip,
    };
    let gate = target::Target::new(tls, Some(route), None, stall, None, limits);
    gate.watch_revocations(&a.x509_dir, a.keep_live_on_acl_change)?;
    gate.set_rekey_after(a.rekey_after_mib.map(|m| m << 20));
    if let Some(dir) = &a.state_dir {
        let n = gate.bindings().persist_in(dir)?;
        if n > 0 {
            tracing::info!(
                paused = n, dir = %dir.display(),
                "postcopy recovery state taken back: migrations paused before the restart may resume"
            );
        }
    }
    tokio::select! {
        r = target::serve(listener, gate) => r?,
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}

async fn run_source(a: SourceArgs) -> Result<()> {
    let stall = stall(a.stall_timeout)?;
    let host = match &a.tls_hostname {
        Some(h) => h.clone(),
        None => match a.connect.parse::<HostPort>() {
            Ok(hp) => hp.host,
            Err(e) => bail!("--connect {e}"),
        },
    };
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("{host:?} is not a valid TLS hostname"))?;
    let tls = tls::client_config(&a.x509_dir, &[tls::ALPN_MIGGATE])?;
    let tcp = |e: &Endpoint| matches!(e, Endpoint::Tcp(_));
    if (tcp(&a.listen) || a.listen_nbd.as_ref().is_some_and(tcp))
        && (a.source_pid.is_some() || a.source_qmp.is_some())
    {
        bail!("--source-pid and --source-qmp need --listen unix:PATH: the kernel tells the peer's pid on unix sockets only");
    }
    let only = match (a.source_pid, &a.source_qmp) {
        (Some(pid), _) => Some(source::LocalPeer {
            pid,
            known_as: "from --source-pid".into(),
        }),
        (None, Some(qmp)) => {
            let cred = miggate::qmp::server_cred(qmp).await.with_context(|| {
                format!("cannot learn the source QEMU's pid from {}", qmp.display())
            })?;
            let pid = cred.pid().with_context(|| {
                format!("the kernel did not tell the pid serving {}", qmp.display())
            })?;
            Some(source::LocalPeer {
                pid,
                known_as: format!("the QEMU of QMP socket {}", qmp.display()),
            })
        }
        (None, None) => None,
    };
    let listener = local_listener(&a.listen, only.clone(), a.listen_mode).await?;
    let nbd_listener = match &a.listen_nbd {
        Some(e) => Some(local_listener(e, only, a.listen_mode).await?),
        None => None,
    };
    let (shown, only) = match &listener {
        source::LocalListener::Tcp(l) => (format!("tcp:{}", l.local_addr()?), "-".to_string()),
        source::LocalListener::Unix { path, only, .. } => (
            format!("unix:{}", path.display()),
            only.as_ref().map_or_else(
                || "any process the socket's mode lets in".to_string(),
                |p| format!("pid {} ({})", p.pid, p.known_as),
            ),
        ),
    };
    tracing::info!(role = "source", listen = %shown, connect = %a.connect, tls_hostname = %host, local_peer = %only, "listening");
    let revocation = source::SourceRevocation::start(
        &a.x509_dir,
        server_name.clone(),
        a.keep_live_on_acl_change,
        tls.clone(),
    )?;
    let cfg = source::SourceConfig {
        tls,
        connect: a.connect,
        server_name,
        stall,
        rekey_after: a.rekey_after_mib.map(|m| m << 20),
        ticket: source_ticket(a.ticket_file.as_deref())?,
        sink: None,
        resume: resume_token(a.resume_token_file.as_deref(), &listener)?,
    };
    let cfg = std::sync::Arc::new(cfg);
    let nbd = async {
        match nbd_listener {
            Some(l) => source::serve_nbd(l, cfg.clone(), Some(revocation.clone())).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = source::serve_with(listener, cfg.clone(), Some(revocation.clone())) => r?,
        r = nbd => r?,
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}

/// A local listener of `miggate source`: TCP on loopback, or a unix
/// socket with `mode` that only `only` may use.
async fn local_listener(
    at: &Endpoint,
    only: Option<source::LocalPeer>,
    mode: u32,
) -> Result<source::LocalListener> {
    Ok(match at {
        Endpoint::Tcp(addr) => {
            let sockaddr = tokio::net::lookup_host((addr.host.as_str(), addr.port))
                .await
                .with_context(|| format!("cannot resolve {addr}"))?
                .next()
                .with_context(|| format!("{addr} resolves to no address"))?;
            source::LocalListener::Tcp(
                miggate::net::socket::bind_local_listener(sockaddr)
                    .with_context(|| format!("cannot listen on {addr}"))?,
            )
        }
        Endpoint::Unix(path) => {
            let bound = unix_bind::bind(path, unix_bind::Access::mode(mode))
                .with_context(|| format!("cannot listen on unix:{}", path.display()))?;
            source::LocalListener::Unix {
                listener: bound.listener,
                path: path.clone(),
                only,
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
