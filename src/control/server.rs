//! The daemon's control API: HTTP/1.1 + JSON routes (see `docs/api.yaml`).
//!
//! Served by [`super::serve`] on a local unix socket and optionally on TCP
//! with mutual TLS (the admin authz, separate from the migration ACLs).
//! Every error is `{"error": "<sentence>"}` with a 4xx/5xx status. A
//! QMP-forward registration's target QEMU is the daemon's business
//! ([`crate::daemon::target_qemu`]).

use crate::qmp::storage::{self, DiskCopy};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use uuid::Uuid;

use super::types::{
    Allow, ApiErrorBody, Forward, IncomingRequest, IncomingResponse, ListenerRef, RecoverResponse,
};
use crate::admit::registry::{IncomingSpec, Migration, RecoverRefusal, Registry};
use crate::authz::{AnyVerified, Authz, ListFile, Simple};
use crate::daemon::target_qemu::{self, PrepareError, RecoverError};
use crate::error::chain;
use crate::net::Endpoint;
use crate::wire::frames::Secret;

/// Most channels one migration may register: 1 main + QEMU's multifd maximum
/// would be 256, but more than 64 parallel TLS streams buys nothing.
pub const MAX_CHANNELS: u32 = 64;
/// Longest lifetime of an unused ticket: a day. Tickets are for a migration
/// about to start, not standing credentials.
pub const MAX_EXPIRES_IN_SECS: u64 = 86_400;
/// What the API needs from the daemon beyond the registry.
pub trait Control: Send + Sync {
    /// Re-reads the configuration and the files it names; applies it or
    /// says why not (the previous configuration then stays in force).
    fn reload(&self) -> Result<(), String>;

    /// A new token for the paused binding of `migration`'s cut main
    /// channel (see [`crate::admit::binding::Bindings::rekey_paused`]),
    /// on whichever listener holds it; `None` when none does.
    fn rekey_paused(&self, _migration: &str) -> Option<Secret> {
        None
    }
}

pub struct ApiState {
    pub registry: Arc<Registry>,
    /// The migration listeners (HOST:PORT), told to whoever registers.
    pub listen: Vec<String>,
    /// Where QMP-forward sockets are created.
    pub runtime_dir: PathBuf,
    pub control: Arc<dyn Control>,
    /// QMP-forward migrations' target QEMUs, asked before a cancel.
    pub target_qmps: Arc<target_qemu::TargetQmps>,
}

/// Who is calling, for the audit log lines.
#[derive(Debug, Clone)]
pub(super) struct Caller(pub(super) Arc<str>);

