//! The daemon's control API: HTTP/1.1 + JSON (see `docs/api.yaml`).
//!
//! Served on a local unix socket, whose file mode is the access control,
//! and optionally on TCP with mutual TLS, where the client certificate's DN
//! goes through the admin authz (separate from the migration ACLs). Every
//! error is `{"error": "<sentence>"}` with a 4xx/5xx status.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use uuid::Uuid;

use super::types::{
    Allow, ApiErrorBody, Forward, IncomingRequest, IncomingResponse, ListenerRef, QmpForward,
};
use crate::admit::registry::{IncomingSpec, Migration, Registry};
use crate::authz::{AnyVerified, Authz, Decision, ListFile, Simple};
use crate::creds::{dn, tls};
use crate::error::chain;
use crate::gate::unix_bind::{self, UnixBindError};
use crate::gate::Endpoint;
use crate::qmp::{MigrationParameters, Qmp};

/// Most channels one migration may register: 1 main + QEMU's multifd maximum
/// would be 256, but more than 64 parallel TLS streams buys nothing.
pub const MAX_CHANNELS: u32 = 64;
/// Longest lifetime of an unused ticket: a day. Tickets are for a migration
/// about to start, not standing credentials.
pub const MAX_EXPIRES_IN_SECS: u64 = 86_400;
/// A client that does not finish sending its request headers in this time
/// is cut (it would otherwise hold a connection forever). Also bounds an
/// idle keep-alive connection waiting for its next request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// ... and its request body: API bodies are a few hundred bytes of JSON.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body read (axum's default limit, kept).
const MAX_BODY: usize = 2 << 20;
/// Connections served at once per API or metrics listener. The API has a
/// handful of callers (an orchestrator, an operator, Prometheus); beyond
/// this new connections are closed at once, so that a local client
/// looping on connect cannot take the descriptors migrations need.
pub const MAX_HTTP_CONNECTIONS: usize = 64;
/// The admin TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to the target QEMU's QMP and preparing it. Each command is
/// bounded by the QMP client itself; this bounds the whole.
const QMP_SETUP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the directory {} for the API socket", path.display())]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("another process is already serving {}", path.display())]
    InUse { path: PathBuf },
    #[error("cannot create the API socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the API needs from the daemon beyond the registry.
pub trait Control: Send + Sync {
    /// Re-reads the configuration and the files it names; applies it or
    /// says why not (the previous configuration then stays in force).
    fn reload(&self) -> Result<(), String>;
}

pub struct ApiState {
    pub registry: Arc<Registry>,
    /// The migration listeners (HOST:PORT), told to whoever registers.
    pub listen: Vec<String>,
    /// Where QMP-forward sockets are created.
    pub runtime_dir: PathBuf,
    pub control: Arc<dyn Control>,
}

/// Who is calling, for the audit log lines.
#[derive(Debug, Clone)]
struct Caller(Arc<str>);

/// An error answer: status + sentence.
#[derive(Debug)]
pub struct ApiFailure(StatusCode, String);

