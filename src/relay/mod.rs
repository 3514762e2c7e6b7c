//! The byte pump between the two sockets of one migration channel.
//!
//! Both directions run at once (QEMU's return path and postcopy talk back
//! from target to source). EOF on one side half-closes the other side's
//! write half (a TLS side sends close_notify) and the other direction goes
//! on; an error in either direction cuts both. A channel on which no byte
//! moved in either direction for the stall timeout is cut.
//!
//! How a stream may end is a property of who is behind it ([`Close`]): a
//! miggate gateway always ends its TLS stream with close_notify, so a bare
//! EOF from one is a cut stream (the gateway died, or a FIN was injected on
//! the path), never a completed migration; QEMU's own TLS depends on its
//! version and the channel ([`native`]). How a TLS peer's stream did end
//! is recorded on every channel ([`TlsEnd`]).

pub mod inplace;
pub mod native;
pub mod rekey;

use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// Per-direction buffer. Big enough that one read fills many TLS records.
const BUF: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{direction}: {source}")]
    Io {
        direction: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A TLS peer that must end with close_notify ended without it.
    #[error("{direction}: {source}")]
    Truncated {
        direction: &'static str,
        #[source]
        source: Truncated,
    },
    #[error("peer sent nothing for {} s: channel cut", .0.as_secs())]
    Stalled(Duration),
}

/// A TLS stream that ended with a TCP EOF but no close_notify, from a
/// peer that always sends one ([`EndRule`] says why it must).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {peer}'s TLS stream was cut without close_notify{}", .rule.why())]
pub struct Truncated {
    pub peer: &'static str,
    pub rule: EndRule,
}

/// Byte counters, shared so that an outcome record can read them even when
/// the relay is cut.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes from the first stream (the peer that connected to us) to the second.
    pub forward: AtomicU64,
    /// Bytes back from the second stream to the first.
    pub back: AtomicU64,
    /// TLS key updates this side sent (`--rekey-after-mib`).
    pub key_updates: AtomicU64,
    /// How the TLS peer's stream ended ([`TlsEnd`] as u8; 0: not yet, or
    /// no TLS peer).
    pub tls_end: AtomicU8,
}

impl Counters {
    pub fn forward(&self) -> u64 {
        self.forward.load(Ordering::Relaxed)
    }
    pub fn back(&self) -> u64 {
        self.back.load(Ordering::Relaxed)
    }
    pub fn key_updates(&self) -> u64 {
        self.key_updates.load(Ordering::Relaxed)
    }
    pub fn tls_end(&self) -> Option<TlsEnd> {
        TlsEnd::from_u8(self.tls_end.load(Ordering::Relaxed))
    }
}

/// How a TLS peer's stream ended, as read: the outcome record's `tls_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEnd {
    /// close_notify, then EOF: the peer ended its stream on purpose.
    CloseNotify,
    /// A TCP EOF without close_notify: the peer closed its socket (QEMU's
    /// main channel, QEMU before 10.0), or someone cut the stream.
    Eof,
    /// A TCP reset.
    Reset,
}

impl TlsEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsEnd::CloseNotify => "close_notify",
            TlsEnd::Eof => "eof",
            TlsEnd::Reset => "reset",
        }
    }
    fn from_u8(v: u8) -> Option<TlsEnd> {
        match v {
            1 => Some(TlsEnd::CloseNotify),
            2 => Some(TlsEnd::Eof),
            3 => Some(TlsEnd::Reset),
            _ => None,
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            TlsEnd::CloseNotify => 1,
            TlsEnd::Eof => 2,
            TlsEnd::Reset => 3,
        }
    }
}

/// How the end of one side's stream is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// A plain socket (the local QEMU): its EOF is its end.
    AnyEof,
    /// A TLS peer, `peer` naming it in reasons: how its stream ended is
    /// recorded, and `rule` says whether an EOF without close_notify
    /// fails the channel.
    Tls { peer: &'static str, rule: EndRule },
}

/// Whether a TLS peer must end its stream with close_notify, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndRule {
    /// Any EOF is an ending: QEMU's native TLS where it is not known to
    /// send close_notify (every main channel; multifd channels of a source
    /// not known to be 10.0 or later: see [`native`]). QEMU's own stream
    /// framing detects truncation there, and the target QEMU's verdict
    /// settles a managed migration.
    AnyEof,
    /// A miggate gateway (ALPN `miggate/1`) always ends with close_notify.
    Miggate,
    /// A multifd channel of a QEMU source whose main channel carried a
    /// machine type of this version (10.0 or later): such a QEMU ends every
    /// multifd channel with close_notify ([`native`]).
    QemuMultifd { machine_version: (u16, u16) },
}

