//! The listeners: the target side (TLS in, plain out) and the source side
//! (plain in, TLS out), and what they share: endpoints and bounded reads.

pub mod source;
pub mod target;
pub mod unix_bind;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::admit::Refusal;

/// A plain (local) endpoint: QEMU's `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
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
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(addr.to_string()))
            }
            _ => Err(format!("{s:?} is not tcp:HOST:PORT or unix:PATH")),
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
                    let s = tokio::net::TcpStream::connect(a).await?;
                    crate::timeouts::tune(&s);
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

/// Reads into `buf` until `decide` returns a value, the peer closes, the
/// deadline passes or `max` bytes are buffered. `decide` sees the whole
/// buffer each time and must return `None` while it needs more bytes.
pub async fn read_until<R, T>(
    r: &mut R,
    buf: &mut Vec<u8>,
    deadline: Instant,
    stall: Duration,
    max: usize,
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, Refusal>
where
    R: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(v) = decide(buf) {
            return Ok(v);
        }
        if buf.len() >= max {
            return Err(Refusal::Stream(format!(
                "peer's first {} bytes are not a recognisable stream",
                buf.len()
            )));
        }
        let want = (max - buf.len()).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, r.read(&mut chunk[..want])).await {
            Err(_) if buf.is_empty() => return Err(Refusal::Silent(stall.as_secs())),
            Err(_) => {
                return Err(Refusal::Stalled {
                    secs: stall.as_secs(),
                    bytes: buf.len(),
                })
            }
            Ok(Ok(0)) => return Err(Refusal::ClosedEarly(buf.len())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Refusal::ClosedEarly(buf.len()))
            }
            Ok(Err(e)) => return Err(Refusal::Stream(format!("read error: {e}"))),
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `decide` for [`read_until`]: the QEMU stream sniffer.
pub fn sniff_decider(
    skip: usize,
) -> impl FnMut(&[u8]) -> Option<Result<crate::wire::qemu::StreamKind, Refusal>> {
    move |buf| match crate::wire::qemu::sniff(&buf[skip.min(buf.len())..]) {
        Err(crate::wire::qemu::SniffError::Incomplete) => None,
        Ok(kind) => Some(Ok(kind)),
        Err(e) => Some(Err(Refusal::Stream(e.to_string()))),
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
