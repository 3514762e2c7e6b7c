//! Gateway mode: the incoming side is registered with the target's
//! `miggate daemon`, and the source gateway runs inside this process with
//! the one-shot ticket, which therefore never leaves memory (no file, no
//! environment, no command line).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::net::unix::UCred;
use uuid::Uuid;

use super::args::{host_of, MigrateArgs, TargetForward};
use super::progress::Reporter;
use crate::control::client::{api_addr, ApiAddr, ApiClient, ApiError};
use crate::control::types::{
    Allow, DiskRequest, Forward, IncomingRequest, MigrationView, Phase, QmpForward,
};
use crate::creds::tls;
use crate::gate::source::{self, LocalListener, LocalPeer, SourceConfig};
use crate::net::private_dir::{PrivateDir, PrivateDirError};
use crate::net::unix_bind::{self, Access};
use crate::net::HostPort;
use crate::outcome::{Ending, Record, Sink};

/// How often the progress loop asks the daemon whether the target admitted
/// the stream (a local or LAN round trip; the bar itself comes from QEMU).
const ADMISSION_POLL: Duration = Duration::from_secs(1);

/// After QEMU's verdict, how long the daemon may take to close its books on
/// the migration (its channels end a moment after QEMU's).
const SETTLE: Duration = Duration::from_secs(5);

/// After a failure, how long to wait for the gateway's own record of it:
/// QEMU can notice the closed socket before the gateway task has finished
/// logging why it closed it.
const RECORD_GRACE: Duration = Duration::from_secs(2);

const SETTLE_POLL: Duration = Duration::from_millis(100);

/// The source gateway's records, for the failure sentence and the summary.
#[derive(Default)]
pub struct Collected(Mutex<Vec<Record>>);

impl Sink for Collected {
    fn record(&self, record: &Record) {
        self.0.lock().expect("records lock").push(record.clone());
    }
}

impl Collected {
    pub fn all(&self) -> Vec<Record> {
        self.0.lock().expect("records lock").clone()
    }
}

pub struct Managed {
    api: ApiClient,
    pub id: String,
    /// The target gateway, HOST:PORT.
    pub connect: String,
    pub channels: u32,
    records: Arc<Collected>,
    gateway: tokio::task::JoinHandle<()>,
    /// The source QEMU's socket, in `_local_dir`.
    socket: PathBuf,
    /// Its NBD clients' socket (--copy-storage), in `_local_dir`.
    pub nbd_socket: Option<PathBuf>,
    /// Removed (with the socket) when the migration ends.
    _local_dir: PrivateDir,
    admitted: bool,
    last_poll: Option<Instant>,
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.gateway.abort();
    }
}

/// Capabilities and parameters the target QEMU needs to receive what the
/// source sends: multifd must match on both ends. (`return-path` and
/// `validate-uuid` are the source's choices; the target follows the stream.)
pub fn target_migration_settings(
    multifd: u8,
) -> (
    BTreeMap<String, bool>,
    serde_json::Map<String, serde_json::Value>,
) {
    let caps = BTreeMap::from([("multifd".to_string(), multifd > 0)]);
    let mut params = serde_json::Map::new();
    if multifd > 0 {
        params.insert("multifd-channels".into(), json!(multifd));
    }
    (caps, params)
}

/// The target QEMU's part of `--postcopy`: postcopy-ram must be on at both
/// ends before the stream starts (the source's advice in the stream is
/// refused by a target without it). postcopy-preempt is named only when
/// asked for: a QEMU without it would refuse it even off.
pub fn target_postcopy_capabilities(postcopy: bool, preempt: bool) -> BTreeMap<String, bool> {
    use crate::qmp::capabilities::{POSTCOPY_PREEMPT, POSTCOPY_RAM};
    let mut caps = BTreeMap::from([(POSTCOPY_RAM.to_string(), postcopy)]);
    if preempt {
        caps.insert(POSTCOPY_PREEMPT.to_string(), true);
    }
    caps
}

/// The address to reach a daemon listener at: a listener bound to the
/// wildcard address is reached at the API's own host (or loopback when the
/// API is a local socket).
pub fn reachable(listen: &str, api: &ApiAddr) -> String {
    let port = match listen.parse::<HostPort>() {
        Ok(hp) if hp.is_wildcard() => hp.port,
        _ => return listen.to_string(),
    };
    let host = match api {
        ApiAddr::Unix(_) => Ipv4Addr::LOCALHOST.to_string(),
        // The host we connect to, which may differ from the name its
        // certificate is checked for.
        ApiAddr::Tls { addr, .. } => addr
            .parse::<HostPort>()
            .map_or_else(|_| addr.clone(), |api| api.host),
    };
    HostPort { host, port }.to_string()
}

