//! Named timeouts and socket options, in one place.

use std::time::Duration;

/// Default for `--stall-timeout`: how long a peer may send nothing (during
/// the TLS handshake, the hello, the first bytes of the stream, or the
/// relay as a whole) before both sides are cut. A healthy QEMU migration
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

/// The socket a TLS session runs on: TCP behind a large read buffer
/// (writes pass straight through).
pub type TlsSocket = tokio::io::BufReader<tokio::net::TcpStream>;

pub fn tls_socket(sock: tokio::net::TcpStream) -> TlsSocket {
    tokio::io::BufReader::with_capacity(TLS_READ_BUF, sock)
}

#[cfg(test)]
mod tests {
    use super::*;

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
