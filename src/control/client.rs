//! Client of the daemon's control API (used by `miggate migrate`).
//!
//! One HTTP/1.1 connection per request: the API is called a handful of
//! times per migration, so a pool would only add state. The daemon answers
//! on a local unix socket (its file mode is the access control) or on TCP
//! with mutual TLS (a client certificate from the admin PKI).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use super::types::{
    ApiErrorBody, IncomingRequest, IncomingResponse, MigrationView, RecoverResponse,
};
use crate::creds::tls;
use crate::net::{HostPort, HostPortError};

/// Connecting to the daemon: local, or one LAN hop away.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One request, answer included. `POST /v1/incoming` with a QMP forward
/// drives the target QEMU before answering (a few QMP round trips, each
/// bounded by the QMP client's own 30 s), so this is generous.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// ALPN of the API over TLS (plain HTTP/1.1).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Answers larger than this are not the daemon's.
const MAX_BODY: usize = 16 << 20;

/// Where the daemon's API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    /// The local socket, `unix:/run/miggate/api.sock`.
    Unix(PathBuf),
    /// `https://host:port` with mutual TLS.
    Tls {
        /// HOST:PORT to connect to.
        addr: String,
        /// Name the daemon's certificate must carry.
        server_name: String,
        /// PKI directory in QEMU's layout: client-cert/key and ca-cert
        /// (and ca-crl) are used.
        x509_dir: PathBuf,
    },
}

impl ApiAddr {
    /// Sets the PKI directory of a `https://` address (parsing leaves it
    /// empty: it comes from its own option).
    pub fn with_x509_dir(self, dir: impl Into<PathBuf>) -> ApiAddr {
        match self {
            ApiAddr::Tls {
                addr, server_name, ..
            } => ApiAddr::Tls {
                addr,
                server_name,
                x509_dir: dir.into(),
            },
            unix => unix,
        }
    }
}

impl std::fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ApiAddr::Tls { addr, .. } => write!(f, "https://{addr}"),
        }
    }
}

impl FromStr for ApiAddr {
    type Err = ApiError;

