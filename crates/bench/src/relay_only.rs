//! Relay-only mode: no QEMU, a generator streams bytes through a security
//! layer (source side -> target side) into a sink, all on loopback. The
//! generator and the sink are threads of this process with blocking
//! sockets; only the layer's processes are charged CPU time.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::local::{Local, LocalKind};
use super::{sys, QEMU_PREFIX};

/// Size of the generator's and the sink's buffers.
const IO_BUF: usize = 1 << 20;
/// The generator's pattern: random bytes (nothing compresses), repeated.
const PATTERN: usize = 8 << 20;
/// A relay run must end within this.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub struct RelaySample {
    pub seconds: f64,
    pub bytes: u64,
    pub layer_cpu: f64,
}

/// A sink (TCP on 127.0.0.1, or a unix socket in `dir`) that accepts one
/// connection and reads it to EOF.
pub struct Sink {
    pub addr: Local,
    done: std::sync::mpsc::Receiver<std::io::Result<(u64, Instant)>>,
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept()?.0),
            Listener::Unix(l) => Box::new(l.accept()?.0),
        })
    }
}

impl Sink {
    pub fn start(kind: LocalKind, dir: &std::path::Path) -> Result<Sink> {
        let (l, addr) = match kind {
            LocalKind::Tcp => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
                let port = l.local_addr()?.port();
                (Listener::Tcp(l), Local::Tcp(port))
            }
            LocalKind::Unix => {
                let path = dir.join("sink.sock");
                let l = std::os::unix::net::UnixListener::bind(&path)
                    .with_context(|| format!("binding the sink at {}", path.display()))?;
                (Listener::Unix(l), Local::Unix(path))
            }
        };
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let mut s = l.accept()?;
                let mut buf = vec![0u8; IO_BUF];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf)? {
                        0 => return Ok((total, Instant::now())),
                        n => total += n as u64,
                    }
                }
            })();
            let _ = tx.send(r);
        });
        Ok(Sink { addr, done })
    }

    fn wait(self) -> Result<(u64, Instant)> {
        match self.done.recv_timeout(RUN_TIMEOUT) {
            Ok(r) => r.context("sink"),
            Err(_) => bail!("the sink got no EOF within {RUN_TIMEOUT:?}"),
        }
    }
}

fn pattern() -> Vec<u8> {
    miggate_lab::guest::random_ram(0x5EED_0BE4, PATTERN)
}

/// Streams a QEMU main-channel prefix and then `bytes` random bytes into
/// `entry`, whose far end is `sink`; returns the payload's time.
/// `layer_pids` are charged the CPU time.
pub async fn run_once(
    entry: Local,
    sink: Sink,
    bytes: u64,
    layer_pids: &[u32],
) -> Result<RelaySample> {
    let pids = layer_pids.to_vec();
    tokio::task::spawn_blocking(move || {
        let data = pattern();
        let cpu0 = sys::cpu_total(&pids);
        let t0 = Instant::now();
        let mut s = entry
            .connect_blocking()
            .context("connecting the generator")?;
        s.write_all(QEMU_PREFIX).context("generator")?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(IO_BUF as u64) as usize;
            let off = ((bytes - left) % (PATTERN - IO_BUF) as u64) as usize;
            s.write_all(&data[off..off + n]).context("generator")?;
            left -= n as u64;
        }
        s.shutdown_write().context("generator")?;
        let (got, t1) = sink.wait()?;
        // The layer closes its end once the sink has closed its own.
        let _ = s.set_read_timeout(Some(RUN_TIMEOUT));
        let _ = std::io::copy(&mut s, &mut std::io::sink());
        let cpu1 = sys::cpu_total(&pids);
        let want = bytes + QEMU_PREFIX.len() as u64;
        if got != want {
            bail!("the sink received {got} bytes, not {want}");
        }
        Ok(RelaySample {
            seconds: (t1 - t0).as_secs_f64(),
            bytes,
            layer_cpu: cpu1 - cpu0,
        })
    })
    .await
    .context("generator thread")?
}