impl ApiFailure {
    fn bad(msg: impl Into<String>) -> Self {
        ApiFailure(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/incoming", post(incoming))
        .route("/v1/migrations", get(list))
        .route("/v1/migrations/{id}", get(one).delete(cancel))
        .route("/v1/reload", post(reload))
        .fallback(|| async {
            ApiFailure(
                StatusCode::NOT_FOUND,
                "no such endpoint (see docs/api.yaml: /v1/incoming, /v1/migrations, /v1/reload)"
                    .into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiFailure(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method".into(),
            )
        })
        .with_state(state)
}

async fn incoming(
    State(st): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IncomingResponse>), ApiFailure> {
    let body = body.map_err(|e| ApiFailure(e.status(), e.body_text()))?;
    let req: IncomingRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiFailure::bad(format!("invalid request body: {e}")))?;
    if !(1..=MAX_CHANNELS).contains(&req.channels) {
        return Err(ApiFailure::bad(format!(
            "channels must be from 1 to {MAX_CHANNELS} (1 + the number of multifd channels), not {}",
            req.channels
        )));
    }
    if !(1..=MAX_EXPIRES_IN_SECS).contains(&req.expires_in) {
        return Err(ApiFailure::bad(format!(
            "expires_in must be from 1 to {MAX_EXPIRES_IN_SECS} seconds, not {}",
            req.expires_in
        )));
    }
    let listeners = bind_listeners(&st.listen, req.listeners.as_deref())?;
    let (allow, allow_desc) = build_allow(&req.allow)?;
    let (forward, qmp_socket) = match &req.forward {
        Forward::Endpoint(s) => (parse_forward(s)?, None),
        Forward::Qmp(q) => {
            let sock = st
                .runtime_dir
                .join(format!("incoming-{}.sock", Uuid::new_v4()));
            prepare_target_qemu(q, &sock).await?;
            (Endpoint::Unix(sock.clone()), Some(sock))
        }
    };
    let (mig, ticket) = st.registry.register(IncomingSpec {
        vm_uuid: req.vm_uuid,
        allow,
        allow_desc,
        forward,
        channels: req.channels,
        ttl: Duration::from_secs(req.expires_in),
        listeners: listeners.clone(),
    });
    if let (Some(sock), Forward::Qmp(q)) = (qmp_socket, &req.forward) {
        let qmp_path = q.qmp.trim_start_matches("unix:").to_string();
        let (registry, mig) = (st.registry.clone(), mig.clone());
        tokio::spawn(async move {
            wait_until_ended(&registry, &mig).await;
            let _ = std::fs::remove_file(&sock);
            if mig.view().state != super::types::Phase::Cancelled {
                settle_with_qemu_verdict(&mig, &qmp_path).await;
            }
        });
    }
    let view = mig.view();
    tracing::info!(
        caller = caller_name(&caller),
        migration = %mig.id,
        vm = view.vm_uuid.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
        allow = %view.allow,
        forward = %view.forward,
        channels = view.channels_expected,
        expires_at = %view.expires_at,
        "migration registered"
    );
    Ok((
        StatusCode::CREATED,
        Json(IncomingResponse {
            id: mig.id.clone(),
            ticket,
            expires_at: view.expires_at,
            listen: listeners.iter().map(|&i| st.listen[i].clone()).collect(),
        }),
    ))
}

/// The listeners a registration names, as indices into `listen`; by
/// default the first. Each listener has its own CA: binding the ticket to
/// the listener the operator meant keeps another CA's certificates out.
fn bind_listeners(
    listen: &[String],
    refs: Option<&[ListenerRef]>,
) -> Result<Vec<usize>, ApiFailure> {
    let Some(refs) = refs else {
        return Ok(vec![0]);
    };
    if refs.is_empty() {
        return Err(ApiFailure::bad(
            "listeners is empty: name at least one listener, or leave it out for the first",
        ));
    }
    let mut out = Vec::new();
    for r in refs {
        let i = match r {
            ListenerRef::Index(i) if *i < listen.len() => *i,
            ListenerRef::Address(a) => listen.iter().position(|l| l == a).ok_or_else(|| {
                ApiFailure::bad(format!(
                    "listeners: {a:?} is not a listener of this daemon (they are: {})",
                    listen.join(", ")
                ))
            })?,
            ListenerRef::Index(i) => {
                return Err(ApiFailure::bad(format!(
                    "listeners: there is no listener {i}; this daemon has {} (0 to {})",
                    listen.len(),
                    listen.len() - 1
                )))
            }
        };
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Ok(out)
}

/// `tcp:HOST:PORT` or `unix:PATH`, the prefix required: a bare HOST:PORT
/// in a registration is more likely a mistake than a shorthand.
fn parse_forward(s: &str) -> Result<Endpoint, ApiFailure> {
    let bad = |why: String| {
        ApiFailure::bad(format!(
            "forward {s:?} is not tcp:HOST:PORT, unix:PATH or {{\"qmp\": \"unix:PATH\"}}: {why}"
        ))
    };
    if !s.starts_with("tcp:") && !s.starts_with("unix:") {
        return Err(bad("it needs the tcp: or unix: prefix".into()));
    }
    s.parse::<Endpoint>().map_err(bad)
}

fn build_allow(allow: &Allow) -> Result<(Arc<dyn Authz>, String), ApiFailure> {
    Ok(match allow {
        Allow::Identity(dn) if dn.trim().is_empty() => {
            return Err(ApiFailure::bad("allow.identity is empty"))
        }
        Allow::Identity(dn) => (Arc::new(Simple::new(dn.clone())), format!("identity {dn}")),
        Allow::AclFile(path) => {
            if !path.is_absolute() {
                return Err(ApiFailure::bad(format!(
                    "allow.acl_file {} must be an absolute path on the daemon's host",
                    path.display()
                )));
            }
            // Watched like authz-list-file with refresh: edits apply to
            // this registration while it lives.
            let list = ListFile::open(path, true)
                .map_err(|e| ApiFailure::bad(format!("allow.acl_file: {}", chain(&e))))?;
            (list, format!("ACL file {}", path.display()))
        }
        Allow::AnyVerifiedPeer(true) => (Arc::new(AnyVerified), "any verified peer".into()),
        Allow::AnyVerifiedPeer(false) => {
            return Err(ApiFailure::bad(
                "allow.any_verified_peer must be true (or give identity or acl_file)",
            ))
        }
    })
}

/// Sets the target QEMU's migration capabilities and parameters, then
/// `migrate-incoming unix:SOCK`, where the gateway will forward.
async fn prepare_target_qemu(q: &QmpForward, sock: &Path) -> Result<(), ApiFailure> {
    let path = q
        .qmp
        .strip_prefix("unix:")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            ApiFailure::bad(format!(
                "forward.qmp {:?} is not unix:PATH (the target QEMU's QMP socket)",
                q.qmp
            ))
        })?;
    let gateway = |msg: String| ApiFailure(StatusCode::BAD_GATEWAY, msg);
    let work = async {
        let mut qmp = Qmp::connect_unix(path)
            .await
            .map_err(|e| gateway(format!("cannot use the target QEMU's QMP at {path}: {e}")))?;
        if !q.capabilities.is_empty() {
            qmp.set_capabilities(q.capabilities.iter().map(|(c, on)| (c, *on)))
                .await
                .map_err(|e| gateway(format!("target {e}")))?;
        }
        if !q.parameters.is_empty() {
            let params = MigrationParameters {
                other: q.parameters.clone(),
                ..Default::default()
            };
            qmp.set_parameters(&params)
                .await
                .map_err(|e| gateway(format!("target {e}")))?;
        }
        // A socket left by an earlier migration would make QEMU's bind fail.
        let _ = std::fs::remove_file(sock);
        qmp.migrate_incoming(&format!("unix:{}", sock.display()))
            .await
            .map_err(|e| gateway(format!("target {e}")))?;
        Ok(())
    };
    tokio::time::timeout(QMP_SETUP_TIMEOUT, work)
        .await
        .map_err(|_| {
            gateway(format!(
                "the target QEMU's QMP at {path} did not finish the set-up within {} s",
                QMP_SETUP_TIMEOUT.as_secs()
            ))
        })?
}

/// Waits until the migration's channels have all ended (or it was
/// cancelled or expired).
async fn wait_until_ended(registry: &Registry, mig: &Migration) {
    let mut changes = registry.subscribe();
    while !mig.view().state.is_final() {
        if changes.changed().await.is_err() {
            break;
        }
    }
}

/// How long the target QEMU may take to finish loading once the sockets
/// closed (device state is loaded after the last RAM page).
const QEMU_VERDICT_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the target QEMU how its incoming migration ended and records that:
/// only QEMU knows whether it loaded the VM. Unreachable QMP (a target
/// QEMU exits when an incoming migration fails) leaves the channels' verdict,
/// with a note in the log.
async fn settle_with_qemu_verdict(mig: &Migration, qmp_path: &str) {
    let ask = async {
        let mut qmp = Qmp::connect_unix(qmp_path).await?;
        loop {
            let info = qmp.query_migrate().await?;
            if info.is_terminal() {
                return Ok::<_, crate::qmp::QmpError>(info);
            }
            // Loading the device state after the stream: a short wait.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(QEMU_VERDICT_TIMEOUT, ask).await {
        Ok(Ok(info)) => {
            let completed = info.status.as_deref() == Some("completed");
            let why = info
                .error_desc
                .map(|e| format!("target QEMU: {e}"))
                .or_else(|| {
                    Some(format!(
                        "target QEMU: migration {}",
                        info.status.unwrap_or_default()
                    ))
                });
            mig.settle(completed, if completed { None } else { why });
        }
        Ok(Err(e)) => tracing::warn!(
            migration = %mig.id, error = %e,
            "cannot ask the target QEMU how the migration ended; keeping the channels' verdict"
        ),
        Err(_) => tracing::warn!(
            migration = %mig.id,
            "the target QEMU did not finish the incoming migration within {} s",
            QEMU_VERDICT_TIMEOUT.as_secs()
        ),
    }
}

async fn list(State(st): State<Arc<ApiState>>) -> Json<Vec<super::types::MigrationView>> {
    Json(st.registry.list())
}

fn find(st: &ApiState, id: &str) -> Result<Arc<Migration>, ApiFailure> {
    let uuid = Uuid::parse_str(id)
        .map_err(|e| ApiFailure::bad(format!("{id:?} is not a migration id (a UUID): {e}")))?;
    st.registry.get(&uuid.to_string()).ok_or_else(|| {
        ApiFailure(
            StatusCode::NOT_FOUND,
            format!(
                "no migration {uuid}: it was never registered with this daemon, or it ended and has been forgotten"
            ),
        )
    })
}

async fn one(
    State(st): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<super::types::MigrationView>, ApiFailure> {
    Ok(Json(find(&st, &id)?.view()))
}

async fn cancel(
    State(st): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<super::types::MigrationView>, ApiFailure> {
    let mig = find(&st, &id)?;
    let before = mig.view().state;
    if before.is_final() {
        return Err(ApiFailure(
            StatusCode::CONFLICT,
            format!(
                "migration {} has already ended ({}); there is nothing to cancel",
                mig.id,
                before.as_str()
            ),
        ));
    }
    let view = st
        .registry
        .cancel(&mig.id)
        .expect("the migration was just found");
    tracing::warn!(caller = caller_name(&caller), migration = %mig.id, was = before.as_str(), "migration cancelled");
    Ok(Json(view))
}

async fn reload(
    State(st): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<serde_json::Value>, ApiFailure> {
    let control = st.control.clone();
    let who = caller_name(&caller).to_string();
    let result = tokio::task::spawn_blocking(move || control.reload())
        .await
        .map_err(|e| {
            ApiFailure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reload task failed: {e}"),
            )
        })?;
    match result {
        Ok(()) => {
            tracing::info!(caller = who, "configuration reloaded through the API");
            Ok(Json(json!({ "reloaded": true })))
        }
        Err(why) => Err(ApiFailure(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused, the previous configuration stays in force: {why}"),
        )),
    }
}

fn caller_name(c: &Option<Extension<Caller>>) -> &str {
    c.as_ref().map_or("local socket", |Extension(c)| &c.0)
}

/// Creates the API socket with `mode` in force from its first moment (see
/// [`unix_bind`]). A stale socket (no one accepting) is replaced; a live
/// one, or a file that is not a socket, is an error.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match unix_bind::bind(path, unix_bind::Access::mode(mode)) {
        Ok(b) => Ok(b.listener),
        Err(UnixBindError::NotASocket { path }) => Err(ServerError::NotASocket { path }),
        Err(UnixBindError::InUse { path }) => Err(ServerError::InUse { path }),
        Err(other) => Err(ServerError::Bind {
            path: path.to_path_buf(),
            source: std::io::Error::other(other),
        }),
    }
}

/// Serves the API on the local socket forever.
pub async fn serve_unix(listener: UnixListener, app: Router) {
    let caller = Caller("local socket".into());
    let mut limit = ConnLimit::new("API");
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let Some(permit) = limit.admit() else {
                    continue;
                };
                serve_connection(sock, app.clone().layer(Extension(caller.clone())), permit);
            }
            Err(e) => limit.accept_failed(&e).await,
        }
    }
}