impl EndRule {
    /// Why close_notify was required, for the reason ("" for a gateway:
    /// the reason operators and tests know).
    fn why(self) -> String {
        match self {
            EndRule::AnyEof | EndRule::Miggate => String::new(),
            EndRule::QemuMultifd {
                machine_version: (major, minor),
            } => format!(
                " (its machine type is version {major}.{minor}, and QEMU 10.0 or later ends every multifd channel with close_notify)"
            ),
        }
    }
}

impl Close {
    /// The rule for a TLS peer: strict when it negotiated `miggate/1`;
    /// for QEMU's native TLS, any EOF (a target gateway makes a native
    /// source's multifd channels strict when it knows better:
    /// [`native::NativeMains::multifd_close`]).
    pub fn tls_peer(miggate_peer: bool, peer: &'static str) -> Close {
        let rule = if miggate_peer {
            EndRule::Miggate
        } else {
            EndRule::AnyEof
        };
        Close::Tls { peer, rule }
    }
}

/// Milliseconds since the relay started at which a byte last moved.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// What `read_available` saw after the bytes it returned: the next call
/// reports it, so that bytes read before an error or EOF are never lost
/// and a reset is never mistaken for an EOF.
#[derive(Default)]
struct Deferred(Option<std::io::Result<()>>);

