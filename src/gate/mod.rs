//! The listeners: the target side (TLS in, plain out) and the source side
//! (plain in, TLS out), and what they share: bounded reads.

pub mod source;
pub mod target;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::admit::Refusal;

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