/// Serves plain HTTP on TCP (the loopback metrics listener) forever, with
/// the same timeouts and connection limit as the API.
pub async fn serve_tcp(listener: TcpListener, app: Router, what: &'static str) {
    let mut limit = ConnLimit::new(what);
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                if let Some(permit) = limit.admit() {
                    serve_connection(sock, app.clone(), permit);
                }
            }
            Err(e) => limit.accept_failed(&e).await,
        }
    }
}

/// At most [`MAX_HTTP_CONNECTIONS`] connections of one listener at once,
/// and rate-limited log lines for the ones closed unserved.
struct ConnLimit {
    what: &'static str,
    slots: Arc<tokio::sync::Semaphore>,
    full_log: crate::outcome::RateLimit,
    error_log: crate::outcome::RateLimit,
}

impl ConnLimit {
    fn new(what: &'static str) -> Self {
        ConnLimit {
            what,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS)),
            full_log: crate::outcome::RateLimit::new(),
            error_log: crate::outcome::RateLimit::new(),
        }
    }

    /// A slot for a new connection, or `None` (the caller drops it).
    fn admit(&mut self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            if let Some(suppressed) = self.full_log.allow() {
                tracing::warn!(
                    server = self.what,
                    suppressed,
                    "{} connection closed: {MAX_HTTP_CONNECTIONS} connections already open",
                    self.what
                );
            }
        }
        permit
    }

    /// EMFILE and friends: the error repeats until a descriptor is freed;
    /// back off instead of spinning.
    async fn accept_failed(&mut self, e: &std::io::Error) {
        if let Some(suppressed) = self.error_log.allow() {
            tracing::error!(server = self.what, error = %e, suppressed, "accept failed");
        }
        tokio::time::sleep(crate::timeouts::ACCEPT_BACKOFF).await;
    }
}

