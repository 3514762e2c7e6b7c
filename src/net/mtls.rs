//! The one mTLS accept step every TLS listener takes (the target gateway,
//! the daemon's admin API): handshake under a deadline, client certificate
//! required, subject DN rendered as QEMU's tls-authz sees it
//! ([`crate::creds::dn`]). Authorizing that DN is the caller's policy.
//!
//! This is the one place `net` looks up at `creds`: rendering the DN is the
//! last step of "who is on this socket", and every listener needs it the
//! same way.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::creds::dn::{self, DnError};
use crate::creds::tls;

/// Who completed the handshake.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// Subject DN, GnuTLS's rendering (what ACLs name).
    pub dn: String,
    /// The leaf certificate, DER.
    pub leaf: Vec<u8>,
    /// The negotiated ALPN protocol, if any (QEMU's GnuTLS offers none).
    pub alpn: Option<Vec<u8>>,
}

impl PeerIdentity {
    /// The peer is a miggate source: it speaks hello/verdict frames.
    pub fn is_miggate(&self) -> bool {
        self.alpn.as_deref() == Some(tls::ALPN_MIGGATE)
    }
}

/// Why a TLS peer was not accepted. `Display` is the operator's sentence.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake did not complete within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The handshake failed: bad certificate, another CA, not TLS...
    #[error("{}", tls::describe_tls_error(.0, None))]
    Handshake(Arc<std::io::Error>),
    /// The verifier requires a certificate; this is a defence in depth.
    #[error("peer presented no client certificate")]
    NoCertificate,
    #[error("peer certificate subject unreadable: {0}")]
    Subject(Arc<DnError>),
}

/// Compared by what the operator reads: the I/O and DN errors inside are
/// not comparable themselves.
impl PartialEq for AcceptError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
impl Eq for AcceptError {}

/// Accepts one TLS connection with a client certificate, within
/// `handshake`, and says who the peer is.
pub async fn accept<S>(
    acceptor: &TlsAcceptor,
    sock: S,
    handshake: Duration,
) -> Result<(TlsStream<S>, PeerIdentity), AcceptError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = match tokio::time::timeout(handshake, acceptor.accept(sock)).await {
        Err(_) => return Err(AcceptError::Timeout(handshake)),
        Ok(Err(e)) => return Err(AcceptError::Handshake(Arc::new(e))),
        Ok(Ok(s)) => s,
    };
    let conn = stream.get_ref().1;
    let leaf = tls::peer_leaf(conn.peer_certificates())
        .ok_or(AcceptError::NoCertificate)?
        .to_vec();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let dn = dn::subject_dn(&leaf).map_err(|e| AcceptError::Subject(Arc::new(e)))?;
    Ok((stream, PeerIdentity { dn, leaf, alpn }))
}
