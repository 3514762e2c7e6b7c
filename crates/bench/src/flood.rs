//! Hostile connections against a target gateway, as an outsider on the
//! network can make them: garbage bytes, TLS without a client certificate,
//! a certificate from another CA, a denied DN, and clients that send a
//! ClientHello and then stall mid-handshake. Used by the `miggate-flood`
//! transport of the benchmark and by `crates/cli/tests/flood.rs`.
//!
//! Connections come from loopback addresses other than 127.0.0.1
//! (127.0.0.2 and up, which Linux routes to lo), so that the gateway's
//! per-address limit meets them and not the real source.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use miggate::creds::{pki, tls};

/// DN of the flood's certificate from the right CA that no ACL allows.
pub const DENIED_DN: &str = "O=miggate flood,CN=denied.flood";

/// A hostile client gives up if the gateway has not closed its connection
/// by then (the gateway's handshake and stall timeouts are shorter).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Garbage,
    NoCert,
    OtherCa,
    DeniedDn,
    StallMidHandshake,
}

/// Every kind, in the order connections cycle through them.
pub const KINDS: [Kind; 5] = [
    Kind::Garbage,
    Kind::NoCert,
    Kind::OtherCa,
    Kind::DeniedDn,
    Kind::StallMidHandshake,
];

/// The hostile clients' TLS configurations and the gateway they target.
pub struct Hostiles {
    target: SocketAddr,
    /// Source addresses used in turn: 127.0.0.2 .. 127.0.0.(1 + n).
    addresses: u8,
    no_cert: Arc<rustls::ClientConfig>,
    other_ca: Arc<rustls::ClientConfig>,
    denied: Arc<rustls::ClientConfig>,
    valid: Arc<rustls::ClientConfig>,
    /// Connections made so far.
    connected: AtomicUsize,
}

impl Hostiles {
    /// Connections made so far (the gateway accepted them).
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Credentials for every kind, made under `workdir` from the PKI in
    /// `pki_dir` (which must hold the CA's key, as `pki init` leaves it):
    /// another CA, and a certificate for [`DENIED_DN`].
    pub fn prepare(
        pki_dir: &Path,
        workdir: &Path,
        target: SocketAddr,
        addresses: u8,
    ) -> Result<Self> {
        let other = workdir.join("flood-other-ca");
        pki::init(&other, &pki::InitOptions::default())?;
        let mixed = workdir.join("flood-mixed");
        std::fs::create_dir_all(&mixed)?;
        std::fs::copy(pki_dir.join(tls::CA_CERT), mixed.join(tls::CA_CERT))?;
        for f in [tls::CLIENT_CERT, tls::CLIENT_KEY] {
            std::fs::copy(other.join(f), mixed.join(f))?;
        }
        let denied = workdir.join("flood-denied");
        pki::issue_client(pki_dir, &denied, DENIED_DN, 1)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki_dir.join(tls::CA_CERT))
            .context("reading the CA certificate")?
        {
            roots.add(c?)?;
        }
        let no_cert = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Hostiles {
            target,
            addresses: addresses.max(1),
            no_cert: Arc::new(no_cert),
            other_ca: tls::client_config(&mixed, &[])?,
            denied: tls::client_config(&denied, &[])?,
            valid: tls::client_config(pki_dir, &[])?,
            connected: AtomicUsize::new(0),
        })
    }

    /// Connection `i`: its kind and source address cycle.
    pub fn kind(i: usize) -> Kind {
        KINDS[i % KINDS.len()]
    }

    fn from(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % self.addresses as usize) as u8,
        ))
    }

    /// One hostile connection; returns once the gateway closed it.
    pub async fn one(&self, i: usize) -> std::io::Result<()> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(self.from(i), 0))?;
        let mut sock = sock.connect(self.target).await?;
        self.connected.fetch_add(1, Ordering::Relaxed);
        let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
        match Self::kind(i) {
            Kind::Garbage => {
                let junk: Vec<u8> = (0..16 * 1024u64)
                    .map(|j| {
                        ((j ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 0x80
                    })
                    .collect();
                let _ = sock.write_all(&junk).await;
                drain(&mut sock).await;
            }
            k @ (Kind::NoCert | Kind::OtherCa | Kind::DeniedDn) => {
                let cfg = match k {
                    Kind::NoCert => &self.no_cert,
                    Kind::OtherCa => &self.other_ca,
                    _ => &self.denied,
                };
                let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                if let Ok(mut s) = connector.connect(name, sock).await {
                    drain(&mut s).await;
                }
            }
            Kind::StallMidHandshake => {
                self.send_client_hello(&mut sock).await;
                drain(&mut sock).await;
            }
        }
        Ok(())
    }

    /// A valid ClientHello, then nothing: the gateway waits for our
    /// certificate and Finished until its handshake deadline.
    async fn send_client_hello(&self, sock: &mut tokio::net::TcpStream) {
        let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
        let Ok(mut conn) = rustls::ClientConnection::new(self.valid.clone(), name) else {
            return;
        };
        let mut hello = Vec::new();
        if conn.write_tls(&mut hello).is_ok() {
            let _ = sock.write_all(&hello).await;
        }
    }

    /// Connection `i` as a handshake stalled after its ClientHello, left
    /// open for the caller to hold.
    pub async fn stalled(&self, i: usize) -> std::io::Result<tokio::net::TcpStream> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(self.from(i), 0))?;
        let mut sock = sock.connect(self.target).await?;
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.send_client_hello(&mut sock).await;
        Ok(sock)
    }

    /// Connection `i` under [`CLIENT_TIMEOUT`]: `Err` says what went wrong.
    pub async fn one_bounded(self: Arc<Self>, i: usize) -> Result<(), String> {
        match tokio::time::timeout(CLIENT_TIMEOUT, self.one(i)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("hostile {i} ({:?}): {e}", Self::kind(i))),
            Err(_) => Err(format!(
                "hostile {i} ({:?}) was not closed by the gateway within {CLIENT_TIMEOUT:?}",
                Self::kind(i)
            )),
        }
    }

    /// `total` connections: the first `at_once` together, the rest with at
    /// most `in_flight` open at a time. Returns the errors (a connection
    /// that could not be made or was never closed).
    pub async fn flood(
        self: Arc<Self>,
        total: usize,
        at_once: usize,
        in_flight: usize,
    ) -> Vec<String> {
        let mut set = JoinSet::new();
        let at_once = at_once.min(total);
        for i in 0..at_once {
            set.spawn(self.clone().one_bounded(i));
        }
        let gate = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
        for i in at_once..total {
            let Ok(permit) = gate.clone().acquire_owned().await else {
                break;
            };
            let me = self.clone();
            set.spawn(async move {
                let r = me.one_bounded(i).await;
                drop(permit);
                r
            });
        }
        let mut errors = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(format!("hostile client task: {e}")),
                Ok(Ok(())) => {}
            }
        }
        errors
    }
}

/// Reads until the gateway closes (EOF, reset or alert).
async fn drain<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