/// The admin TLS configuration and ACL, swapped on reload.
pub struct AdminTls {
    current: RwLock<(Arc<ServerConfig>, Arc<dyn Authz>)>,
}

impl AdminTls {
    pub fn new(tls: Arc<ServerConfig>, authz: Arc<dyn Authz>) -> Arc<AdminTls> {
        Arc::new(AdminTls {
            current: RwLock::new((tls, authz)),
        })
    }

    pub fn set(&self, tls: Arc<ServerConfig>, authz: Arc<dyn Authz>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (tls, authz);
    }

    fn get(&self) -> (Arc<ServerConfig>, Arc<dyn Authz>) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Serves the API on TCP with mutual TLS forever. A verified client whose
/// DN the admin authz denies gets 403 with the reason on every request.
pub async fn serve_tls(listener: TcpListener, admin: Arc<AdminTls>, app: Router) {
    let mut limit = ConnLimit::new("API (TLS)");
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                limit.accept_failed(&e).await;
                continue;
            }
        };
        let Some(permit) = limit.admit() else {
            continue;
        };
        let (config, authz) = admin.get();
        let app = app.clone();
        tokio::spawn(async move {
            let accept = tokio_rustls::TlsAcceptor::from(config).accept(sock);
            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let why = tls::describe_tls_error(&e, None);
                    tracing::warn!(peer.addr = %addr, reason = why, "API connection refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer.addr = %addr, "API connection refused: TLS handshake timed out");
                    return;
                }
            };
            let leaf = tls::peer_leaf(stream.get_ref().1.peer_certificates()).map(<[u8]>::to_vec);
            let peer = match leaf.as_deref().map(dn::subject_dn) {
                Some(Ok(dn)) => dn,
                _ => {
                    tracing::warn!(peer.addr = %addr, "API connection refused: no readable client certificate");
                    return;
                }
            };
            match authz.check(&peer) {
                Decision::Allow => {
                    serve_connection(stream, app.layer(Extension(Caller(peer.into()))), permit);
                }
                Decision::Deny { reason } => {
                    tracing::warn!(peer.addr = %addr, peer.dn = peer, reason, "API caller refused");
                    let deny = Router::new().fallback(move || async move {
                        ApiFailure(
                            StatusCode::FORBIDDEN,
                            format!("not allowed to use this API: {reason}"),
                        )
                    });
                    serve_connection(stream, deny, permit);
                }
            }
        });
    }
}

