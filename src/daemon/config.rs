//! The daemon's configuration: one TOML file, one serde struct, validated
//! (certificates parse, ACL files load, paths usable) before anything binds.
//!
//! ```toml
//! [daemon]
//! runtime_dir = "/run/miggate"      # QMP-forward sockets live here
//! retention = 3600                  # seconds ended migrations stay visible
//!
//! [api]
//! socket = "/run/miggate/api.sock"
//! socket_mode = "0600"
//! [api.tls]                         # optional: remote management, mTLS
//! listen = "0.0.0.0:9443"
//! x509_dir = "/etc/pki/miggate-admin"
//! authz_identity = "O=Example Org,CN=mgmt.example.org"
//!
//! [metrics]                         # optional, loopback only
//! listen = "127.0.0.1:9464"
//!
//! [[target]]                        # one per migration listener
//! listen = "0.0.0.0:49152"
//! x509_dir = "/etc/pki/miggate"
//! # optional static route (what `miggate target` does), for sources
//! # without a ticket, e.g. QEMU with native TLS:
//! # forward = "tcp:127.0.0.1:4444"
//! # authz_identity = "..."  | authz_list_file = "..." (no_refresh) | allow_any_verified_peer = true
//! # expect_uuid = "..."
//! # forward_nbd = "unix:/run/vm-nbd.sock"  # with nbd_export = ["disk0"]: storage migration
//! stall_timeout = 30
//! # keep_live_on_acl_change = true  # ACL/CRL changes spare live channels
//! ```
//!
//! Every flag of `miggate target` has a key of the same name in `[[target]]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::admit::decide::StaticRoute;
use crate::admit::Expectation;
use crate::authz::{Authz, AuthzConfig};
use crate::control::client::ALPN_HTTP1;
use crate::creds::tls;
use crate::net::Endpoint;

/// Where QMP-forward sockets go unless configured (systemd's RuntimeDirectory).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/miggate";
pub const DEFAULT_API_SOCKET: &str = "/run/miggate/api.sock";
/// Owner only: whoever can talk to the API can let migrations in.
pub const DEFAULT_SOCKET_MODE: &str = "0600";
/// How long ended migrations stay visible in the API.
pub const DEFAULT_RETENTION_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", file.display())]
    Parse {
        file: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{}: {field}: {why}", file.display())]
    Field {
        file: PathBuf,
        field: String,
        why: String,
    },
    #[error("{}: {field}", file.display())]
    Creds {
        file: PathBuf,
        field: String,
        #[source]
        source: Box<tls::CredsError>,
    },
    #[error("{}: {field}", file.display())]
    Authz {
        file: PathBuf,
        field: String,
        #[source]
        source: Box<crate::authz::AuthzError>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSection>,
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetSection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Sockets the daemon creates for QMP forwards (QEMU creates its
    /// listening socket there). Private to the daemon: see `daemon::rundir`.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// Seconds an ended migration stays visible in the API.
    #[serde(default = "default_retention")]
    pub retention: u64,
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            runtime_dir: default_runtime_dir(),
            retention: DEFAULT_RETENTION_SECS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// The local control socket (HTTP + JSON).
    #[serde(default = "default_api_socket")]
    pub socket: PathBuf,
    /// Its file mode, octal.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// The API on TCP with mutual TLS, for a remote management host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTlsSection>,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            socket: default_api_socket(),
            socket_mode: DEFAULT_SOCKET_MODE.into(),
            tls: None,
        }
    }
}

/// The admin PKI and ACL: separate from the migration ones, so that a
/// migration source's certificate cannot drive the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsSection {
    pub listen: String,
    /// QEMU-layout PKI directory: server-cert/key, ca-cert, ca-crl.
    pub x509_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz_list_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_refresh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_any_verified_peer: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Loopback HOST:PORT for Prometheus' text format at /metrics.
    pub listen: SocketAddr,
}

