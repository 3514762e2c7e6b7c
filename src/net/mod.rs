//! The socket vocabulary, at the bottom of the data path: endpoints
//! (`tcp:`/`unix:`), `HOST:PORT`, the plain stream type, socket tuning,
//! private directories ([`private_dir`]), private unix sockets ([`unix_bind`]) and the one mTLS accept step
//! ([`mtls`]) of every TLS listener.

pub mod mtls;
pub mod private_dir;
pub mod socket;
pub mod unix_bind;

use std::fmt;
use std::path::PathBuf;

pub use socket::{tune, TlsSocket};

/// `HOST:PORT`, with an IPv6 literal in brackets (`[::1]:49152`). `host`
/// holds the address without brackets; `Display` puts them back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// Why a string is not `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not HOST:PORT{hint}")]
pub struct HostPortError {
    input: String,
    hint: &'static str,
}

impl std::str::FromStr for HostPort {
    type Err = HostPortError;
    fn from_str(s: &str) -> Result<Self, HostPortError> {
        let bad = |hint| HostPortError {
            input: s.to_string(),
            hint,
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or(bad(""))?;
            (host, port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or(bad(""))?;
            if host.contains(':') {
                return Err(bad(" (an IPv6 address goes in brackets: [ADDR]:PORT)"));
            }
            (host, port)
        };
        let port = port.parse::<u16>().map_err(|_| bad(""))?;
        // No host name or address holds a bracket; one left inside
        // ("[[h]:1") would print as a HostPort that does not parse back.
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(bad(""));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// A listener bound to every address (`0.0.0.0`, `::`): reached at
    /// some other host name.
    pub fn is_wildcard(&self) -> bool {
        matches!(self.host.as_str(), "0.0.0.0" | "::")
    }
}

/// A plain (local) endpoint: QEMU's `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(HostPort),
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        match addr.parse::<HostPort>() {
            Ok(hp) => Ok(Endpoint::Tcp(hp)),
            Err(_) => Err(format!("{s:?} is not tcp:HOST:PORT or unix:PATH")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected plain stream, TCP or unix.
pub enum Plain {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Endpoint {
    pub async fn connect(&self) -> std::io::Result<Plain> {
        let fut = async {
            match self {
                Endpoint::Tcp(a) => {
                    let s = tokio::net::TcpStream::connect((a.host.as_str(), a.port)).await?;
                    tune(&s);
                    Ok(Plain::Tcp(s))
                }
                Endpoint::Unix(p) => Ok(Plain::Unix(tokio::net::UnixStream::connect(p).await?)),
            }
        };
        match tokio::time::timeout(crate::timeouts::CONNECT, fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer in {} s", crate::timeouts::CONNECT.as_secs()),
            )),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Plain::Tcp($s) => $e,
            Plain::Unix($s) => $e,
        }
    };
}

impl tokio::io::AsyncRead for Plain {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Plain {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_round_trips_and_brackets_v6() {
        let hp: HostPort = "[::1]:49152".parse().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("::1", 49152));
        assert_eq!(hp.to_string(), "[::1]:49152");
        let hp: HostPort = "dst.example.org:1".parse().unwrap();
        assert_eq!(hp.to_string(), "dst.example.org:1");
        assert!("0.0.0.0:5".parse::<HostPort>().unwrap().is_wildcard());
        assert!("[::]:5".parse::<HostPort>().unwrap().is_wildcard());
        for bad in [
            "",
            "host",
            ":80",
            "host:",
            "host:99999",
            "[::1]",
            "::1:80",
            "[]:80",
            // Found by fuzzing (fuzz/regressions/control_body/): the host
            // "[h" printed as "[h:80", which is not HOST:PORT.
            "[[h]:80",
            "[h]]:80",
            "h]:80",
            "[:80",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
        assert!("::1:80"
            .parse::<HostPort>()
            .unwrap_err()
            .to_string()
            .contains("brackets"));
    }
}
