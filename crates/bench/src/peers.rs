//! The security layers under test, as real processes: stunnel, socat and
//! the miggate binary itself, each as a source-side and a target-side
//! process (as they would run on two hosts), in front of a target port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::process::{Child, Command};
use uuid::Uuid;

use miggate_lab::{split_host_port, Gateway, Miggate};

use super::local::Local;
use super::sys;
use miggate::creds::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// How long a peer may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The name the server certificate carries (`miggate pki init` default).
pub const TLS_HOSTNAME: &str = "localhost";

/// OpenSSL configuration for stunnel and socat: TLS 1.3 with AES-128-GCM,
/// the suite miggate prefers, so that the comparison is between
/// implementations, not between ciphers (OpenSSL's default is AES-256-GCM).
const OPENSSL_CNF: &str = "openssl_conf = bench_conf
[bench_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = TLS_AES_128_GCM_SHA256
MinProtocol = TLSv1.3
";

/// The peer programs found on this machine.
#[derive(Debug, Clone)]
pub struct Installed {
    pub stunnel: Option<PathBuf>,
    pub socat: Option<PathBuf>,
    pub miggate: PathBuf,
}

impl Installed {
    pub fn probe() -> Result<Installed> {
        Ok(Installed {
            stunnel: sys::which(&["stunnel4", "stunnel"]),
            socat: sys::which(&["socat"]),
            miggate: std::env::current_exe().context("locating the miggate binary")?,
        })
    }
}

/// One peer process; killed on drop.
struct Proc {
    name: String,
    run: Running,
}

enum Running {
    /// stunnel, socat: output in a file.
    Logged { child: Child, log_file: PathBuf },
    /// A miggate gateway, its JSON log read by the lab.
    Miggate(Gateway),
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        match &self.run {
            Running::Logged { child, .. } => child.id(),
            Running::Miggate(gw) => gw.pid(),
        }
    }

    fn log_text(&self) -> String {
        match &self.run {
            Running::Logged { log_file, .. } => {
                std::fs::read_to_string(log_file).unwrap_or_default()
            }
            Running::Miggate(gw) => gw.log_text(),
        }
    }
}

/// A running security layer: its processes and where the sending side
/// (QEMU or a generator) connects to.
pub struct Layer {
    procs: Vec<Proc>,
    pub entry: Local,
    /// The target-side process, for RSS and direct connections.
    pub target_port: u16,
}

impl Layer {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(Proc::pid).collect()
    }

    pub fn target_pid(&self) -> Option<u32> {
        self.procs.first().and_then(Proc::pid)
    }

    pub fn source_pid(&self) -> Option<u32> {
        self.procs.get(1).and_then(Proc::pid)
    }

    /// Every process's output, for a failure report.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn spawn_logged(
    program: &Path,
    args: &[String],
    env: &[(&str, &Path)],
    dir: &Path,
    name: &str,
) -> Result<Proc> {
    let log_file = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log_file)
        .with_context(|| format!("creating {}", log_file.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc {
        name: name.into(),
        run: Running::Logged { child, log_file },
    })
}

fn pki_file(pki: &Path, f: &str) -> String {
    pki.join(f).display().to_string()
}