/// Serves one HTTP/1.1 connection, holding its slot until it ends.
fn serve_connection<S>(stream: S, app: Router, permit: tokio::sync::OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let app = app.layer(axum::middleware::from_fn(read_body_in_time));
        let service = TowerToHyperService::new(app);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "API connection ended with an error");
        }
    });
}

/// Reads the request body under [`BODY_READ_TIMEOUT`] (hyper bounds only
/// the headers): a client trickling its body is answered 408 and cut.
async fn read_body_in_time(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = req.into_parts();
    let body =
        match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return ApiFailure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
                )
                .into_response()
            }
            Err(_) => {
                let mut r = ApiFailure(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s",
                        BODY_READ_TIMEOUT.as_secs()
                    ),
                )
                .into_response();
                r.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return r;
            }
        };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(body),
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn http_server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            post(|b: Bytes| async move { b }).get(|| async { "ok" }),
        );
        tokio::spawn(serve_tcp(l, app, "test"));
        addr
    }

    /// Sends one GET and reads its answer; the connection stays open.
    async fn get(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"ok") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        c
    }

    #[tokio::test]
    async fn http_connections_beyond_the_limit_are_closed_at_once() {
        let addr = http_server().await;
        let mut open = Vec::new();
        for _ in 0..MAX_HTTP_CONNECTIONS {
            open.push(get(addr).await);
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("the connection over the limit must be closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "served over the limit");
        // A slot freed is a slot served.
        drop(open.pop());
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
                if c.read(&mut buf).await.unwrap_or(0) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a freed slot serves again");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_request_bodies_and_headers_are_cut() {
        let addr = http_server().await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(BODY_READ_TIMEOUT * 2, c.read_to_string(&mut resp))
            .await
            .expect("a trickled body must be cut")
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(HEADER_READ_TIMEOUT * 2, c.read_to_end(&mut rest))
            .await
            .expect("trickled headers must be cut")
            .unwrap();
    }

    #[tokio::test]
    async fn api_socket_mode_stale_live_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/api.sock");
        let l = bind_unix(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Someone is accepting on it: not ours to replace.
        assert!(matches!(
            bind_unix(&path, 0o600),
            Err(ServerError::InUse { .. })
        ));
        // A crashed daemon's socket file is replaced.
        drop(l);
        let l = bind_unix(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(l);
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            bind_unix(&file, 0o600),
            Err(ServerError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }
}