/// Reads like `read` (waits for the first byte), then keeps reading what is
/// already available without waiting, up to `buf.len()`. A TLS stream
/// yields one 16 KiB record per read; gathering them makes one large write
/// (one syscall) on the other side instead of one per record.
async fn read_available<R>(
    r: &mut R,
    buf: &mut [u8],
    deferred: &mut Deferred,
) -> std::io::Result<usize>
where
    R: AsyncRead + Unpin,
{
    if let Some(end) = deferred.0.take() {
        return end.map(|()| 0);
    }
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        loop {
            let before = rb.filled().len();
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().len() == before => {
                    // EOF: report the bytes now, the EOF next time.
                    if before > 0 {
                        deferred.0 = Some(Ok(()));
                    }
                    return Poll::Ready(Ok(before));
                }
                Poll::Ready(Ok(())) if rb.remaining() == 0 => {
                    return Poll::Ready(Ok(rb.filled().len()))
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) if before > 0 => {
                    deferred.0 = Some(Err(e));
                    return Poll::Ready(Ok(before));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if before > 0 => return Poll::Ready(Ok(before)),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Which step of a pump failed: reading its source, writing its sink,
/// closing the sink (the last flush and the FIN / close_notify) after the
/// source ended, or the source's TLS stream ended without a close_notify
/// its [`Close`] requires.
#[derive(Debug)]
enum PumpError {
    Read(std::io::Error),
    Write(std::io::Error),
    Close(std::io::Error),
    Truncated(Truncated),
}

impl PumpError {
    fn into_relay(self, direction: &'static str) -> RelayError {
        match self {
            PumpError::Read(source) | PumpError::Write(source) | PumpError::Close(source) => {
                RelayError::Io { direction, source }
            }
            PumpError::Truncated(source) => RelayError::Truncated { direction, source },
        }
    }
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    close: Close,
    counters: &Counters,
    count: &AtomicU64,
    act: &Activity,
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut deferred = Deferred::default();
    // Only a TLS reader's end says something (a plain socket's EOF is its
    // only end): recorded as soon as it is read.
    let tls_ended = |end: TlsEnd| {
        if let Close::Tls { .. } = close {
            counters.tls_end.store(end.to_u8(), Ordering::Relaxed);
        }
    };
    // A TLS writer may keep what it was given (tokio-rustls returns from a
    // write once rustls holds the records, even if the socket is full) until
    // the next write or flush. When the reader has nothing more for now,
    // flush: QEMU waits for an answer to the bytes it just sent, and
    // records left behind would stall the migration until it is cut.
    let mut unflushed = false;
    loop {
        let read = tokio::select! {
            biased;
            r = read_available(&mut r, &mut buf, &mut deferred) => r,
            r = w.flush(), if unflushed => {
                r.map_err(PumpError::Write)?;
                unflushed = false;
                continue;
            }
        };
        let n = match read {
            // rustls reads close_notify as EOF (Ok(0)) ...
            Ok(0) => {
                tls_ended(TlsEnd::CloseNotify);
                break;
            }
            Ok(n) => n,
            // ... and a TCP EOF without it as UnexpectedEof: see [`Close`].
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tls_ended(TlsEnd::Eof);
                match close {
                    Close::Tls {
                        peer,
                        rule: rule @ (EndRule::Miggate | EndRule::QemuMultifd { .. }),
                    } => return Err(PumpError::Truncated(Truncated { peer, rule })),
                    _ => break,
                }
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    tls_ended(TlsEnd::Reset);
                }
                return Err(PumpError::Read(e));
            }
        };
        act.touch();
        w.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        unflushed = true;
        count.fetch_add(n as u64, Ordering::Relaxed);
        act.touch();
    }
    w.flush().await.map_err(PumpError::Close)?;
    w.shutdown().await.map_err(PumpError::Close)
}

/// A reset from a peer once everything towards it was delivered and closed
/// is how QEMU says goodbye (it closes its socket with our close_notify, the
/// return path's last bytes, or a multifd channel's last bytes, unread): an
/// ending. Before that it is a failure.
fn ending(r: std::io::Result<()>, other_done: bool) -> std::io::Result<()> {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    match r {
        Err(e) if other_done && matches!(e.kind(), ConnectionReset | BrokenPipe) => Ok(()),
        r => r,
    }
}

/// Relays between `a` (the side that connected to us) and `b` until both
/// directions ended, one failed, or nothing moved for `stall`.
/// `names` label the directions a->b and b->a in errors; `closes` say how
/// `a`'s and `b`'s streams may end.
pub async fn relay<A, B>(
    a: A,
    b: B,
    names: (&'static str, &'static str),
    closes: (Close, Close),
    stall: Duration,
    counters: Arc<Counters>,
) -> Result<(), RelayError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let act = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let mut fwd = pin!(pump(ar, bw, closes.0, &counters, &counters.forward, &act));
    let mut back = pin!(pump(br, aw, closes.1, &counters, &counters.back, &act));
    let (mut fwd_done, mut back_done) = (false, false);
    while !(fwd_done && back_done) {
        let deadline = act.last() + stall;
        tokio::select! {
            r = &mut fwd, if !fwd_done => {
                fwd_done = true;
                match r {
                    // `a` reset once our side towards it had ended: see `ending`.
                    Err(PumpError::Read(e)) => ending(Err(e), back_done)
                        .map_err(|source| RelayError::Io { direction: names.0, source })?,
                    // `a` ended and `b` had already closed when our end of
                    // the stream reached it (a target QEMU shuts a multifd
                    // channel down as soon as it has loaded the VM): `b`'s
                    // goodbye. Its own direction, still judged, says whether
                    // it ended well.
                    Err(PumpError::Close(e)) => ending(Err(e), true)
                        .map_err(|source| RelayError::Io { direction: names.0, source })?,
                    // Data towards `b` that `b` refused (it had closed and
                    // resets what we still send), or `a` cut: a failure,
                    // never a goodbye.
                    r => r.map_err(|e| e.into_relay(names.0))?,
                }
            }
            r = &mut back, if !back_done => {
                back_done = true;
                match r {
                    Err(PumpError::Read(e) | PumpError::Write(e) | PumpError::Close(e)) => {
                        ending(Err(e), fwd_done)
                            .map_err(|source| RelayError::Io { direction: names.1, source })?
                    }
                    r => r.map_err(|e| e.into_relay(names.1))?,
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                if act.last() + stall <= Instant::now() {
                    return Err(RelayError::Stalled(stall));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    /// A reader that yields its chunks one per poll, then an error (or EOF).
    struct Script(Vec<Vec<u8>>, Option<std::io::ErrorKind>);

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if !self.0.is_empty() {
                let mut c = self.0.remove(0);
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    self.0.insert(0, c.split_off(n));
                }
                return Poll::Ready(Ok(()));
            }
            match self.1.take() {
                Some(kind) => Poll::Ready(Err(kind.into())),
                None => Poll::Ready(Ok(())),
            }
        }
    }

    #[tokio::test]
    async fn gathers_chunks_then_reports_the_error() {
        let mut r = Script(
            vec![vec![1; 10], vec![2; 20]],
            Some(std::io::ErrorKind::ConnectionReset),
        );
        let mut buf = [0u8; 100];
        let mut d = Deferred::default();
        assert_eq!(read_available(&mut r, &mut buf, &mut d).await.unwrap(), 30);
        let err = read_available(&mut r, &mut buf, &mut d).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn gathers_up_to_the_buffer_then_eof() {
        let mut r = Script(vec![vec![1; 10], vec![2; 20], vec![3; 5]], None);
        let mut buf = [0u8; 25];
        let mut d = Deferred::default();
        assert_eq!(read_available(&mut r, &mut buf, &mut d).await.unwrap(), 25);
        assert_eq!(read_available(&mut r, &mut buf, &mut d).await.unwrap(), 10);
        assert_eq!(read_available(&mut r, &mut buf, &mut d).await.unwrap(), 0);
    }

    /// rustls reports a TCP EOF without close_notify as UnexpectedEof: an
    /// ending for QEMU's native TLS where it may end so, a cut stream for a
    /// miggate gateway or a QEMU 10 multifd channel; recorded either way.
    #[tokio::test]
    async fn eof_without_close_notify_fails_only_a_strict_peer() {
        let act = Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        };
        let counters = Counters::default();
        let count = &counters.forward;
        let cut = || Script(vec![vec![7; 100]], Some(std::io::ErrorKind::UnexpectedEof));
        let native = Close::tls_peer(false, "source");
        pump(cut(), tokio::io::sink(), native, &counters, count, &act)
            .await
            .unwrap();
        assert_eq!(counters.tls_end(), Some(TlsEnd::Eof));
        let strict = Close::tls_peer(true, "source");
        let err = pump(cut(), tokio::io::sink(), strict, &counters, count, &act)
            .await
            .unwrap_err()
            .into_relay("source->target");
        assert_eq!(
            err.to_string(),
            "source->target: the source's TLS stream was cut without close_notify"
        );
        let qemu10 = Close::Tls {
            peer: "source QEMU",
            rule: EndRule::QemuMultifd {
                machine_version: (10, 0),
            },
        };
        let err = pump(cut(), tokio::io::sink(), qemu10, &counters, count, &act)
            .await
            .unwrap_err();
        assert!(matches!(err, PumpError::Truncated(_)), "{err:?}");
        assert!(
            err.into_relay("d").to_string().starts_with(
                "d: the source QEMU's TLS stream was cut without close_notify (its machine type is version 10.0"
            )
        );
        // The bytes before the cut were delivered and counted every time.
        assert_eq!(counters.forward(), 300);
        // A clean EOF (close_notify received) is an ending either way.
        let clean = Script(vec![vec![7; 10]], None);
        pump(clean, tokio::io::sink(), strict, &counters, count, &act)
            .await
            .unwrap();
        assert_eq!(counters.tls_end(), Some(TlsEnd::CloseNotify));
        // A plain socket's EOF records nothing.
        let plain = Counters::default();
        let eof = Script(vec![vec![7; 10]], None);
        pump(
            eof,
            tokio::io::sink(),
            Close::AnyEof,
            &plain,
            &plain.forward,
            &act,
        )
        .await
        .unwrap();
        assert_eq!(plain.tls_end(), None);
    }

    /// A QEMU at the end of a migration, as the relay meets it: its reads
    /// end (EOF, or a reset once we have shut our side towards it), and it
    /// may refuse our data or our FIN / close_notify.
    struct EndingPeer {
        /// Reads: `false` EOF at once; `true` a reset once `shut`.
        resets: bool,
        shut: bool,
        refuse_data: bool,
        refuse_close: bool,
        waker: Option<std::task::Waker>,
    }

    impl EndingPeer {
        fn new() -> Self {
            EndingPeer {
                resets: false,
                shut: false,
                refuse_data: false,
                refuse_close: false,
                waker: None,
            }
        }
    }

    impl AsyncRead for EndingPeer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match (self.resets, self.shut) {
                (false, _) => Poll::Ready(Ok(())),
                (true, true) => Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into())),
                (true, false) => {
                    self.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    impl AsyncWrite for EndingPeer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.refuse_data {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.refuse_close {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            self.shut = true;
            if let Some(w) = self.waker.take() {
                w.wake();
            }
            Poll::Ready(Ok(()))
        }
    }

    const LENIENT: (Close, Close) = (Close::AnyEof, Close::AnyEof);

    /// QEMU's native TLS source closes its main channel with our last
    /// records (the return path's, our close_notify) unread: its reset
    /// after the target side ended is a goodbye; a reset before is not.
    #[tokio::test]
    async fn a_reset_from_the_source_after_the_target_ended_is_an_ending() {
        let (b, server) = duplex(64);
        drop(server); // the target QEMU has finished and closed
        let a = EndingPeer {
            resets: true,
            ..EndingPeer::new()
        };
        relay(
            a,
            b,
            ("a->b", "b->a"),
            LENIENT,
            Duration::from_secs(5),
            Arc::default(),
        )
        .await
        .unwrap();

        let (b, _server) = duplex(64); // the target is still there
        let a = EndingPeer {
            resets: true,
            shut: true,
            ..EndingPeer::new()
        };
        let err = relay(
            a,
            b,
            ("a->b", "b->a"),
            LENIENT,
            Duration::from_secs(5),
            Arc::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().starts_with("a->b: "), "{err}");
    }

    /// Our close refused by a target that already closed is its goodbye;
    /// data it refuses is still a failure.
    #[tokio::test]
    async fn a_target_gone_at_our_close_is_an_ending_but_not_when_data_is_refused() {
        for (refuse_data, ok) in [(false, true), (true, false)] {
            let (client, a) = duplex(1024);
            let (_cr, mut cw) = tokio::io::split(client);
            cw.write_all(b"last bytes").await.unwrap();
            cw.shutdown().await.unwrap();
            let b = EndingPeer {
                refuse_data,
                refuse_close: true,
                ..EndingPeer::new()
            };
            let r = relay(
                a,
                b,
                ("a->b", "b->a"),
                LENIENT,
                Duration::from_secs(5),
                Arc::default(),
            )
            .await;
            assert_eq!(r.is_ok(), ok, "refuse_data={refuse_data}: {r:?}");
        }
    }

    #[tokio::test]
    async fn relays_both_ways_and_half_closes() {
        let (client, a) = duplex(1024);
        let (b, server) = duplex(1024);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(relay(
            a,
            b,
            ("a->b", "b->a"),
            (Close::AnyEof, Close::AnyEof),
            Duration::from_secs(5),
            counters.clone(),
        ));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let send = payload.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&send).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, payload);
        // The forward direction is closed; the back direction still works.
        sw.write_all(b"reply").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        task.await.unwrap().unwrap();
        assert_eq!(counters.forward(), 100_000);
        assert_eq!(counters.back(), 5);
    }

    /// A writer that keeps what it is given until flushed, as tokio-rustls
    /// does when the socket below it is full.
    struct HoldsUntilFlush<W> {
        inner: W,
        held: Vec<u8>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for HoldsUntilFlush<W> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = &mut *self;
            while !this.held.is_empty() {
                let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
                this.held.drain(..n);
            }
            Pin::new(&mut this.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            std::task::ready!(self.as_mut().poll_flush(cx))?;
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl<W: AsyncRead + Unpin> AsyncRead for HoldsUntilFlush<W> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    /// The last bytes before the sender pauses to wait for an answer reach
    /// the other side even though nothing closes and nothing more is read.
    #[tokio::test]
    async fn bytes_held_by_a_writer_go_out_when_the_reader_pauses() {
        let (client, a) = duplex(1024);
        let (b, server) = duplex(1024);
        let b = HoldsUntilFlush {
            inner: b,
            held: Vec::new(),
        };
        let _relay = tokio::spawn(relay(
            a,
            b,
            ("a->b", "b->a"),
            (Close::AnyEof, Close::AnyEof),
            Duration::from_secs(60),
            Arc::default(),
        ));
        let (_cr, mut cw) = tokio::io::split(client);
        let (mut sr, _sw) = tokio::io::split(server);
        cw.write_all(b"are you there?").await.unwrap();
        let mut got = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(10), sr.read_exact(&mut got))
            .await
            .expect("the relay kept the bytes in its writer")
            .unwrap();
        assert_eq!(&got, b"are you there?");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_channel_is_cut() {
        let (_client, a) = duplex(64);
        let (b, _server) = duplex(64);
        let err = relay(
            a,
            b,
            ("a->b", "b->a"),
            (Close::AnyEof, Close::AnyEof),
            Duration::from_secs(3),
            Arc::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RelayError::Stalled(_)), "{err}");
    }
}
