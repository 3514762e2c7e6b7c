//! TLS 1.3 key updates on long streams, at an interval the operator picks.
//!
//! rustls refreshes keys by itself only at the cipher's confidentiality
//! limit (2^24 records for AES-GCM, hundreds of GiB), so on a migration
//! stream a key update would otherwise almost never happen, and a peer that
//! mishandles one (QEMU issue #1937) would only break on the rare huge
//! migration. `--rekey-after-mib` makes the source gateway send a
//! `KeyUpdate` (update_requested: the peer refreshes its own sending keys
//! in answer) after every N MiB of a channel, so that rekeying is exercised
//! on every migration, and tested.
//!
//! The answer to update_requested is not a key update of its own: rustls
//! (and GnuTLS) queue it until they next send data, and fold further
//! requests into the queued one. The target gateway's sending direction
//! (the return path, postcopy pages) therefore has its keys refreshed only
//! as often as it sends something; `miggate target --rekey-after-mib`
//! makes it rekey after every N MiB it sends, like the source, counted in
//! its own records.
//!
//! QEMU's GnuTLS refuses a ninth key update within one second
//! (`GNUTLS_E_TOO_MANY_HANDSHAKE_PACKETS`, and the migration fails with
//! "Cannot read from TLS channel"), so updates are spaced by at least
//! [`MIN_REKEY_GAP`](crate::timeouts::MIN_REKEY_GAP), whatever the interval.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Counters;

/// A TLS stream whose sending keys can be refreshed.
pub trait RefreshKeys {
    fn refresh_keys(&mut self) -> Result<(), rustls::Error>;
}

impl<IO> RefreshKeys for tokio_rustls::client::TlsStream<IO> {
    fn refresh_keys(&mut self) -> Result<(), rustls::Error> {
        self.get_mut().1.refresh_traffic_keys()
    }
}

impl<IO> RefreshKeys for tokio_rustls::server::TlsStream<IO> {
    fn refresh_keys(&mut self) -> Result<(), rustls::Error> {
        self.get_mut().1.refresh_traffic_keys()
    }
}

/// Wraps a TLS stream: after every `every` plaintext bytes written, the
/// next record goes out under fresh keys, counted in the channel's
/// `Counters::key_updates` (the outcome record reports it).
pub struct Rekeying<S> {
    inner: S,
    /// `None`: never (the stream passes through).
    every: Option<u64>,
    since: u64,
    min_gap: Duration,
    last: Option<Instant>,
    counters: Arc<Counters>,
}

impl<S> Rekeying<S> {
    /// Rekeys after every `every` bytes, but never twice within `min_gap`.
    pub fn new(inner: S, every: u64, min_gap: Duration, counters: Arc<Counters>) -> Self {
        Self::optional(inner, Some(every), min_gap, counters)
    }

    /// [`Rekeying::new`], or a stream that is never rekeyed (`None`): one
    /// type whether or not the operator asked for key updates.
    pub fn optional(
        inner: S,
        every: Option<u64>,
        min_gap: Duration,
        counters: Arc<Counters>,
    ) -> Self {
        Rekeying {
            inner,
            every: every.map(|e| e.max(1)),
            since: 0,
            min_gap,
            last: None,
            counters,
        }
    }
}

impl<S: RefreshKeys + AsyncWrite + Unpin> AsyncWrite for Rekeying<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        let Some(every) = this.every else {
            return Poll::Ready(Ok(n));
        };
        this.since += n as u64;
        let spaced = this.last.map_or(true, |t| t.elapsed() >= this.min_gap);
        if this.since >= every && spaced {
            this.since = 0;
            this.last = Some(Instant::now());
            // Fails only on a TLS 1.2 session, which has no key update:
            // a stream error names why instead of carrying on unrekeyed.
            this.inner
                .refresh_keys()
                .map_err(|e| std::io::Error::other(format!("cannot refresh the TLS keys: {e}")))?;
            this.counters.key_updates.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rekeying<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::{pki, tls};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Real TLS 1.3 on loopback: 8 MiB each way through a client that
    /// rekeys every 64 KiB; the server (plain rustls) follows every update
    /// and answers each request with its own, and the bytes arrive intact.
    #[tokio::test]
    async fn many_key_updates_keep_the_stream_intact() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::init(&pki_dir, &pki::InitOptions::default()).unwrap();
        let server_cfg = tls::server_config(&pki_dir, &[]).unwrap();
        let client_cfg = tls::client_config(&pki_dir, &[]).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        const LEN: usize = 8 << 20;
        let payload: Arc<Vec<u8>> = Arc::new((0..LEN).map(|i| (i * 7 + i / 4096) as u8).collect());

        let expected = payload.clone();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
            let tls = acceptor.accept(sock).await.unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let echo = tokio::spawn(async move {
                // Echo back what arrives, so both directions carry data
                // across the key updates.
                let mut got = Vec::with_capacity(LEN);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = r.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    w.write_all(&buf[..n]).await.unwrap();
                }
                w.shutdown().await.unwrap();
                got
            });
            let got = echo.await.unwrap();
            assert!(got == *expected, "server received corrupted bytes");
        });

        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, sock).await.unwrap();
        let counters = Arc::new(Counters::default());
        let stream = Rekeying::new(tls, 64 * 1024, Duration::ZERO, counters.clone());
        let (mut r, mut w) = tokio::io::split(stream);
        let send = payload.clone();
        let writer = tokio::spawn(async move {
            for chunk in send.chunks(16 * 1024) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::with_capacity(LEN);
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        server.await.unwrap();
        assert!(back == *payload, "echo came back corrupted");
        assert!(
            counters.key_updates() >= 100,
            "expected >= 100 key updates, sent {}",
            counters.key_updates()
        );
    }

    /// The target gateway's side (`miggate target --rekey-after-mib`): a
    /// server that rekeys its own sending direction every 64 KiB while
    /// the client only reads, as on a return path; a stream built with
    /// no interval never rekeys.
    #[tokio::test]
    async fn a_server_rekeys_its_sending_direction() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::init(&pki_dir, &pki::InitOptions::default()).unwrap();
        let server_cfg = tls::server_config(&pki_dir, &[]).unwrap();
        let client_cfg = tls::client_config(&pki_dir, &[]).unwrap();
        const LEN: usize = 8 << 20;
        let payload: Arc<Vec<u8>> = Arc::new((0..LEN).map(|i| (i * 13 + i / 999) as u8).collect());

        for every in [Some(64 * 1024), None] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (acceptor, send) = (
                tokio_rustls::TlsAcceptor::from(server_cfg.clone()),
                payload.clone(),
            );
            let counters = Arc::new(Counters::default());
            let c = counters.clone();
            let server = tokio::spawn(async move {
                let (sock, _) = listener.accept().await.unwrap();
                let tls = acceptor.accept(sock).await.unwrap();
                let mut s = Rekeying::optional(tls, every, Duration::ZERO, c);
                for chunk in send.chunks(16 * 1024) {
                    s.write_all(chunk).await.unwrap();
                }
                s.shutdown().await.unwrap();
            });
            let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_cfg.clone());
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, sock).await.unwrap();
            let mut got = Vec::with_capacity(LEN);
            tls.read_to_end(&mut got).await.unwrap();
            server.await.unwrap();
            assert!(got == *payload, "client received corrupted bytes");
            match every {
                Some(_) => assert!(
                    counters.key_updates() >= 100,
                    "expected >= 100 key updates from the server, sent {}",
                    counters.key_updates()
                ),
                None => assert_eq!(counters.key_updates(), 0, "no interval: no key update"),
            }
        }
    }
}