/// One migration listener: `miggate target`'s flags, same names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    pub listen: String,
    pub x509_dir: PathBuf,
    /// Static route for connections without a ticket. Without it, only
    /// registered migrations are admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz_list_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_refresh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_any_verified_peer: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_uuid: Option<Uuid>,
    /// The static route's NBD channels (storage migration): the target
    /// QEMU's NBD server, and the exports they may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_nbd: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd_export: Vec<String>,
    #[serde(default = "default_stall")]
    pub stall_timeout: u64,
    #[serde(default = "default_handshake")]
    pub handshake_timeout: u64,
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    #[serde(default = "default_max_pending_per_ip")]
    pub max_pending_per_ip: usize,
    /// ACL and CRL changes (file reloads, a daemon reload) apply to new
    /// connections only; by default they also close the live channels of
    /// peers no longer allowed (`gate::revoke`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_live_on_acl_change: bool,
}

fn default_runtime_dir() -> PathBuf {
    DEFAULT_RUNTIME_DIR.into()
}
fn default_api_socket() -> PathBuf {
    DEFAULT_API_SOCKET.into()
}
fn default_socket_mode() -> String {
    DEFAULT_SOCKET_MODE.into()
}
fn default_retention() -> u64 {
    DEFAULT_RETENTION_SECS
}
fn default_stall() -> u64 {
    crate::timeouts::DEFAULT_STALL.as_secs()
}
fn default_handshake() -> u64 {
    crate::timeouts::DEFAULT_HANDSHAKE.as_secs()
}
fn default_max_pending() -> usize {
    crate::timeouts::DEFAULT_MAX_PENDING
}
fn default_max_pending_per_ip() -> usize {
    crate::timeouts::DEFAULT_MAX_PENDING_PER_IP
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// One listener, ready to serve (or to be swapped in on reload).
pub struct BuiltTarget {
    pub tls: Arc<ServerConfig>,
    pub route: Option<StaticRoute>,
    pub stall: Duration,
    pub limits: crate::gate::target::Limits,
    /// Its PKI directory (`ca-crl.pem` is watched there).
    pub x509_dir: PathBuf,
    /// `keep_live_on_acl_change`.
    pub keep_live: bool,
    /// The route in words, for the "listening" log line.
    pub route_desc: String,
}

pub struct BuiltApiTls {
    pub tls: Arc<ServerConfig>,
    pub authz: Arc<dyn Authz>,
}

/// Everything a configuration file yields once validated.
pub struct Built {
    pub targets: Vec<BuiltTarget>,
    pub api_tls: Option<BuiltApiTls>,
    pub socket_mode: u32,
}

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Config::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_path_buf(),
            source,
        })
    }

    /// The configuration in force, defaults filled in, for support.
    pub fn dump(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }

    /// Validates everything and loads certificates and ACLs. `file` names
    /// the configuration in errors.
    pub fn build(&self, file: &Path) -> Result<Built, ConfigError> {
        let field_err = |field: String, why: String| ConfigError::Field {
            file: file.to_path_buf(),
            field,
            why,
        };
        if self.targets.is_empty() {
            return Err(field_err(
                "[[target]]".into(),
                "at least one migration listener is needed".into(),
            ));
        }
        crate::timeouts::bounded_secs(
            "daemon.retention",
            self.daemon.retention,
            1,
            crate::timeouts::MAX_RETENTION_SECS,
        )
        .map_err(|e| out_of_range(file, e))?;
        if !self.daemon.runtime_dir.is_absolute() {
            return Err(field_err(
                "daemon.runtime_dir".into(),
                "must be an absolute path".into(),
            ));
        }
        let socket_mode = parse_mode(&self.api.socket_mode).ok_or_else(|| {
            field_err(
                "api.socket_mode".into(),
                format!(
                    "{:?} is not an octal file mode such as \"0600\"",
                    self.api.socket_mode
                ),
            )
        })?;
        if !self.api.socket.is_absolute() {
            return Err(field_err(
                "api.socket".into(),
                "must be an absolute path".into(),
            ));
        }
        if let Some(m) = &self.metrics {
            if !m.listen.ip().is_loopback() {
                return Err(field_err(
                    "metrics.listen".into(),
                    format!(
                        "{} is not a loopback address: metrics are served unauthenticated, on this host only",
                        m.listen
                    ),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut targets = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = |key: &str| format!("target[{i}].{key}");
            if !seen.insert(t.listen.clone()) {
                return Err(field_err(
                    at("listen"),
                    format!("{} is used twice", t.listen),
                ));
            }
            check_hostport(&t.listen).map_err(|why| field_err(at("listen"), why))?;
            let stall = crate::timeouts::bounded_secs(
                &at("stall_timeout"),
                t.stall_timeout,
                1,
                crate::timeouts::MAX_STALL_SECS,
            )
            .map_err(|e| out_of_range(file, e))?;
            let handshake = crate::timeouts::bounded_secs(
                &at("handshake_timeout"),
                t.handshake_timeout,
                1,
                crate::timeouts::MAX_HANDSHAKE.as_secs(),
            )
            .map_err(|e| out_of_range(file, e))?;
            for (key, n) in [
                ("max_pending", t.max_pending),
                ("max_pending_per_ip", t.max_pending_per_ip),
            ] {
                if !(1..=crate::timeouts::MAX_PENDING).contains(&n) {
                    return Err(field_err(
                        at(key),
                        format!("must be from 1 to {}", crate::timeouts::MAX_PENDING),
                    ));
                }
            }
            check_dir(&t.x509_dir).map_err(|why| field_err(at("x509_dir"), why))?;
            let tls = tls::server_config(&t.x509_dir, &[tls::ALPN_MIGGATE]).map_err(|source| {
                ConfigError::Creds {
                    file: file.to_path_buf(),
                    field: at("x509_dir"),
                    source: Box::new(source),
                }
            })?;
            let choice = authz_choice(
                &t.authz_identity,
                &t.authz_list_file,
                t.no_refresh,
                t.allow_any_verified_peer,
            )
            .map_err(|why| field_err(at("authz_*"), why))?;
            let nbd = match (&t.forward_nbd, t.nbd_export.is_empty()) {
                (None, true) => None,
                (Some(f), false) => {
                    let forward: Endpoint =
                        f.parse().map_err(|why| field_err(at("forward_nbd"), why))?;
                    if let Some(bad) = t
                        .nbd_export
                        .iter()
                        .find(|e| !crate::qmp::storage::export_name_ok(e))
                    {
                        return Err(field_err(
                            at("nbd_export"),
                            format!("{bad:?}: 1 to 255 printable ASCII characters without spaces"),
                        ));
                    }
                    Some(crate::admit::decide::NbdRoute {
                        forward,
                        exports: t.nbd_export.clone(),
                    })
                }
                (Some(_), true) => {
                    return Err(field_err(
                        at("forward_nbd"),
                        "needs nbd_export: the exports NBD channels may ask for".into(),
                    ))
                }
                (None, false) => {
                    return Err(field_err(
                        at("nbd_export"),
                        "needs forward_nbd: where the target QEMU's NBD server listens".into(),
                    ))
                }
            };
            if nbd.is_some() && t.forward.is_none() {
                return Err(field_err(
                    at("forward_nbd"),
                    "applies to the static route: give forward and an authz_* key too (a registration carries its own disks)".into(),
                ));
            }
            let (route, route_desc) = match (&t.forward, choice) {
                (None, None) => {
                    if t.expect_uuid.is_some() {
                        return Err(field_err(
                            at("expect_uuid"),
                            "applies to the static route: give forward and an authz_* key too (a registration carries its own vm_uuid)".into(),
                        ));
                    }
                    (None, "registered migrations only".to_string())
                }
                (Some(_), None) => {
                    return Err(field_err(
                        at("forward"),
                        "a static route needs one of authz_identity, authz_list_file or allow_any_verified_peer = true".into(),
                    ))
                }
                (None, Some(_)) => {
                    return Err(field_err(
                        at("authz_*"),
                        "authorizes the static route, which needs forward = \"tcp:HOST:PORT\" or \"unix:PATH\"".into(),
                    ))
                }
                (Some(fwd), Some(choice)) => {
                    let forward: Endpoint =
                        fwd.parse().map_err(|why| field_err(at("forward"), why))?;
                    let authz = choice.build().map_err(|source| ConfigError::Authz {
                        file: file.to_path_buf(),
                        field: at(if t.authz_list_file.is_some() {
                            "authz_list_file"
                        } else {
                            "authz_identity"
                        }),
                        source: Box::new(source),
                    })?;
                    let desc = format!("static route to {forward} ({choice:?}) and registered migrations");
                    (
                        Some(StaticRoute {
                            forward,
                            authz,
                            expect: Expectation {
                                uuid: t.expect_uuid,
                            },
                            nbd,
                        }),
                        desc,
                    )
                }
            };
            targets.push(BuiltTarget {
                tls,
                route,
                stall,
                limits: crate::gate::target::Limits {
                    handshake,
                    max_pending: t.max_pending,
                    max_pending_per_ip: t.max_pending_per_ip,
                },
                x509_dir: t.x509_dir.clone(),
                keep_live: t.keep_live_on_acl_change,
                route_desc,
            });
        }
        let api_tls = match &self.api.tls {
            None => None,
            Some(a) => {
                check_hostport(&a.listen).map_err(|why| field_err("api.tls.listen".into(), why))?;
                check_dir(&a.x509_dir).map_err(|why| field_err("api.tls.x509_dir".into(), why))?;
                let tls = tls::server_config(&a.x509_dir, &[ALPN_HTTP1]).map_err(|source| {
                    ConfigError::Creds {
                        file: file.to_path_buf(),
                        field: "api.tls.x509_dir".into(),
                        source: Box::new(source),
                    }
                })?;
                let choice = authz_choice(
                    &a.authz_identity,
                    &a.authz_list_file,
                    a.no_refresh,
                    a.allow_any_verified_peer,
                )
                .map_err(|why| field_err("api.tls.authz_*".into(), why))?
                .ok_or_else(|| {
                    field_err(
                        "api.tls".into(),
                        "needs one of authz_identity, authz_list_file or allow_any_verified_peer = true (the admin ACL)".into(),
                    )
                })?;
                let authz = choice.build().map_err(|source| ConfigError::Authz {
                    file: file.to_path_buf(),
                    field: "api.tls.authz_list_file".into(),
                    source: Box::new(source),
                })?;
                Some(BuiltApiTls { tls, authz })
            }
        };
        Ok(Built {
            targets,
            api_tls,
            socket_mode,
        })
    }

    /// What a reload cannot change (bound sockets, fixed per-listener
    /// state), as (key, value) pairs.
    fn fixed(&self) -> Vec<(String, String)> {
        let mut v = vec![
            (
                "daemon.runtime_dir".into(),
                self.daemon.runtime_dir.display().to_string(),
            ),
            ("daemon.retention".into(), self.daemon.retention.to_string()),
            ("api.socket".into(), self.api.socket.display().to_string()),
            ("api.socket_mode".into(), self.api.socket_mode.clone()),
            (
                "api.tls.listen".into(),
                self.api
                    .tls
                    .as_ref()
                    .map_or("(none)".into(), |t| t.listen.clone()),
            ),
            (
                "metrics.listen".into(),
                self.metrics
                    .as_ref()
                    .map_or("(none)".into(), |m| m.listen.to_string()),
            ),
            (
                "number of [[target]]".into(),
                self.targets.len().to_string(),
            ),
        ];
        for (i, t) in self.targets.iter().enumerate() {
            v.push((format!("target[{i}].listen"), t.listen.clone()));
            v.push((
                format!("target[{i}].stall_timeout"),
                t.stall_timeout.to_string(),
            ));
            for (key, n) in [
                ("handshake_timeout", t.handshake_timeout),
                ("max_pending", t.max_pending as u64),
                ("max_pending_per_ip", t.max_pending_per_ip as u64),
            ] {
                v.push((format!("target[{i}].{key}"), n.to_string()));
            }
        }
        v
    }

    /// Refuses a new configuration that changes what only a restart can.
    pub fn check_reloadable(&self, new: &Config, file: &Path) -> Result<(), ConfigError> {
        for ((key, old), (_, now)) in self.fixed().into_iter().zip(new.fixed()) {
            if old != now {
                return Err(ConfigError::Field {
                    file: file.to_path_buf(),
                    field: key,
                    why: format!(
                        "changed from {old} to {now}, but listener addresses and sockets cannot change on reload: restart the daemon to apply it"
                    ),
                });
            }
        }
        Ok(())
    }
}

fn out_of_range(file: &Path, e: crate::timeouts::OutOfRange) -> ConfigError {
    ConfigError::Field {
        file: file.to_path_buf(),
        why: format!(
            "must be from {} to {} {}, not {}",
            e.min, e.max, e.unit, e.value
        ),
        field: e.field,
    }
}

pub(crate) fn authz_choice(
    identity: &Option<String>,
    list_file: &Option<PathBuf>,
    no_refresh: bool,
    any: bool,
) -> Result<Option<AuthzConfig>, String> {
    if identity.is_none() && list_file.is_none() && !any {
        if no_refresh {
            return Err("no_refresh applies to authz_list_file, which is not given".into());
        }
        return Ok(None);
    }
    if let Some(p) = list_file {
        if !p.is_absolute() {
            return Err(format!(
                "authz_list_file {} must be an absolute path",
                p.display()
            ));
        }
    }
    if matches!(identity.as_deref(), Some("")) {
        return Err("authz_identity is empty".into());
    }
    AuthzConfig::from_cli(identity.clone(), list_file.clone(), no_refresh, any)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn check_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

pub(crate) fn check_hostport(s: &str) -> Result<(), String> {
    s.parse::<crate::net::HostPort>()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// "0600", "600" or "0o600" -> 0o600; only permission bits.
pub(crate) fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8).ok()?;
    (mode <= 0o777).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::creds::pki::init(dir.path(), &Default::default()).unwrap();
        dir
    }

    fn text(pki: &Path, extra: &str) -> String {
        format!(
            "[daemon]\nruntime_dir = \"/tmp\"\n[api]\nsocket = \"/tmp/x.sock\"\n\
             [[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = \"{}\"\n{extra}",
            pki.display()
        )
    }

    fn build(t: &str) -> Result<Built, ConfigError> {
        Config::parse(Path::new("/etc/miggate/daemon.toml"), t)?
            .build(Path::new("/etc/miggate/daemon.toml"))
    }

    /// The static route's NBD keys come as a pair, on a static route,
    /// with export names the gateways can show.
    #[test]
    fn nbd_keys_of_the_static_route() {
        let p = pki();
        let route = "forward = \"tcp:127.0.0.1:4444\"\nallow_any_verified_peer = true\n";
        let ok = format!("{route}forward_nbd = \"unix:/run/n.sock\"\nnbd_export = [\"disk0\"]\n");
        let b = build(&text(p.path(), &ok)).unwrap();
        let nbd = b.targets[0].route.as_ref().unwrap().nbd.clone().unwrap();
        assert_eq!(nbd.exports, ["disk0"]);
        for (extra, field) in [
            (
                format!("{route}forward_nbd = \"unix:/run/n.sock\"\n"),
                "forward_nbd",
            ),
            (format!("{route}nbd_export = [\"disk0\"]\n"), "nbd_export"),
            (
                format!("{route}forward_nbd = \"unix:/n\"\nnbd_export = [\"a b\"]\n"),
                "nbd_export",
            ),
            (
                "forward_nbd = \"unix:/n\"\nnbd_export = [\"d\"]\n".to_string(),
                "forward_nbd",
            ),
        ] {
            let e = build(&text(p.path(), &extra))
                .err()
                .expect(&extra)
                .to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
    }

    #[test]
    fn minimal_and_static_route() {
        let p = pki();
        let b = build(&text(p.path(), "")).unwrap();
        assert!(b.targets[0].route.is_none());
        assert_eq!(b.socket_mode, 0o600);
        let b = build(&text(
            p.path(),
            "forward = \"tcp:127.0.0.1:4444\"\nauthz_identity = \"CN=a\"\nexpect_uuid = \"6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b\"\n",
        ))
        .unwrap();
        assert!(b.targets[0].route.is_some());
    }

    /// The migration listeners' and the admin API's keys are held to the
    /// same rule: one others may read fails the build (start, reload).
    #[test]
    fn a_key_others_can_read_fails_the_build() {
        use std::os::unix::fs::PermissionsExt;
        let chmod = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let p = pki();
        let api = pki();
        let t = text(p.path(), "").replace(
            "[[target]]",
            &format!(
                "[api.tls]\nlisten = \"127.0.0.1:0\"\nx509_dir = \"{}\"\nallow_any_verified_peer = true\n[[target]]",
                api.path().display()
            ),
        );
        build(&t).unwrap();
        for (dir, field) in [(&p, "target[0].x509_dir"), (&api, "api.tls.x509_dir")] {
            let key = dir.path().join(crate::creds::tls::SERVER_KEY);
            chmod(&key, 0o640);
            let e = build(&t).err().expect("an open key accepted");
            let msg = crate::error::chain(&e);
            assert!(msg.contains(field), "{msg}");
            assert!(msg.contains(&key.display().to_string()), "{msg}");
            assert!(msg.contains("mode 0640"), "{msg}");
            chmod(&key, 0o600);
        }
        build(&t).unwrap();
    }

    #[test]
    fn errors_name_file_and_field() {
        let p = pki();
        let err = |extra: &str| match build(&text(p.path(), extra)) {
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(x) = src {
                    s += &format!(": {x}");
                    src = x.source();
                }
                s
            }
            Ok(_) => panic!("{extra} accepted"),
        };
        let e = err("bogus = 1\n");
        assert!(
            e.starts_with("/etc/miggate/daemon.toml: ") && e.contains("bogus"),
            "{e}"
        );
        let e = err("forward = \"tcp:127.0.0.1:4444\"\n");
        assert!(e.contains("target[0].forward: a static route needs"), "{e}");
        let e = err("authz_identity = \"CN=a\"\n");
        assert!(e.contains("target[0].authz_*"), "{e}");
        let e = err("forward = \"ftp:x\"\nallow_any_verified_peer = true\n");
        assert!(e.contains("target[0].forward: \"ftp:x\" is not"), "{e}");
        let missing = p.path().join("missing-acl.json");
        let e = err(&format!(
            "forward = \"tcp:a:1\"\nauthz_list_file = \"{}\"\n",
            missing.display()
        ));
        assert!(
            e.contains("target[0].authz_list_file: cannot read ACL file"),
            "{e}"
        );
        let e = err("stall_timeout = 0\n");
        assert!(e.contains("target[0].stall_timeout"), "{e}");
        // Large enough to overflow a deadline: refused before anything runs.
        let e = err("stall_timeout = 9223372036854775807\n");
        assert!(
            e.contains(
                "target[0].stall_timeout: must be from 1 to 3600 seconds, not 9223372036854775807"
            ),
            "{e}"
        );
        let e = match build(
            &text(p.path(), "").replace("[api]", "retention = 9223372036854775807\n[api]"),
        ) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a huge retention accepted"),
        };
        assert!(
            e.contains("daemon.retention: must be from 1 to 2592000 seconds"),
            "{e}"
        );
        let e = err("handshake_timeout = 100000\n");
        assert!(
            e.contains("target[0].handshake_timeout: must be from 1"),
            "{e}"
        );
        let e = err("max_pending_per_ip = 0\n");
        assert!(
            e.contains("target[0].max_pending_per_ip: must be from 1"),
            "{e}"
        );
        let e = err("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
        assert!(
            e.contains("metrics.listen: 0.0.0.0:9464 is not a loopback"),
            "{e}"
        );
        let t = text(Path::new("/nonexistent/pki"), "");
        let e = build(&t).err().unwrap().to_string();
        assert!(e.contains("target[0].x509_dir: /nonexistent/pki:"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = build(&text(empty.path(), "")).err().unwrap().to_string();
        assert_eq!(e, "/etc/miggate/daemon.toml: target[0].x509_dir");
    }

    #[test]
    fn dump_round_trips_and_reload_guards_listeners() {
        let p = pki();
        let file = Path::new("/etc/miggate/daemon.toml");
        let c = Config::parse(file, &text(p.path(), "")).unwrap();
        let again = Config::parse(file, &c.dump()).unwrap();
        assert_eq!(c, again);
        assert!(c.dump().contains("socket_mode = \"0600\""));
        let mut moved = c.clone();
        moved.targets[0].listen = "127.0.0.1:5555".into();
        let e = c.check_reloadable(&moved, file).unwrap_err().to_string();
        assert!(
            e.contains("target[0].listen: changed from 127.0.0.1:0 to 127.0.0.1:5555"),
            "{e}"
        );
        assert!(e.contains("cannot change on reload"), "{e}");
        let mut acl = c.clone();
        acl.targets[0].forward = Some("tcp:127.0.0.1:1".into());
        c.check_reloadable(&acl, file).unwrap();
    }

    #[test]
    fn the_documented_example_parses() {
        let file = Path::new("docs/daemon.example.toml");
        let c = Config::parse(file, include_str!("../../docs/daemon.example.toml")).unwrap();
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.api.socket, Path::new(DEFAULT_API_SOCKET));
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0600"), Some(0o600));
        assert_eq!(parse_mode("660"), Some(0o660));
        assert_eq!(parse_mode("0o640"), Some(0o640));
        assert_eq!(parse_mode("rw"), None);
        assert_eq!(parse_mode("7777"), None);
    }
}
