//! Runs the daemon: binds every socket first (so a bad address fails
//! before anything is served), then serves the migration listeners, the
//! API and the metrics, sweeps the registry, reloads on SIGHUP or
//! `POST /v1/reload`, and stops on SIGTERM or Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use super::config::{Config, ConfigError};
use super::metrics::Metrics;
use super::rundir::{self, RuntimeDirError};
use crate::admit::binding::Scope;
use crate::admit::registry::Registry;
use crate::control::serve::{self, AdminTls, ServerError};
use crate::control::server::{self, ApiState, Control};
use crate::error::chain;
use crate::gate::target::{self, Target};
use crate::outcome::Sink;
use crate::wire::frames::Secret;

/// How often registrations are expired and ended ones forgotten. Admission
/// checks expiry itself; this only keeps the API's view current, so one
/// second of lag is fine.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Content type of Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("cannot listen on {addr} ({field})")]
    Listen {
        addr: String,
        field: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] ServerError),
    #[error("cannot install the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("cannot watch the PKI directory for CRL changes")]
    Watch(#[source] Box<crate::authz::AuthzError>),
    #[error("a listener stopped")]
    Serve(#[source] std::io::Error),
}

/// Loads and validates the configuration; returns it in TOML with every
/// default filled in (`miggate daemon --check`).
pub fn check(path: &Path) -> Result<String, DaemonError> {
    let config = Config::load(path)?;
    config.build(path)?;
    Ok(config.dump())
}

struct Daemon {
    path: PathBuf,
    config: Mutex<Config>,
    targets: Vec<Arc<Target>>,
    admin: Option<Arc<AdminTls>>,
}

impl Control for Daemon {
    fn reload(&self) -> Result<(), String> {
        let new = Config::load(&self.path).map_err(|e| chain(&e))?;
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        current
            .check_reloadable(&new, &self.path)
            .map_err(|e| chain(&e))?;
        // Everything is parsed and loaded before anything is swapped: a
        // broken file changes nothing.
        let built = new.build(&self.path).map_err(|e| chain(&e))?;
        for (t, b) in self.targets.iter().zip(built.targets) {
            t.set_tls(b.tls);
            t.set_route(b.route);
            // Re-checks live channels against the new ACL and CRL.
            t.watch_revocations(&b.x509_dir, b.keep_live)
                .map_err(|e| chain(&e))?;
        }
        if let (Some(admin), Some(b)) = (&self.admin, built.api_tls) {
            admin.set(b.tls, b.authz);
        }
        *current = new;
        tracing::info!(config = %self.path.display(), "configuration reloaded");
        Ok(())
    }

    fn rekey_paused(&self, migration: &str) -> Option<Secret> {
        let scope = Scope::Migration(migration.to_string());
        self.targets
            .iter()
            .find_map(|t| t.bindings().rekey_paused(&scope))
    }
}

async fn bind_tcp(addr: &str, field: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: addr.to_string(),
            field: field.to_string(),
            source,
        })
}

pub async fn run(path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(path)?;
    let built = config.build(path)?;
    let runtime_dir = config.daemon.runtime_dir.clone();
    // Before anything binds: the API socket may live in it too.
    let group_reaches_api =
        config.api.socket.starts_with(&runtime_dir) && built.socket_mode & 0o070 != 0;
    rundir::prepare(&runtime_dir, rundir::max_mode(group_reaches_api))?;

    // Handlers first: SIGHUP's default action would kill a daemon that
    // already said it is listening.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;

    // Bind everything before serving anything.
    let mut tcp = Vec::new();
    for (i, t) in config.targets.iter().enumerate() {
        tcp.push(bind_tcp(&t.listen, &format!("target[{i}].listen")).await?);
    }
    let admin_listener = match &config.api.tls {
        Some(t) => Some(bind_tcp(&t.listen, "api.tls.listen").await?),
        None => None,
    };
    let metrics_listener = match &config.metrics {
        Some(m) => Some(bind_tcp(&m.listen.to_string(), "metrics.listen").await?),
        None => None,
    };
    let api_socket = config.api.socket.clone();
    let unix = serve::bind_unix(&api_socket, built.socket_mode)?;

    let registry = Registry::new(Duration::from_secs(config.daemon.retention));
    let metrics = Metrics::new();
    let sink: Arc<dyn Sink> = metrics.clone();
    let mut tasks: JoinSet<std::io::Result<()>> = JoinSet::new();
    let mut targets = Vec::new();
    let mut listen = Vec::new();
    for (i, (listener, b)) in tcp.into_iter().zip(built.targets).enumerate() {
        let addr = listener
            .local_addr()
            .map_err(DaemonError::Serve)?
            .to_string();
        tracing::info!(role = "daemon", listen = %addr, route = %b.route_desc, "listening");
        let gate = Target::new(
            b.tls,
            b.route,
            Some((registry.clone(), i)),
            b.stall,
            Some(sink.clone()),
            b.limits,
        );
        gate.watch_revocations(&b.x509_dir, b.keep_live)
            .map_err(|e| DaemonError::Watch(Box::new(e)))?;
        tasks.spawn(target::serve(listener, gate.clone()));
        targets.push(gate);
        listen.push(addr);
    }

    let admin = built.api_tls.map(|b| AdminTls::new(b.tls, b.authz));
    let daemon = Arc::new(Daemon {
        path: path.to_path_buf(),
        config: Mutex::new(config),
        targets,
        admin: admin.clone(),
    });
    let app = server::router(Arc::new(ApiState {
        registry: registry.clone(),
        listen,
        runtime_dir,
        control: daemon.clone(),
        target_qmps: Default::default(),
    }));
    if let Some(l) = metrics_listener {
        tracing::info!(listen = %l.local_addr().map_err(DaemonError::Serve)?, "metrics listening");
        let (metrics, registry) = (metrics.clone(), registry.clone());
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let body = metrics.render(&registry);
                async move { ([(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)], body) }
            }),
        );
        tasks.spawn(async move {
            serve::serve_tcp(l, app, "metrics").await;
            Ok(())
        });
    }
    tracing::info!(socket = %api_socket.display(), mode = format!("{:04o}", built.socket_mode), "API listening");
    tasks.spawn({
        let app = app.clone();
        async move {
            serve::serve_unix(unix, app).await;
            Ok(())
        }
    });
    if let (Some(l), Some(admin)) = (admin_listener, admin) {
        tracing::info!(listen = %l.local_addr().map_err(DaemonError::Serve)?, "API listening with mutual TLS");
        tasks.spawn(async move {
            serve::serve_tls(l, admin, app).await;
            Ok(())
        });
    }
    tasks.spawn({
        let registry = registry.clone();
        async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                registry.sweep();
            }
        }
    });

    let result = loop {
        tokio::select! {
            _ = hup.recv() => {
                let d = daemon.clone();
                match tokio::task::spawn_blocking(move || d.reload()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => tracing::error!(reason = why, "reload on SIGHUP refused, the previous configuration stays in force"),
                    Err(e) => tracing::error!(error = %e, "reload task failed"),
                }
            }
            _ = term.recv() => break Ok(()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            Some(done) = tasks.join_next() => {
                break match done {
                    Ok(Err(e)) => Err(DaemonError::Serve(e)),
                    Ok(Ok(())) => Err(DaemonError::Serve(std::io::Error::other("a server task ended"))),
                    Err(e) => Err(DaemonError::Serve(std::io::Error::other(e))),
                };
            }
        }
    };
    tracing::info!("shutting down");
    tasks.abort_all();
    let _ = std::fs::remove_file(&api_socket);
    result
}
