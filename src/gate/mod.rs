//! The listeners: the target side (TLS in, plain out) and the source side
//! (plain in, TLS out), and what they share: bounded reads and the count
//! of live main channels.

pub mod joinable;
pub mod revoke;
pub mod native_join;
pub mod source;
pub mod target;

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admit::{Refusal, StreamError};

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
    loop {
        if let Some(v) = decide(buf) {
            return Ok(v);
        }
        if buf.len() >= max {
            return Err(StreamError::Unrecognised(buf.len()).into());
        }
        read_more(r, buf, 0, max, deadline, stall).await?;
    }
}

/// One read into `buf`, which holds at most `max` bytes afterwards, by
/// `deadline`. `buf[from..]` is the part whose silence counts: a peer that
/// sent `from` bytes (its hello) and nothing more is silent, not stalled.
pub async fn read_more<R>(
    r: &mut R,
    buf: &mut Vec<u8>,
    from: usize,
    max: usize,
    deadline: Instant,
    stall: Duration,
) -> Result<(), Refusal>
where
    R: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    let want = max.saturating_sub(buf.len()).min(chunk.len());
    let got = buf.len() - from;
    let n = match tokio::time::timeout_at(deadline, r.read(&mut chunk[..want])).await {
        Err(_) if got == 0 => return Err(Refusal::Silent(stall.as_secs())),
        Err(_) => {
            return Err(Refusal::Stalled {
                secs: stall.as_secs(),
                bytes: got,
            })
        }
        Ok(Ok(0)) => return Err(Refusal::ClosedEarly(got)),
        Ok(Ok(n)) => n,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Refusal::ClosedEarly(got))
        }
        Ok(Err(e)) => return Err(StreamError::Read(e.into()).into()),
    };
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Counts a main channel while it lives. The source gateway counts those
/// whose TLS handshake with the target completed (multifd channels wait for
/// one: see `source`); the target gateway counts those it forwarded.
pub(crate) struct MainGuard(watch::Sender<usize>);

impl MainGuard {
    pub(crate) fn new(tx: &watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        MainGuard(tx.clone())
    }
}

impl Drop for MainGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// How a channel joined to a main channel ended, if not by itself.
#[derive(Debug)]
pub(crate) enum JoinedEnd {
    Relay(crate::relay::RelayError),
    /// Still open `grace` after its main channel ended.
    MainEnded(Duration),
}

/// Runs `relay`; for a joined channel (`main_ended` given), its lifetime
/// is its main channel's: once that has ended, it may finish within
/// `grace` (QEMU closes both at once), then it is cut.
pub(crate) async fn bounded_by_main<F, M>(
    relay: F,
    main_ended: Option<M>,
    grace: Duration,
) -> Result<(), JoinedEnd>
where
    F: Future<Output = Result<(), crate::relay::RelayError>>,
    M: Future<Output = ()>,
{
    let Some(main_ended) = main_ended else {
        return relay.await.map_err(JoinedEnd::Relay);
    };
    tokio::pin!(relay);
    tokio::select! {
        r = &mut relay => return r.map_err(JoinedEnd::Relay),
        () = main_ended => {}
    }
    match tokio::time::timeout(grace, relay).await {
        Ok(r) => r.map_err(JoinedEnd::Relay),
        Err(_) => Err(JoinedEnd::MainEnded(grace)),
    }
}
