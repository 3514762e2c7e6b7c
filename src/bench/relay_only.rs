//! Relay-only mode: no QEMU, a generator streams bytes through a security
//! layer (source side -> target side) into a sink, all on loopback. The
//! generator and the sink are threads of this process with blocking
//! sockets; only the layer's processes are charged CPU time.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

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

/// A sink on 127.0.0.1 that accepts one connection and reads it to EOF.
pub struct Sink {
    pub port: u16,
    done: std::sync::mpsc::Receiver<std::io::Result<(u64, Instant)>>,
}

impl Sink {
    pub fn start() -> Result<Sink> {
        let l = TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
        let port = l.local_addr()?.port();
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let (mut s, _) = l.accept()?;
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
        Ok(Sink { port, done })
    }

    fn wait(self) -> Result<(u64, Instant)> {
        match self.done.recv_timeout(RUN_TIMEOUT) {
            Ok(r) => r.context("sink"),
            Err(_) => bail!("the sink got no EOF within {RUN_TIMEOUT:?}"),
        }
    }
}

fn pattern() -> Vec<u8> {
    crate::lab::guest::random_ram(0x5EED_0BE4, PATTERN)
}

/// Streams a QEMU main-channel prefix and then `bytes` random bytes into
/// 127.0.0.1:`entry`, whose far end is `sink`; returns the payload's time.
/// `layer_pids` are charged the CPU time.
pub async fn run_once(
    entry: u16,
    sink: Sink,
    bytes: u64,
    layer_pids: &[u32],
) -> Result<RelaySample> {
    let pids = layer_pids.to_vec();
    tokio::task::spawn_blocking(move || {
        let data = pattern();
        let cpu0 = sys::cpu_total(&pids);
        let t0 = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", entry)).context("connecting the generator")?;
        let _ = s.set_nodelay(true);
        s.write_all(QEMU_PREFIX).context("generator")?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(IO_BUF as u64) as usize;
            let off = ((bytes - left) % (PATTERN - IO_BUF) as u64) as usize;
            s.write_all(&data[off..off + n]).context("generator")?;
            left -= n as u64;
        }
        s.shutdown(Shutdown::Write).context("generator")?;
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
