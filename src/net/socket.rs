//! Socket options and the read buffer under TLS: how a migration
//! connection's sockets are tuned, and when they get their buffers.

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

/// Read buffer under a TLS session. rustls pulls ciphertext 4 KiB at a
/// time; without a buffer below it that is one syscall per 4 KiB, which
/// costs more CPU than the cipher itself on a migration stream.
pub const TLS_READ_BUF: usize = 256 * 1024;

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
}