    /// `unix:/path` or `https://host:port` (`[v6]:port` too).
    fn from_str(s: &str) -> Result<ApiAddr, ApiError> {
        let bad = |why: &str| ApiError::Addr {
            given: s.to_string(),
            why: why.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs the path of the daemon's API socket"));
            }
            return Ok(ApiAddr::Unix(path.into()));
        }
        let Some(rest) = s.strip_prefix("https://") else {
            return Err(bad("expected unix:PATH or https://HOST:PORT"));
        };
        let rest = rest.trim_end_matches('/');
        let hp: HostPort = rest
            .parse()
            .map_err(|e: HostPortError| bad(&e.to_string()))?;
        Ok(ApiAddr::Tls {
            addr: rest.to_string(),
            server_name: hp.host,
            x509_dir: PathBuf::new(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{given:?} is not a daemon API address: {why}")]
    Addr { given: String, why: String },
    #[error("cannot use the admin TLS credentials")]
    Creds(#[from] tls::CredsError),
    #[error("{name:?} is not a valid TLS server name for the daemon")]
    ServerName { name: String },
    #[error("cannot connect to the miggate daemon at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with the miggate daemon at {addr} failed: {why}")]
    Tls { addr: String, why: String },
    #[error("the miggate daemon at {addr} did not answer within {} s", after.as_secs())]
    Timeout { addr: String, after: Duration },
    #[error("HTTP exchange with the miggate daemon at {addr} failed: {detail}")]
    Protocol { addr: String, detail: String },
    /// The daemon's own answer: `message` is its `"error"` sentence.
    #[error("the miggate daemon refused the request ({status}): {message}")]
    Http { status: u16, message: String },
}

impl ApiError {
    /// The HTTP status the daemon answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

enum Transport {
    Unix(PathBuf),
    Tls {
        addr: String,
        server_name: ServerName<'static>,
        config: Arc<ClientConfig>,
    },
}

/// A client of one daemon.
pub struct ApiClient {
    addr: ApiAddr,
    transport: Transport,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiClient({})", self.addr)
    }
}

impl ApiClient {
    /// Loads the TLS credentials now, so that a broken PKI directory is
    /// reported before anything else happens.
    pub fn new(addr: ApiAddr) -> Result<ApiClient, ApiError> {
        let transport = match &addr {
            ApiAddr::Unix(p) => Transport::Unix(p.clone()),
            ApiAddr::Tls {
                addr: hostport,
                server_name,
                x509_dir,
            } => {
                let config = tls::client_config(x509_dir, &[ALPN_HTTP1])?;
                let name = ServerName::try_from(server_name.clone()).map_err(|_| {
                    ApiError::ServerName {
                        name: server_name.clone(),
                    }
                })?;
                Transport::Tls {
                    addr: hostport.clone(),
                    server_name: name,
                    config,
                }
            }
        };
        Ok(ApiClient { addr, transport })
    }

    pub fn addr(&self) -> &ApiAddr {
        &self.addr
    }

    /// `POST /v1/incoming`: registers an incoming migration.
    pub async fn register(&self, req: &IncomingRequest) -> Result<IncomingResponse, ApiError> {
        let body = serde_json::to_vec(req).expect("a request serialises");
        self.call(Method::POST, "/v1/incoming", Some(body)).await
    }

    /// `GET /v1/migrations/{id}`.
    pub async fn migration(&self, id: &str) -> Result<MigrationView, ApiError> {
        self.call(
            Method::GET,
            &format!("/v1/migrations/{}", path_segment(id)),
            None,
        )
        .await
    }

    /// `GET /v1/migrations`.
    pub async fn migrations(&self) -> Result<Vec<MigrationView>, ApiError> {
        self.call(Method::GET, "/v1/migrations", None).await
    }

    /// `DELETE /v1/migrations/{id}`: cancels; every channel is cut.
    pub async fn cancel(&self, id: &str) -> Result<MigrationView, ApiError> {
        self.call(
            Method::DELETE,
            &format!("/v1/migrations/{}", path_segment(id)),
            None,
        )
        .await
    }

    /// `POST /v1/migrations/{id}/recover`: the target QEMU of a migration
    /// paused in postcopy listens again; the answer carries its fresh
    /// ticket and binding token, once.
    pub async fn recover(&self, id: &str) -> Result<RecoverResponse, ApiError> {
        self.call(
            Method::POST,
            &format!("/v1/migrations/{}/recover", path_segment(id)),
            None,
        )
        .await
    }

    /// `POST /v1/reload`: the daemon re-reads its configuration and ACLs.
    pub async fn reload(&self) -> Result<(), ApiError> {
        let _: serde_json::Value = self.call(Method::POST, "/v1/reload", None).await?;
        Ok(())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ApiError> {
        let addr = self.addr.to_string();
        let exchange = async {
            let (status, bytes) = match &self.transport {
                Transport::Unix(p) => {
                    let conn = connect(&addr, tokio::net::UnixStream::connect(p)).await?;
                    exchange(&addr, conn, method, path, body).await?
                }
                Transport::Tls {
                    addr: hostport,
                    server_name,
                    config,
                } => {
                    let tcp = connect(&addr, tokio::net::TcpStream::connect(hostport)).await?;
                    let _ = tcp.set_nodelay(true);
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(|e| ApiError::Tls {
                            addr: addr.clone(),
                            why: tls::describe_tls_error(&e, Some(&server_name.to_str())),
                        })?;
                    exchange(&addr, tls, method, path, body).await?
                }
            };
            decode(&addr, status, &bytes)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                addr: addr.clone(),
                after: REQUEST_TIMEOUT,
            })?
    }
}

/// Ids are UUIDs; anything else is escaped so it cannot change the path.
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn connect<S>(
    addr: &str,
    fut: impl std::future::Future<Output = std::io::Result<S>>,
) -> Result<S, ApiError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ApiError::Connect {
            addr: addr.to_string(),
            source,
        }),
        Err(_) => Err(ApiError::Timeout {
            addr: addr.to_string(),
            after: CONNECT_TIMEOUT,
        }),
    }
}

async fn exchange<S>(
    addr: &str,
    stream: S,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ApiError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proto = |e: hyper::Error| ApiError::Protocol {
        addr: addr.to_string(),
        detail: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(proto)?;
    // The connection task ends when the exchange is over (or fails).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        // Required by HTTP/1.1; the daemon does not look at it.
        .header(hyper::header::HOST, "miggate")
        .header(hyper::header::ACCEPT, "application/json");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("a request with a valid method and path");
    let resp = sender.send_request(req).await.map_err(proto)?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::Protocol {
            addr: addr.to_string(),
            detail: format!("reading the answer: {e}"),
        })?
        .to_bytes();
    Ok((status, body))
}

fn decode<T: DeserializeOwned>(addr: &str, status: StatusCode, body: &[u8]) -> Result<T, ApiError> {
    if !status.is_success() {
        let message = match serde_json::from_slice::<ApiErrorBody>(body) {
            Ok(b) => b.error,
            // Not our daemon's JSON (a proxy, another service): show what came.
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    status
                        .canonical_reason()
                        .unwrap_or("no reason given")
                        .to_string()
                } else {
                    text.chars().take(300).collect()
                }
            }
        };
        return Err(ApiError::Http {
            status: status.as_u16(),
            message,
        });
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Protocol {
        addr: addr.to_string(),
        detail: format!("unexpected answer ({e})"),
    })
}