fn openssl_cnf(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("openssl.cnf");
    std::fs::write(&path, OPENSSL_CNF).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// stunnel client (source side, at `entry`) -> stunnel server (target
/// side) -> `forward`.
pub async fn stunnel(
    bin: &Path,
    pki: &Path,
    dir: &Path,
    entry: Local,
    forward: &Local,
) -> Result<Layer> {
    let cnf = openssl_cnf(dir)?;
    let mid = sys::free_port()?;
    let server = format!(
        "foreground = yes\npid =\ndebug = 4\n[target]\naccept = 127.0.0.1:{mid}\n\
         connect = {}\ncert = {}\nkey = {}\nCAfile = {}\n\
         verifyChain = yes\nrequireCert = yes\n",
        forward.stunnel(),
        pki_file(pki, SERVER_CERT),
        pki_file(pki, SERVER_KEY),
        pki_file(pki, CA_CERT)
    );
    let client = format!(
        "foreground = yes\npid =\ndebug = 4\n[source]\nclient = yes\n\
         accept = {}\nconnect = 127.0.0.1:{mid}\ncert = {}\nkey = {}\n\
         CAfile = {}\nverifyChain = yes\ncheckHost = {TLS_HOSTNAME}\n",
        entry.stunnel(),
        pki_file(pki, CLIENT_CERT),
        pki_file(pki, CLIENT_KEY),
        pki_file(pki, CA_CERT)
    );
    let mut procs = Vec::new();
    for (name, conf, at) in [
        ("stunnel-target", server, Local::Tcp(mid)),
        ("stunnel-source", client, entry.clone()),
    ] {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        let args = [path.display().to_string()];
        start_listening(&mut procs, bin, &args, &cnf, dir, name, &at).await?;
    }
    Ok(Layer {
        procs,
        entry,
        target_port: mid,
    })
}

/// Starts one peer process (with our OpenSSL config) into `procs` and waits
/// until it listens at `at`; on failure the error carries every log so far.
async fn start_listening(
    procs: &mut Vec<Proc>,
    bin: &Path,
    args: &[String],
    openssl_cnf: &Path,
    dir: &Path,
    name: &str,
    at: &Local,
) -> Result<()> {
    procs.push(spawn_logged(
        bin,
        args,
        &[("OPENSSL_CONF", openssl_cnf)],
        dir,
        name,
    )?);
    if let Err(e) = at.wait_listening(START_TIMEOUT, name).await {
        let logs = procs.iter().map(Proc::log_text).collect::<Vec<_>>();
        return Err(e.context(logs.join("\n")));
    }
    Ok(())
}

/// socat listening at `entry` -> OPENSSL (client cert) -> socat
/// OPENSSL-LISTEN (verify=1) -> `forward`. One connection each: socat
/// without `fork`.
pub async fn socat(
    bin: &Path,
    pki: &Path,
    dir: &Path,
    entry: Local,
    forward: &Local,
) -> Result<Layer> {
    let cnf = openssl_cnf(dir)?;
    let mid = sys::free_port()?;
    let server = vec![
        format!(
            "OPENSSL-LISTEN:{mid},bind=127.0.0.1,reuseaddr,cert={},key={},cafile={},verify=1",
            pki_file(pki, SERVER_CERT),
            pki_file(pki, SERVER_KEY),
            pki_file(pki, CA_CERT)
        ),
        forward.socat_connect(),
    ];
    let client = vec![
        entry.socat_listen(),
        format!(
            "OPENSSL:127.0.0.1:{mid},cert={},key={},cafile={},verify=1,commonname={TLS_HOSTNAME}",
            pki_file(pki, CLIENT_CERT),
            pki_file(pki, CLIENT_KEY),
            pki_file(pki, CA_CERT)
        ),
    ];
    let mut procs = Vec::new();
    for (name, args, at) in [
        ("socat-target", server, Local::Tcp(mid)),
        ("socat-source", client, entry.clone()),
    ] {
        start_listening(&mut procs, bin, &args, &cnf, dir, name, &at).await?;
    }
    Ok(Layer {
        procs,
        entry,
        target_port: mid,
    })
}

/// What the miggate target gateway checks.
pub struct MiggateChecks<'a> {
    /// `--authz-identity`: the client certificate's DN.
    pub client_dn: &'a str,
    /// `--expect-uuid`, when the stream carries one.
    pub expect_uuid: Option<Uuid>,
}

/// `miggate source` (at `entry`) -> `miggate target` -> `forward`, the
/// real binary.
pub async fn miggate(
    bin: &Path,
    pki: &Path,
    entry: Local,
    forward: &Local,
    checks: &MiggateChecks<'_>,
) -> Result<Layer> {
    let pki_s = pki.display().to_string();
    let mut targs = vec![
        "target".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--x509-dir".into(),
        pki_s.clone(),
        "--forward".into(),
        forward.uri(),
        "--authz-identity".into(),
        checks.client_dn.into(),
    ];
    if let Some(u) = checks.expect_uuid {
        targs.extend(["--expect-uuid".into(), u.to_string()]);
    }
    let (target, listen) = spawn_gateway(bin, &targs, "miggate-target").await?;
    let (_, tport) = split_host_port(&listen)
        .ok_or_else(|| anyhow!("the target gateway listens on {listen:?}: no port"))?;
    let sargs = vec![
        "source".to_string(),
        "--listen".into(),
        entry.uri(),
        "--connect".into(),
        format!("127.0.0.1:{tport}"),
        "--tls-hostname".into(),
        TLS_HOSTNAME.into(),
        "--x509-dir".into(),
        pki_s,
    ];
    let (source, _) = spawn_gateway(bin, &sargs, "miggate-source").await?;
    Ok(Layer {
        procs: vec![target, source],
        entry,
        target_port: tport,
    })
}

/// Starts a gateway with JSON logs, once it is listening; returns where
/// it listens (`HOST:PORT`, or `unix:PATH`).
async fn spawn_gateway(bin: &Path, args: &[String], name: &str) -> Result<(Proc, String)> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gw = Miggate::new(bin)
        .gateway(&args)
        .await
        .with_context(|| format!("starting {name}"))?;
    let addr = gw.addr.clone();
    let proc = Proc {
        name: name.into(),
        run: Running::Miggate(gw),
    };
    Ok((proc, addr))
}
