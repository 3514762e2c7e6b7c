//! QEMU's tls-creds-x509 directory -> rustls configurations, and TLS errors
//! turned into sentences an operator can act on.
//!
//! Layout (QEMU `-object tls-creds-x509,dir=DIR`): `ca-cert.pem`,
//! `ca-crl.pem` (optional), `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem`. The target gateway is the TLS
//! server and always verifies the client (QEMU's verify-peer=yes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::keyfile::KeyFileError;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_CRL: &str = "ca-crl.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// ALPN protocol by which a miggate source and target recognise each other.
/// QEMU's GnuTLS sessions negotiate no ALPN, so its absence means "QEMU".
pub const ALPN_MIGGATE: &[u8] = b"miggate/1";

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no certificate in it")]
    NoCert { path: PathBuf },
    #[error("{path}: no usable CA certificate ({why})")]
    BadCa { path: PathBuf, why: String },
    #[error("{dir}: invalid TLS credentials: {source}")]
    Config {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{dir}: cannot build the certificate verifier: {why}")]
    Verifier { dir: PathBuf, why: String },
    /// A CRL that parses but cannot be used (another issuer, a bad
    /// signature): every handshake would fail on it.
    #[error("{path}: unusable revocation list: {why}")]
    BadCrl { path: PathBuf, why: String },
    /// A private key that is not private (or not ours), or unreadable.
    #[error(transparent)]
    Key(#[from] KeyFileError),
}

/// The crypto provider: aws-lc-rs, AES-128-GCM preferred (fastest here,
/// and as strong as the migration stream needs).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite::*;
        match s.suite() {
            TLS13_AES_128_GCM_SHA256 => 0,
            TLS13_AES_256_GCM_SHA384 => 1,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 2,
            _ => 3,
        }
    });
    Arc::new(p)
}

pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredsError> {
    let read_err = |source| CredsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(CredsError::NoCert {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in `path`, refused if other users may access it (see
/// [`super::keyfile`]).
fn key(path: &Path) -> Result<PrivateKeyDer<'static>, CredsError> {
    let pem = super::keyfile::read_private(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| CredsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn roots(dir: &Path) -> Result<Arc<RootCertStore>, CredsError> {
    let path = dir.join(CA_CERT);
    let mut store = RootCertStore::empty();
    for cert in certs(&path)? {
        store.add(cert).map_err(|e| CredsError::BadCa {
            path: path.clone(),
            why: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

/// The CRLs of `dir/ca-crl.pem` (none if the file is absent). Parsed
/// only: [`super::crl_watch::load`] also checks that they apply.
pub(crate) fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CredsError> {
    let path = dir.join(CA_CRL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let read_err = |source| CredsError::Read {
        path: path.clone(),
        source,
    };
    CertificateRevocationListDer::pem_file_iter(&path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)
}

fn verifier_err(dir: &Path) -> impl Fn(rustls::server::VerifierBuilderError) -> CredsError + '_ {
    move |e| CredsError::Verifier {
        dir: dir.to_path_buf(),
        why: e.to_string(),
    }
}

fn config_err(dir: &Path) -> impl Fn(rustls::Error) -> CredsError + '_ {
    move |source| CredsError::Config {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Server (target gateway) config: server-cert/key, clients must present a
/// certificate issued by ca-cert.pem and not revoked by ca-crl.pem.
pub fn server_config(dir: &Path, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, CredsError> {
    server_config_with(dir, alpn, super::crl_watch::load(dir)?)
}

/// [`server_config`] with CRLs already read (and checked) by the caller.
pub fn server_config_with(
    dir: &Path,
    alpn: &[&[u8]],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<ServerConfig>, CredsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider.clone())
        .with_crls(crls)
        .build()
        .map_err(verifier_err(dir))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err(dir))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&dir.join(SERVER_CERT))?, key(&dir.join(SERVER_KEY))?)
        .map_err(config_err(dir))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // One migration, one connection: resumption would only add state.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client (source gateway) config: client-cert/key, the server must present
/// a certificate issued by ca-cert.pem for the expected hostname.
pub fn client_config(dir: &Path, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, CredsError> {
    let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
    client_config_with(dir, &alpn, super::crl_watch::load(dir)?)
}

/// [`client_config`] with CRLs already read (and checked) by the caller.
pub fn client_config_with(
    dir: &Path,
    alpn: &[Vec<u8>],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<ClientConfig>, CredsError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir)?, provider.clone())
        .with_crls(crls)
        .build()
        .map_err(verifier_err(dir))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err(dir))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs(&dir.join(CLIENT_CERT))?, key(&dir.join(CLIENT_KEY))?)
        .map_err(config_err(dir))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Turns a TLS failure (as tokio-rustls reports it, inside an io::Error)
/// into a sentence. `hostname` is the name the client checked, if any.
pub fn describe_tls_error(err: &std::io::Error, hostname: Option<&str>) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "peer closed the connection during the TLS handshake".into()
            }
            _ => format!("TLS handshake failed: {err}"),
        };
    };
    describe_rustls_error(tls, hostname)
}

fn describe_rustls_error(err: &rustls::Error, hostname: Option<&str>) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match err {
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!(
                "certificate does not match the hostname {}",
                hostname.unwrap_or("(unknown)")
            )
        }
        E::InvalidCertificate(C::UnknownIssuer) => {
            "peer certificate is not issued by our CA (ca-cert.pem)".into()
        }
        // A CA with the same name as ours but another key signed it.
        E::InvalidCertificate(C::BadSignature) => {
            "peer certificate is not issued by our CA (ca-cert.pem): its signature does not verify"
                .into()
        }
        E::InvalidCertificate(C::Revoked) => "peer certificate is revoked (ca-crl.pem)".into(),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "peer certificate has expired".into()
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "peer certificate is not valid yet".into()
        }
        E::InvalidCertificate(other) => format!("peer certificate rejected: {other:?}"),
        E::NoCertificatesPresented => "peer presented no client certificate".into(),
        E::AlertReceived(A::UnknownCA) => {
            "peer rejected our certificate: it does not trust our CA".into()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "peer requires a client certificate and we sent none".into()
        }
        E::AlertReceived(A::BadCertificate | A::CertificateUnknown | A::DecryptError) => {
            "peer rejected our certificate".into()
        }
        E::AlertReceived(A::CertificateRevoked) => "peer says our certificate is revoked".into(),
        E::AlertReceived(A::CertificateExpired) => "peer says our certificate has expired".into(),
        E::AlertReceived(other) => format!("peer aborted the TLS handshake (alert {other:?})"),
        E::InvalidMessage(_) => "peer does not speak TLS (garbage on the port?)".into(),
        E::NoApplicationProtocol => "peer offered no common ALPN protocol".into(),
        other => format!("TLS failure: {other}"),
    }
}