/// An error answer: status + sentence.
#[derive(Debug)]
pub struct ApiFailure(pub(super) StatusCode, pub(super) String);

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
        .route("/v1/migrations/{id}/recover", post(recover))
        .route("/v1/reload", post(reload))
        .fallback(|| async {
            ApiFailure(
                StatusCode::NOT_FOUND,
                "no such endpoint (see docs/api.yaml: /v1/incoming, /v1/migrations, /v1/migrations/{id}/recover, /v1/reload)"
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
    let disks = check_disks(&req)?;
    let mut nbd_forward = match &req.nbd_forward {
        Some(s) => Some(parse_forward(s)?),
        None => None,
    };
    let mut nbd_socket = None;
    let (forward, qmp_socket) = match &req.forward {
        Forward::Endpoint(s) => (parse_forward(s)?, None),
        Forward::Qmp(q) => {
            let sock = st
                .runtime_dir
                .join(format!("incoming-{}.sock", Uuid::new_v4()));
            // The target QEMU's NBD server, on a socket of the daemon's.
            if !disks.is_empty() {
                let nbd = st.runtime_dir.join(format!("nbd-{}.sock", Uuid::new_v4()));
                nbd_forward = Some(Endpoint::Unix(nbd.clone()));
                nbd_socket = Some(nbd);
            }
            let storage = nbd_socket.as_deref().map(|s| (s, disks.as_slice()));
            target_qemu::prepare(q, &sock, storage).await.map_err(|e| {
                let status = match e {
                    PrepareError::NotUnix(_) | PrepareError::Refused(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::BAD_GATEWAY,
                };
                ApiFailure(status, e.to_string())
            })?;
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
        disks: disks.iter().map(|d| d.export.clone()).collect(),
        nbd_forward,
    });
    if let (Some(sock), Forward::Qmp(q)) = (qmp_socket, &req.forward) {
        let storage = nbd_socket.map(|s| (s, disks));
        target_qemu::settle_when_ended(
            st.registry.clone(),
            mig.clone(),
            q,
            sock,
            storage,
            st.target_qmps.clone(),
        );
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

/// Most disks one registration may carry.
pub const MAX_DISKS: usize = 16;

/// The request's disks, checked before anything is touched: names QEMU
/// and the NBD channels can carry unambiguously, each export once, and
/// where their NBD server is (the daemon's, with a QMP forward; the
/// caller's `nbd_forward`, with an endpoint forward).
fn check_disks(req: &IncomingRequest) -> Result<Vec<DiskCopy>, ApiFailure> {
    let qmp = matches!(req.forward, Forward::Qmp(_));
    if req.disks.is_empty() {
        return match req.nbd_forward {
            Some(_) => Err(ApiFailure::bad(
                "nbd_forward without disks: name the disks that arrive over NBD",
            )),
            None => Ok(Vec::new()),
        };
    }
    if req.disks.len() > MAX_DISKS {
        return Err(ApiFailure::bad(format!(
            "{} disks: at most {MAX_DISKS} per migration",
            req.disks.len()
        )));
    }
    if qmp && req.nbd_forward.is_some() {
        return Err(ApiFailure::bad(
            "nbd_forward is for an endpoint forward: with forward.qmp the daemon starts the target QEMU's NBD server itself",
        ));
    }
    if !qmp && req.nbd_forward.is_none() {
        return Err(ApiFailure::bad(
            "disks with an endpoint forward need nbd_forward: where the target QEMU's NBD server listens",
        ));
    }
    let mut out: Vec<DiskCopy> = Vec::new();
    for d in &req.disks {
        let node = match (&d.node, qmp) {
            (Some(n), true) if storage::node_name_ok(n) => n.clone(),
            (Some(n), true) => {
                return Err(ApiFailure::bad(format!(
                    "disks: {n:?} is not a QEMU block node name (a letter, then letters, digits, '-', '.', '_'; at most 31)"
                )))
            }
            (None, true) => {
                return Err(ApiFailure::bad(
                    "disks: each disk needs node, the target QEMU's block node that receives it",
                ))
            }
            (Some(_), false) => {
                return Err(ApiFailure::bad(
                    "disks: node is for a QMP forward (the daemon exports it); with an endpoint forward name the export only",
                ))
            }
            (None, false) => String::new(),
        };
        let export = d.export_name().unwrap_or_default().to_string();
        if !storage::export_name_ok(&export) {
            return Err(ApiFailure::bad(format!(
                "disks: export {export:?} must be 1 to 255 printable ASCII characters without spaces"
            )));
        }
        if out.iter().any(|o| o.export == export) {
            return Err(ApiFailure::bad(format!(
                "disks: export {export:?} is named twice"
            )));
        }
        out.push(DiskCopy {
            target_node: node,
            export,
        });
    }
    Ok(out)
}

/// The listeners a registration names, as indices into `listen`; by
/// default the first. Each listener has its own CA: binding the ticket to
/// the listener the operator meant keeps another CA's certificates out.
pub(crate) fn bind_listeners(
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
pub(crate) fn parse_forward(s: &str) -> Result<Endpoint, ApiFailure> {
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

pub(crate) fn build_allow(allow: &Allow) -> Result<(Arc<dyn Authz>, String), ApiFailure> {
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
    // In postcopy the guest already runs on the target: cutting the
    // channels would not give it back to the source (which cannot resume
    // it) but pause it split over the two hosts.
    if let Some(status) = st.target_qmps.in_postcopy(&mig.id).await {
        tracing::warn!(caller = caller_name(&caller), migration = %mig.id, target_qemu = %status, "cancel refused: the migration is in postcopy");
        return Err(ApiFailure(
            StatusCode::CONFLICT,
            format!(
                "migration {} is in postcopy (target QEMU {status}): the guest already runs on the target and fetches its missing pages from the source, so cutting the channels would leave it split over the two hosts, not back on the source; let it complete, or pause it from the source (migrate-pause) to recover it later",
                mig.id
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

/// Recovers a migration paused in postcopy: the target QEMU listens again
/// (`migrate-recover`) on the registration's socket, and the caller gets a
/// fresh ticket and the cut main channel's binding token, once, for the
/// source gateway that carries the source QEMU's resumed migration.
async fn recover(
    State(st): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<RecoverResponse>, ApiFailure> {
    let mig = find(&st, &id)?;
    let conflict = |e: String| ApiFailure(StatusCode::CONFLICT, e);
    // First, atomically: a second recover of the same pause is refused.
    let (ticket, expires) = mig
        .recover()
        .map_err(|e: RecoverRefusal| conflict(e.to_string()))?;
    let Some(binding_token) = st.control.rekey_paused(&mig.id) else {
        let why = format!(
            "migration {} has no resumable cut main channel at this daemon's gateway (its recovery window passed, or the daemon restarted since)",
            mig.id
        );
        mig.recover_failed(why.clone());
        return Err(conflict(why));
    };
    let sock = match mig.forward() {
        Endpoint::Unix(p) => p.clone(),
        Endpoint::Tcp(_) => {
            mig.recover_failed(RecoverError::NoQmp.to_string());
            return Err(conflict(RecoverError::NoQmp.to_string()));
        }
    };
    if let Err(e) = st.target_qmps.recover(&mig.id, &sock).await {
        let status = match e {
            RecoverError::NoQmp | RecoverError::NotPaused(_) => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        let why = e.to_string();
        mig.recover_failed(why.clone());
        tracing::warn!(caller = caller_name(&caller), migration = %mig.id, reason = %why, "recovery refused");
        return Err(ApiFailure(status, why));
    }
    let expires_at = crate::admit::registry::rfc3339(expires);
    tracing::info!(caller = caller_name(&caller), migration = %mig.id, %expires_at, "recovery issued: the target QEMU listens again");
    Ok(Json(RecoverResponse {
        id: mig.id.clone(),
        ticket,
        binding_token,
        expires_at,
        listen: mig
            .listeners()
            .iter()
            .map(|&i| st.listen[i].clone())
            .collect(),
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::qemu::StreamKind;

    struct NoDaemon;
    impl Control for NoDaemon {
        fn reload(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn state() -> Arc<ApiState> {
        Arc::new(ApiState {
            registry: Registry::new(Duration::from_secs(60)),
            listen: vec!["127.0.0.1:1".into()],
            runtime_dir: std::env::temp_dir(),
            control: Arc::new(NoDaemon),
            target_qmps: Default::default(),
        })
    }

    fn register(st: &ApiState) -> Arc<Migration> {
        st.registry
            .register(IncomingSpec {
                vm_uuid: None,
                allow: Arc::new(AnyVerified),
                allow_desc: "any".into(),
                forward: Endpoint::Unix("/nonexistent/in.sock".into()),
                channels: 1,
                listeners: vec![0],
                ttl: Duration::from_secs(60),
                disks: Vec::new(),
                nbd_forward: None,
            })
            .0
    }

    async fn refused(st: &Arc<ApiState>, id: &str) -> (StatusCode, String) {
        let e = recover(State(st.clone()), None, UrlPath(id.to_string()))
            .await
            .unwrap_err();
        (e.0, e.1)
    }

    /// Only a paused migration is recovered; the others are refused in
    /// words and left as they were.
    #[tokio::test]
    async fn recover_is_refused_unless_paused() {
        let st = state();
        let (s, e) = refused(&st, "not-a-uuid").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        let (s, e) = refused(&st, &Uuid::new_v4().to_string()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
        assert!(e.contains("never registered"), "{e}");

        let mig = register(&st);
        let (s, e) = refused(&st, &mig.id).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(
            e.contains("is registered and not paused in postcopy"),
            "{e}"
        );

        let done = register(&st);
        done.admit_channel(
            "CN=a",
            &StreamKind::Main {
                uuid: None,
                machine: None,
            },
        )
        .unwrap()
        .finish(Ok(()));
        let (s, e) = refused(&st, &done.id).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(e.contains("is completed and not paused"), "{e}");

        // Paused, but its cut main channel is not resumable here (no
        // gateway holds its binding): refused, paused still, and the
        // recovery ticket it would have had is spent.
        let cut = register(&st);
        cut.admit_channel(
            "CN=a",
            &StreamKind::Main {
                uuid: None,
                machine: None,
            },
        )
        .unwrap()
        .finish(Err("cut".into()));
        assert!(cut.pause("paused".into(), Duration::from_secs(60)));
        let (s, e) = refused(&st, &cut.id).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(e.contains("no resumable cut main channel"), "{e}");
        let v = cut.view();
        assert_eq!(v.state, crate::admit::registry::Phase::Paused);
        assert_eq!(v.recoveries, 1);
    }
}
