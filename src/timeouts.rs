//! Named timeouts and socket options, in one place.

use std::time::Duration;

/// Default for `--stall-timeout`: how long a peer may send nothing (during
/// the hello, the first bytes of the stream, or the relay as a whole; and
/// the source gateway's TLS handshake, while the target's has
/// [`DEFAULT_HANDSHAKE`]) before both sides are cut. A healthy QEMU migration
/// writes to its main channel at least every iteration (tens of ms), so
/// 30 s of silence means a wedged or hostile peer, not a slow one.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);

/// Longest `--stall-timeout` / `stall_timeout`: an hour. Beyond that a
/// peer is not slow but gone, and every deadline is `Instant + stall`,
/// which panics when the sum leaves the clock's range.
pub const MAX_STALL_SECS: u64 = 3600;

/// Longest `retention` of ended migrations in the daemon's API: 30 days.
pub const MAX_RETENTION_SECS: u64 = 30 * 86_400;

/// Largest `--rekey-after-mib`: 1 TiB. Also keeps `MIB << 20` in a u64.
pub const MAX_REKEY_AFTER_MIB: u64 = 1 << 20;

/// Longest certificate or CRL validity (`--days`): 100 years; a date past
/// year 9999 cannot be encoded in a certificate.
pub const MAX_DAYS: u32 = 36_500;

/// A configured value outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be from {min} to {max} {unit}, not {value}")]
pub struct OutOfRange {
    pub field: String,
    pub value: u64,
    pub min: u64,
    pub max: u64,
    pub unit: &'static str,
}

/// `value` seconds as a Duration, if within `min..=max`.
pub fn bounded_secs(field: &str, value: u64, min: u64, max: u64) -> Result<Duration, OutOfRange> {
    if (min..=max).contains(&value) {
        Ok(Duration::from_secs(value))
    } else {
        Err(OutOfRange {
            field: field.to_string(),
            value,
            min,
            max,
            unit: "seconds",
        })
    }
}

/// Connecting to the next hop (the target gateway, or the target QEMU).
/// Loopback or a LAN: ten seconds is already generous.
pub const CONNECT: Duration = Duration::from_secs(10);

/// Flushing a refusal verdict to a peer that may not be reading.
pub const VERDICT_WRITE: Duration = Duration::from_secs(5);

/// Applies the socket options every migration connection gets: no Nagle
/// (QEMU's return path sends small, latency-sensitive messages).
pub fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Receive buffer of the source gateway's local (QEMU-facing) TCP socket
/// until the target's verdict arrives. QEMU without the return-path
/// capability calls a migration "completed" once it has written the whole
/// stream into its socket; if the kernel let it push megabytes into our
/// buffers while the target is still deciding, a refusal would come too
/// late to make the source's migration fail. A small window keeps QEMU
/// blocked on us until the verdict. (The kernel doubles the value.)
///
/// TCP only. On a unix stream socket the receiver's SO_RCVBUF does
/// nothing: queued bytes are charged to the *sender's* SO_SNDBUF. Measured
/// on Linux 6.18: a writer with the default 208 KiB (net.core.wmem_default)
/// queues 180-230 KiB before it blocks, whether the reader's SO_RCVBUF is
/// 4 KiB or 8 MiB. That buffer is QEMU's, out of our reach, so on a unix
/// local hop about 200 KiB can leave QEMU before the verdict; the
/// `return-path` capability (always on in `miggate migrate`) is what keeps
/// a refused migration from being called completed.
pub const LOCAL_RCVBUF_BEFORE_VERDICT: usize = 16 * 1024;

/// ... and after an admission: plenty for a local hop (the kernel caps it
/// at net.core.rmem_max).
pub const LOCAL_RCVBUF_AFTER_VERDICT: usize = 4 * 1024 * 1024;

/// Binds the source gateway's local TCP listener with the small receive
/// buffer, so that accepted sockets start with it.
pub fn bind_local_listener(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_recv_buffer_size(LOCAL_RCVBUF_BEFORE_VERDICT as u32)?;
    sock.bind(addr)?;
    sock.listen(128)
}

/// Opens the local socket's window once the target admitted the channel.
pub fn open_window(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_recv_buffer_size(LOCAL_RCVBUF_AFTER_VERDICT);
}

/// Shortest time between two TLS key updates a source gateway sends on one
/// channel. GnuTLS (QEMU's native TLS) fails a session that receives more
/// than 8 key updates within one second; one per 250 ms stays well below
/// that whatever the `--rekey-after-mib` interval and the stream's speed.
pub const MIN_REKEY_GAP: Duration = Duration::from_millis(250);

/// Read buffer under a TLS session. rustls pulls ciphertext 4 KiB at a
/// time; without a buffer below it that is one syscall per 4 KiB, which
/// costs more CPU than the cipher itself on a migration stream.
pub const TLS_READ_BUF: usize = 256 * 1024;