/// The peer's leaf certificate, once the handshake is done.
pub fn peer_leaf<'a>(certs: Option<&'a [CertificateDer<'static>]>) -> Option<&'a [u8]> {
    certs.and_then(|c| c.first()).map(|c| c.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Both configurations refuse a key others may read, name the file and
    /// its mode, and load once it is 0600 again.
    #[test]
    fn configs_refuse_a_key_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        crate::creds::pki::init(dir.path(), &Default::default()).unwrap();
        server_config(dir.path(), &[]).unwrap();
        client_config(dir.path(), &[]).unwrap();

        let server_key = dir.path().join(SERVER_KEY);
        chmod(&server_key, 0o640);
        let err = server_config(dir.path(), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, CredsError::Key(KeyFileError::TooOpen { .. })),
            "{msg}"
        );
        assert!(msg.contains(&server_key.display().to_string()), "{msg}");
        assert!(msg.contains("mode 0640"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", server_key.display())),
            "{msg}"
        );
        chmod(&server_key, 0o600);
        server_config(dir.path(), &[]).unwrap();

        let client_key = dir.path().join(CLIENT_KEY);
        chmod(&client_key, 0o604);
        let msg = client_config(dir.path(), &[]).unwrap_err().to_string();
        assert!(
            msg.contains("client-key.pem") && msg.contains("mode 0604"),
            "{msg}"
        );
        chmod(&client_key, 0o600);
        client_config(dir.path(), &[]).unwrap();
    }

    /// A key reached through a symlink is judged by the file it leads to.
    #[test]
    fn a_symlinked_open_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        crate::creds::pki::init(dir.path(), &Default::default()).unwrap();
        let elsewhere = dir.path().join("keys");
        std::fs::create_dir(&elsewhere).unwrap();
        let real = elsewhere.join("server.key");
        std::fs::rename(dir.path().join(SERVER_KEY), &real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join(SERVER_KEY)).unwrap();
        server_config(dir.path(), &[]).unwrap();
        chmod(&real, 0o644);
        let msg = server_config(dir.path(), &[]).unwrap_err().to_string();
        assert!(msg.contains("server-key.pem (-> "), "{msg}");
        assert!(
            msg.contains("server.key)") && msg.contains("mode 0644"),
            "{msg}"
        );
    }
}
