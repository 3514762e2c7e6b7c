//! The local hops of a layered transport: where the source QEMU (or the
//! generator) meets the source side, and where the target side meets the
//! target QEMU (or the sink). TCP on 127.0.0.1, or unix sockets, the way
//! the README deploys miggate (`--listen unix:...`, `--forward unix:...`).
//! The hop between the two sides is always TCP: it crosses the network.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use clap::ValueEnum;

use super::sys;

/// How often `wait_listening` looks at /proc/net/unix.
const LISTEN_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LocalKind {
    Tcp,
    Unix,
}

impl LocalKind {
    /// A fresh address of this kind; unix sockets live in `dir`.
    pub fn fresh(self, dir: &Path, name: &str) -> Result<Local> {
        Ok(match self {
            LocalKind::Tcp => Local::Tcp(sys::free_port()?),
            LocalKind::Unix => Local::Unix(dir.join(format!("{name}.sock"))),
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            LocalKind::Tcp => "TCP on 127.0.0.1",
            LocalKind::Unix => "unix sockets",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    Tcp(u16),
    Unix(PathBuf),
}

impl Local {
    /// As QEMU's `migrate`/`migrate-incoming` and miggate's endpoints spell it.
    pub fn uri(&self) -> String {
        match self {
            Local::Tcp(p) => format!("tcp:127.0.0.1:{p}"),
            Local::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// As stunnel's `accept` and `connect` spell it.
    pub fn stunnel(&self) -> String {
        match self {
            Local::Tcp(p) => format!("127.0.0.1:{p}"),
            Local::Unix(path) => path.display().to_string(),
        }
    }

    /// socat's listening address for it.
    pub fn socat_listen(&self) -> String {
        match self {
            Local::Tcp(p) => format!("TCP-LISTEN:{p},bind=127.0.0.1,reuseaddr,nodelay"),
            Local::Unix(path) => format!("UNIX-LISTEN:{},unlink-early", path.display()),
        }
    }

    /// socat's connecting address for it.
    pub fn socat_connect(&self) -> String {
        match self {
            Local::Tcp(p) => format!("TCP:127.0.0.1:{p},nodelay"),
            Local::Unix(path) => format!("UNIX-CONNECT:{}", path.display()),
        }
    }

    /// Waits until something listens here. Looks at /proc instead of
    /// connecting: a probe connection would be the one connection a
    /// non-forking socat serves.
    pub async fn wait_listening(&self, timeout: Duration, what: &str) -> Result<()> {
        match self {
            Local::Tcp(p) => sys::wait_listening(*p, timeout, what).await,
            Local::Unix(path) => {
                let deadline = tokio::time::Instant::now() + timeout;
                while !unix_listening(path) {
                    if tokio::time::Instant::now() > deadline {
                        bail!(
                            "{what} is not listening on {} after {timeout:?}",
                            path.display()
                        );
                    }
                    tokio::time::sleep(LISTEN_POLL).await;
                }
                Ok(())
            }
        }
    }

    /// A blocking connection (the relay-only generator).
    pub fn connect_blocking(&self) -> std::io::Result<Box<dyn BlockingStream>> {
        Ok(match self {
            Local::Tcp(p) => {
                let s = std::net::TcpStream::connect(("127.0.0.1", *p))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Local::Unix(path) => Box::new(std::os::unix::net::UnixStream::connect(path)?),
        })
    }

    /// An async connection (held channels of the memory measurement).
    pub async fn connect(&self) -> std::io::Result<miggate::net::Plain> {
        Ok(match self {
            Local::Tcp(p) => {
                miggate::net::Plain::Tcp(tokio::net::TcpStream::connect(("127.0.0.1", *p)).await?)
            }
            Local::Unix(path) => {
                miggate::net::Plain::Unix(tokio::net::UnixStream::connect(path).await?)
            }
        })
    }
}

/// A blocking byte stream that can be half-closed.
pub trait BlockingStream: std::io::Read + std::io::Write + Send {
    fn shutdown_write(&self) -> std::io::Result<()>;
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl BlockingStream for std::net::TcpStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
}

impl BlockingStream for std::os::unix::net::UnixStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
}

/// Whether a unix socket at `path` is listening, per /proc/net/unix
/// (flag __SO_ACCEPTCON, 0x10000).
fn unix_listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x10000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.display().to_string();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sees_a_unix_listener() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalKind::Unix.fresh(dir.path(), "x").unwrap();
        let Local::Unix(path) = &local else { panic!() };
        assert!(!unix_listening(path));
        let _l = std::os::unix::net::UnixListener::bind(path).unwrap();
        local
            .wait_listening(Duration::from_secs(1), "test")
            .await
            .unwrap();
    }
}