/// Default for `--handshake-timeout`: the whole TLS handshake of a target
/// connection. A real peer finishes it in about a millisecond on a LAN and
/// well under a second across continents; ten seconds leaves room for a
/// loaded host while a peer that stalls mid-handshake holds its slot (see
/// [`DEFAULT_MAX_PENDING`]) for a short time only.
pub const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);

/// Longest `--handshake-timeout` accepted: beyond five minutes a stalled
/// handshake is no longer "bounded" in any useful sense.
pub const MAX_HANDSHAKE: Duration = Duration::from_secs(300);

/// Default for `--max-pending`: target connections not yet admitted
/// (TLS handshake, hello, stream check) at one time, from all sources.
/// A migration opens 1 + multifd channels (16 is already many) and each
/// is pending for about a millisecond, so 512 is far above any real
/// load; it caps what a flood costs (a pending connection holds a socket
/// and a TLS session of a few tens of KiB, no relay buffer) well inside
/// the default limit of 1024 descriptors.
pub const DEFAULT_MAX_PENDING: usize = 512;

/// Default for `--max-pending-per-ip`: the same, per source address. Four
/// migrations from one host with 16 multifd channels each still fit, while
/// one hostile address cannot take more than an eighth of the global
/// limit away from the others.
pub const DEFAULT_MAX_PENDING_PER_IP: usize = 64;

/// Largest `--max-pending` accepted: each pending connection is a
/// descriptor, and 65536 is already more than a default process may open.
pub const MAX_PENDING: usize = 65_536;

/// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS...). The error
/// repeats until a descriptor is freed, so retrying at once would spin a
/// core; connections close within the handshake or stall timeouts, so a
/// pause of this order costs a real peer little and the listener resumes
/// by itself.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The socket a TLS session runs on: TCP behind a read buffer (writes pass
/// straight through). The buffer is allocated only by [`TlsSocket::grow`]
/// (at once for [`tls_socket`]; after admission for
/// [`tls_socket_unbuffered`]): a peer that has not been admitted costs no
/// relay buffer.
pub struct TlsSocket {
    inner: tokio::net::TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

/// A TLS socket with its read buffer (the source gateway's connection to a
/// target it chose).
pub fn tls_socket(sock: tokio::net::TcpStream) -> TlsSocket {
    let mut s = tls_socket_unbuffered(sock);
    s.grow();
    s
}

/// A TLS socket without a read buffer yet (a peer not yet admitted):
/// reads go straight to the kernel until [`TlsSocket::grow`].
pub fn tls_socket_unbuffered(sock: tokio::net::TcpStream) -> TlsSocket {
    TlsSocket {
        inner: sock,
        buf: Box::default(),
        pos: 0,
        filled: 0,
    }
}

impl TlsSocket {
    /// Allocates the [`TLS_READ_BUF`] read buffer (once).
    pub fn grow(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; TLS_READ_BUF].into_boxed_slice();
        }
    }

    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.inner
    }
}

impl tokio::io::AsyncRead for TlsSocket {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{ready, Poll};
        let me = &mut *self;
        if me.pos == me.filled {
            // Empty buffer: unbuffered, or a read at least as large as the
            // buffer, goes straight to the socket.
            if me.buf.is_empty() || out.remaining() >= me.buf.len() {
                return std::pin::Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let mut rb = tokio::io::ReadBuf::new(&mut me.buf);
            ready!(std::pin::Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            me.filled = rb.filled().len();
            me.pos = 0;
        }
        let n = (me.filled - me.pos).min(out.remaining());
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for TlsSocket {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Unbuffered, then buffered after `grow`, the bytes arrive in order
    /// whatever the read sizes.
    #[tokio::test]
    async fn tls_socket_reads_through_then_buffers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(&sent).await.unwrap();
        });
        let (sock, _) = l.accept().await.unwrap();
        let mut s = tls_socket_unbuffered(sock);
        let mut got = vec![0u8; 10];
        s.read_exact(&mut got).await.unwrap();
        assert!(s.buf.is_empty(), "no buffer before grow");
        s.grow();
        let mut small = [0u8; 4096];
        while got.len() < 300_000 {
            let n = s.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        writer.await.unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn bounded_secs_names_the_field_and_the_range() {
        assert_eq!(
            bounded_secs("stall_timeout", 30, 1, MAX_STALL_SECS),
            Ok(DEFAULT_STALL)
        );
        let e = bounded_secs("target[0].stall_timeout", u64::MAX, 1, MAX_STALL_SECS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "target[0].stall_timeout must be from 1 to 3600 seconds, not 18446744073709551615"
        );
        assert!(bounded_secs("x", 0, 1, 5).is_err());
        // The largest value allowed keeps every deadline in range.
        let _ = tokio::time::Instant::now() + Duration::from_secs(MAX_STALL_SECS);
        let _ = std::time::SystemTime::now() + Duration::from_secs(MAX_RETENTION_SECS);
        const { assert!((MAX_REKEY_AFTER_MIB << 20) >> 20 == MAX_REKEY_AFTER_MIB) };
    }
}