/// What this host needs before the daemon is asked anything: its API
/// client, the source gateway's TLS, and the private socket for the QEMU.
struct LocalSide {
    api: ApiClient,
    tls: Arc<rustls::ClientConfig>,
    listener: LocalListener,
    /// The source QEMU's NBD clients' socket, for --copy-storage.
    nbd: Option<(LocalListener, PathBuf)>,
    local_dir: PrivateDir,
    socket: PathBuf,
}

impl LocalSide {
    fn new(
        args: &MigrateArgs,
        target: &str,
        qemu: &UCred,
        nbd: bool,
    ) -> Result<LocalSide, ManagedError> {
        let addr = api_addr(target, args.api_x509_dir.as_deref())?;
        let api = ApiClient::new(addr)?;
        let tls = tls::client_config(&args.x509_dir, &[tls::ALPN_MIGGATE])
            .map_err(ManagedError::SourceTls)?;
        let (mut hops, local_dir) = local_hop(qemu, &args.source_qmp, nbd)?;
        let path = |l: &LocalListener| match l {
            LocalListener::Unix { path, .. } => path.clone(),
            LocalListener::Tcp(_) => unreachable!("the local hop is a unix socket"),
        };
        let nbd = (hops.len() == 2).then(|| {
            let l = hops.pop().expect("two hops");
            let p = path(&l);
            (l, p)
        });
        let listener = hops.pop().expect("the migration's hop");
        let socket = path(&listener);
        Ok(LocalSide {
            api,
            tls,
            listener,
            nbd,
            local_dir,
            socket,
        })
    }
}

/// The local hop: a fresh directory (0700) that only miggate and the
/// source QEMU can enter, and in it a socket (0600) owned by the QEMU's
/// user, which the source gateway serves to the QEMU's pid alone; with
/// `nbd`, a second one for its NBD clients (--copy-storage).
fn local_hop(
    qemu: &UCred,
    qmp: &Path,
    nbd: bool,
) -> Result<(Vec<LocalListener>, PrivateDir), ManagedError> {
    let pid = qemu.pid().ok_or(ManagedError::NoPid)?;
    let uid = qemu.uid();
    // $XDG_RUNTIME_DIR when it is the QEMU's user's own (the same user as
    // ours, or we are root); otherwise the temp directory, which every
    // user can traverse.
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.uid() == uid))
        .unwrap_or_else(std::env::temp_dir);
    let dir = PrivateDir::create_in(&base, "miggate-migrate-").map_err(ManagedError::PrivateDir)?;
    let ours = std::fs::metadata(dir.path())
        .map_err(|source| ManagedError::Inspect {
            path: dir.path().to_path_buf(),
            source,
        })?
        .uid();
    let owner = if uid == ours {
        None
    } else {
        // Root gives the directory to the QEMU's user: it may enter, no
        // other user may; root needs no permission to serve it.
        std::os::unix::fs::chown(dir.path(), Some(uid), None).map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ManagedError::NotRoot { qemu: uid, ours }
            } else {
                ManagedError::Chown {
                    path: dir.path().to_path_buf(),
                    uid,
                    source,
                }
            }
        })?;
        Some(uid)
    };
    let names: &[&str] = if nbd {
        &["source.sock", "nbd.sock"]
    } else {
        &["source.sock"]
    };
    let mut hops = Vec::new();
    for name in names {
        let path = dir.path().join(name);
        let bound =
            unix_bind::bind(&path, Access { mode: 0o600, owner }).map_err(ManagedError::Listen)?;
        hops.push(LocalListener::Unix {
            listener: bound.listener,
            path,
            only: Some(LocalPeer {
                pid,
                known_as: format!("the QEMU of QMP socket {}", qmp.display()),
            }),
        });
    }
    Ok((hops, dir))
}

/// What is migrated: the VM's UUID (if it has one) and the disks copied
/// with it (block node names, the same on both QEMUs).
#[derive(Debug, Clone, Copy)]
pub struct Vm<'a> {
    pub uuid: Option<Uuid>,
    pub disks: &'a [String],
}

