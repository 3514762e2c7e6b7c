//! Serving the API: the local unix socket (its file mode is the access
//! control), the mTLS listener (the client certificate's DN through the
//! admin authz, via the one accept step [`crate::net::mtls`]) and plain
//! TCP for the loopback metrics; each with a connection limit and time
//! limits on a request's headers and body.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use super::server::{ApiFailure, Caller};
use crate::authz::{Authz, Decision};
use crate::net::mtls;
use crate::net::unix_bind::{self, UnixBindError};

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
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let (stream, peer) = match mtls::accept(&acceptor, sock, TLS_HANDSHAKE_TIMEOUT).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(peer.addr = %addr, reason = %e, "API connection refused");
                    return;
                }
            };
            let peer = peer.dn;
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
    use axum::body::Bytes;
    use axum::routing::post;
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