/// Reads a `unix:`/`https://` address and, for https, the PKI directory.
pub fn api_addr(s: &str, x509_dir: Option<&Path>) -> Result<ApiAddr, ApiError> {
    let addr: ApiAddr = s.parse()?;
    Ok(match (addr, x509_dir) {
        (a @ ApiAddr::Tls { .. }, Some(d)) => a.with_x509_dir(d),
        (ApiAddr::Tls { .. }, None) => {
            return Err(ApiError::Addr {
                given: s.to_string(),
                why: "an https:// daemon needs a PKI directory with a client certificate".into(),
            })
        }
        (a, _) => a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/run/miggate/api.sock".parse::<ApiAddr>().unwrap(),
            ApiAddr::Unix("/run/miggate/api.sock".into())
        );
        assert_eq!(
            "https://mgmt.example.org:9443".parse::<ApiAddr>().unwrap(),
            ApiAddr::Tls {
                addr: "mgmt.example.org:9443".into(),
                server_name: "mgmt.example.org".into(),
                x509_dir: PathBuf::new(),
            }
        );
        let v6 = "https://[::1]:9443/".parse::<ApiAddr>().unwrap();
        assert!(
            matches!(v6, ApiAddr::Tls { ref server_name, ref addr, .. } if server_name == "::1" && addr == "[::1]:9443")
        );
        for bad in [
            "unix:",
            "http://a:1",
            "https://a",
            "https://a:x",
            "https://:1",
        ] {
            assert!(bad.parse::<ApiAddr>().is_err(), "{bad}");
        }
        assert!(api_addr("https://a:1", None).is_err());
        assert!(matches!(
            api_addr("https://a:1", Some(Path::new("/pki"))).unwrap(),
            ApiAddr::Tls { x509_dir, .. } if x509_dir == Path::new("/pki")
        ));
        assert_eq!(path_segment("ab-1/../x"), "ab-1%2F%2E%2E%2Fx");
    }

    #[test]
    fn errors_carry_the_daemons_sentence() {
        let e = decode::<MigrationView>(
            "unix:/x",
            StatusCode::NOT_FOUND,
            br#"{"error":"no migration 1 (it never existed or was forgotten)"}"#,
        )
        .unwrap_err();
        assert_eq!(e.status(), Some(404));
        assert!(
            matches!(e, ApiError::Http { ref message, .. } if message.starts_with("no migration 1"))
        );
        let e = decode::<MigrationView>("unix:/x", StatusCode::BAD_GATEWAY, b"").unwrap_err();
        assert!(e.to_string().contains("Bad Gateway"), "{e}");
    }
}