impl Managed {
    /// Loads the credentials, binds the local listener for the QEMU with
    /// credentials `qemu` (its QMP socket's peer), registers the migration
    /// and starts the source gateway with its ticket.
    pub async fn prepare(
        args: &MigrateArgs,
        target: &str,
        forward: TargetForward<'_>,
        vm: Vm<'_>,
        dn: &str,
        qemu: &UCred,
        rep: &mut Reporter,
    ) -> Result<Managed, ManagedError> {
        let Vm { uuid, disks } = vm;
        // Everything that can fail locally fails before the daemon is asked.
        let LocalSide {
            api,
            tls,
            listener,
            nbd,
            local_dir,
            socket,
        } = LocalSide::new(args, target, qemu, !disks.is_empty())?;
        // Said before the daemon is asked: from here the kernel queues the
        // QEMU's connection even while the registration is under way.
        rep.step(&format!(
            "the source QEMU (pid {}, uid {}) will migrate to unix:{}: a socket in a directory only it and miggate can enter, served to that pid alone",
            qemu.pid().unwrap_or_default(),
            qemu.uid(),
            socket.display()
        ));

        let channels = 1 + u32::from(args.multifd);
        let forward = match forward {
            TargetForward::Qmp(qmp) => {
                let (mut capabilities, parameters) = target_migration_settings(args.multifd);
                capabilities.extend(target_postcopy_capabilities(
                    args.postcopy,
                    args.postcopy_preempt,
                ));
                Forward::Qmp(QmpForward {
                    qmp: format!("unix:{}", qmp.display()),
                    capabilities,
                    parameters,
                })
            }
            TargetForward::Endpoint(ep) => Forward::Endpoint(ep.to_string()),
        };
        let req = IncomingRequest {
            vm_uuid: uuid,
            allow: Allow::Identity(dn.to_string()),
            forward,
            channels,
            expires_in: args.expires_in,
            listeners: None,
            // The target's nodes of the same names, exported under them.
            disks: disks
                .iter()
                .map(|d| DiskRequest {
                    node: Some(d.clone()),
                    export: None,
                })
                .collect(),
            nbd_forward: None,
        };
        let resp = api
            .register(&req)
            .await
            .map_err(|e| ManagedError::Register(DaemonSaid(e)))?;
        let vm = uuid.map_or_else(|| "any VM UUID".to_string(), |u| format!("VM {u}"));
        rep.step(&format!(
            "registered migration {} with the daemon at {}: a one-shot ticket (kept in memory only) admits {} channel{} of {vm} from {dn} until {}",
            resp.id,
            api.addr(),
            channels,
            if channels == 1 { "" } else { "s" },
            resp.expires_at
        ));

        let connect = match (&args.connect, resp.listen.first()) {
            (Some(c), _) => c.clone(),
            (None, Some(l)) => reachable(l, api.addr()),
            (None, None) => {
                let _ = api.cancel(&resp.id).await;
                return Err(ManagedError::NoListener);
            }
        };
        let host = args
            .tls_hostname
            .clone()
            .unwrap_or_else(|| host_of(&connect));
        let server_name = match ServerName::try_from(host.clone()) {
            Ok(n) => n,
            Err(_) => {
                let _ = api.cancel(&resp.id).await;
                return Err(ManagedError::BadHostname { host });
            }
        };
        let records = Arc::new(Collected::default());
        let cfg = SourceConfig {
            tls,
            connect: connect.clone(),
            server_name,
            stall: args.stall(),
            rekey_after: args.rekey_after_mib.map(|m| m << 20),
            ticket: Some(resp.ticket),
            sink: Some(records.clone()),
            resume: None,
        };
        let cfg = Arc::new(cfg);
        let nbd_socket = nbd.as_ref().map(|(_, p)| p.clone());
        let gateway = tokio::spawn(async move {
            let nbd = async {
                match nbd {
                    Some((l, _)) => source::serve_nbd(l, cfg.clone(), None).await,
                    None => std::future::pending().await,
                }
            };
            let r = tokio::select! {
                r = source::serve_with(listener, cfg.clone(), None) => r,
                r = nbd => r,
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "source gateway stopped");
            }
        });
        rep.step(&format!(
            "source gateway serving the source QEMU, forwarding over TLS to {connect} (the target must present a certificate for {host})"
        ));
        Ok(Managed {
            api,
            id: resp.id,
            connect,
            channels,
            records,
            gateway,
            socket,
            nbd_socket,
            _local_dir: local_dir,
            admitted: false,
            last_poll: None,
        })
    }

    /// `--recover ID`: asks the daemon to recover migration `id` (its
    /// target QEMU listens again; a fresh ticket and the cut main
    /// channel's binding token come back, once) and starts a new source
    /// gateway with them on a fresh private socket for the QEMU with
    /// credentials `qemu`: the gateway that saw the cut lived in the
    /// command that started the migration, and went with it.
    pub async fn recover(
        args: &MigrateArgs,
        target: &str,
        id: &str,
        qemu: &UCred,
        rep: &mut Reporter,
    ) -> Result<Managed, ManagedError> {
        let LocalSide {
            api,
            tls,
            listener,
            local_dir,
            socket,
            ..
        } = LocalSide::new(args, target, qemu, false)?;
        let resp = api
            .recover(id)
            .await
            .map_err(|e| ManagedError::Recover(DaemonSaid(e)))?;
        rep.step(&format!(
            "the daemon at {} recovers migration {}: its target QEMU listens again; a new one-shot ticket (kept in memory only; the first stays spent) admits the resumed main channel of this migration until {}",
            api.addr(),
            resp.id,
            resp.expires_at
        ));
        let connect = match (&args.connect, resp.listen.first()) {
            (Some(c), _) => c.clone(),
            (None, Some(l)) => reachable(l, api.addr()),
            (None, None) => return Err(ManagedError::NoListener),
        };
        let host = args
            .tls_hostname
            .clone()
            .unwrap_or_else(|| host_of(&connect));
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| ManagedError::BadHostname { host: host.clone() })?;
        let records = Arc::new(Collected::default());
        let cfg = SourceConfig {
            tls,
            connect: connect.clone(),
            server_name,
            stall: args.stall(),
            rekey_after: args.rekey_after_mib.map(|m| m << 20),
            ticket: Some(resp.ticket),
            sink: Some(records.clone()),
            resume: Some(resp.binding_token),
        };
        let gateway = tokio::spawn(async move {
            if let Err(e) = source::serve(listener, cfg).await {
                tracing::error!(error = %e, "source gateway stopped");
            }
        });
        rep.step(&format!(
            "source gateway serving the source QEMU (pid {}) on unix:{}, resuming over TLS to {connect} (the target must present a certificate for {host})",
            qemu.pid().unwrap_or_default(),
            socket.display()
        ));
        Ok(Managed {
            api,
            id: resp.id,
            connect,
            channels: 1,
            records,
            gateway,
            socket,
            nbd_socket: None,
            _local_dir: local_dir,
            admitted: false,
            last_poll: None,
        })
    }

    /// Where the source QEMU migrates to.
    pub fn uri(&self) -> String {
        // QEMU's multifd channels connect to the same address as the main.
        format!("unix:{}", self.socket.display())
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.all()
    }

    pub async fn view(&self) -> Result<MigrationView, ApiError> {
        self.api.migration(&self.id).await
    }

    /// `DELETE /v1/migrations/{id}`: the daemon cuts every channel and
    /// spends the ticket.
    pub async fn cancel(&self) -> Result<MigrationView, DaemonSaid> {
        self.api.cancel(&self.id).await.map_err(DaemonSaid)
    }

    /// Tells the operator, once, that the target admitted the stream.
    pub async fn poll_admission(&mut self, rep: &mut Reporter, now: bool) {
        let early = !now && self.last_poll.is_some_and(|t| t.elapsed() < ADMISSION_POLL);
        if self.admitted || early {
            return;
        }
        self.last_poll = Some(Instant::now());
        let Ok(v) = self.view().await else { return };
        // A recovery's channels count on top of the cut ones: it is
        // admitted once the migration is active again.
        let waiting = matches!(
            v.state,
            Phase::Registered | Phase::Paused | Phase::Recovering
        );
        if v.channels_seen > 0 && !waiting {
            self.admitted = true;
            let who = v.peer_dn.as_deref().unwrap_or("(unknown)");
            if v.recoveries > 0 {
                // A resumed main channel has no header and no UUID: it is
                // admitted as the cut main channel's resumption.
                rep.step(&format!(
                    "the target admitted the recovery: new ticket valid, peer {who} allowed, the cut main channel's binding resumed (recovery {})",
                    v.recoveries
                ));
                return;
            }
            let vm = v.vm_uuid.map_or_else(String::new, |u| {
                format!(", VM UUID {u} checked in the stream")
            });
            rep.step(&format!(
                "the target admitted the stream: ticket valid, peer {who} allowed{vm}; channels opened: {} of {}",
                v.channels_seen, v.channels_expected
            ));
        }
    }

    /// The daemon's view once it has closed its books (or as it stands
    /// after `SETTLE`).
    pub async fn settled_view(&self) -> Option<MigrationView> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let v = self.view().await.ok();
            let done = v.as_ref().is_some_and(|v| v.state.is_final());
            if done || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Records and the daemon's view of a failed migration, given a moment
    /// to arrive.
    pub async fn failure_evidence(&self) -> (Vec<Record>, Option<MigrationView>) {
        let deadline = Instant::now() + RECORD_GRACE;
        while Instant::now() < deadline
            && !self
                .records
                .all()
                .iter()
                .any(|r| r.ending != Ending::Completed)
        {
            tokio::time::sleep(SETTLE_POLL).await;
        }
        let view = loop {
            let v = self.view().await.ok();
            let known = v.as_ref().is_some_and(|v| {
                v.state.is_final() || v.reason.is_some() || !v.refusals.is_empty()
            });
            if known || Instant::now() >= deadline {
                break v;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        };
        (self.records.all(), view)
    }

    /// The DN of the target's certificate, as the source gateway saw it.
    pub fn target_dn(&self) -> Option<String> {
        self.records.all().into_iter().find_map(|r| r.peer_dn)
    }
}

/// Why the gateway side of a migration could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error("the kernel did not tell the source QEMU's pid (SO_PEERCRED of its QMP socket)")]
    NoPid,
    #[error("no private directory for the source QEMU's socket")]
    PrivateDir(#[source] PrivateDirError),
    #[error("{}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the source QEMU runs as uid {qemu} and miggate as uid {ours}: only root can make a socket that QEMU alone may reach; run miggate migrate as root or as uid {qemu}")]
    NotRoot { qemu: u32, ours: u32 },
    #[error("cannot give {} to uid {uid}", path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for the source QEMU")]
    Listen(#[source] unix_bind::UnixBindError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("source TLS credentials")]
    SourceTls(#[source] crate::creds::tls::CredsError),
    #[error("target daemon")]
    Register(#[source] DaemonSaid),
    #[error("target daemon refused the recovery")]
    Recover(#[source] DaemonSaid),
    #[error("the daemon has no migration listener to connect to (and no --connect was given)")]
    NoListener,
    #[error("{host:?} is not a valid TLS hostname")]
    BadHostname { host: String },
}

/// An API error worded as the daemon worded it: its own sentence when it
/// gave one (`reason (HTTP 409)`), else the client's error.
#[derive(Debug)]
pub struct DaemonSaid(pub ApiError);

impl std::fmt::Display for DaemonSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ApiError::Http { status, message } => write!(f, "{message} (HTTP {status})"),
            other => other.fmt(f),
        }
    }
}

impl std::error::Error for DaemonSaid {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0 {
            ApiError::Http { .. } => None,
            other => other.source(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_sentence_is_the_cause() {
        let e = ManagedError::Register(DaemonSaid(ApiError::Http {
            status: 409,
            message: "a migration of VM x is already registered".into(),
        }));
        assert_eq!(
            crate::error::chain(&e),
            "target daemon: a migration of VM x is already registered (HTTP 409)"
        );
    }

    #[test]
    fn wildcard_listeners_are_reached_at_the_api_host() {
        let unix = ApiAddr::Unix("/run/miggate/api.sock".into());
        let tls: ApiAddr = "https://dst.example.org:9443".parse().unwrap();
        assert_eq!(reachable("0.0.0.0:49152", &unix), "127.0.0.1:49152");
        assert_eq!(reachable("[::]:49152", &tls), "dst.example.org:49152");
        assert_eq!(reachable("10.0.0.2:49152", &tls), "10.0.0.2:49152");
        assert_eq!(reachable("dst:1", &unix), "dst:1");
    }

    #[test]
    fn target_postcopy_settings() {
        let off = target_postcopy_capabilities(false, false);
        assert_eq!(off, BTreeMap::from([("postcopy-ram".to_string(), false)]));
        let on = target_postcopy_capabilities(true, false);
        assert!(on["postcopy-ram"] && !on.contains_key("postcopy-preempt"));
        let preempt = target_postcopy_capabilities(true, true);
        assert!(preempt["postcopy-ram"] && preempt["postcopy-preempt"]);
    }

    #[test]
    fn target_settings_follow_multifd() {
        let (caps, params) = target_migration_settings(0);
        assert!(!caps["multifd"]);
        assert!(params.is_empty());
        let (caps, params) = target_migration_settings(4);
        assert!(caps["multifd"]);
        assert_eq!(params["multifd-channels"], 4);
    }
}
