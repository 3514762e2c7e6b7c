//! `ca-crl.pem`, live: read and checked before it is used, watched like
//! the ACL file (its directory, so `pki revoke`'s rename into place, an
//! editor's, and a deletion are all seen), and used to re-verify the
//! certificates of live peers.
//!
//! A new CRL is taken only if it parses and applies: our own certificate
//! from the same directory verifies with it (or is revoked by it). A CRL
//! from another issuer, or with a bad signature, would make every
//! handshake fail ("unknown revocation status"); a truncated file would
//! lift every revocation. Either way the previous CRL stays in force and
//! the reason is logged: a botched copy must not cut running migrations,
//! nor let revoked peers back in. Deleting the file lifts the CRL, as
//! starting without one does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, Error as TlsError};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

use super::tls::{self, CredsError, CA_CRL, CLIENT_CERT, SERVER_CERT};

pub type Crls = Vec<CertificateRevocationListDer<'static>>;

/// Reads `dir/ca-crl.pem` (none if absent) and checks that it applies.
pub fn load(dir: &Path) -> Result<Crls, CredsError> {
    let path = dir.join(CA_CRL);
    let crls = tls::crls(dir)?;
    if crls.is_empty() && path.exists() {
        return Err(CredsError::BadCrl {
            path,
            why: "no X509 CRL in it (empty or truncated?)".into(),
        });
    }
    if !crls.is_empty() {
        check_applies(dir, &path, &crls)?;
    }
    Ok(crls)
}

/// Verifies our own certificate(s) in `dir` with `crls`: a CRL error
/// means the list is unusable. Revoked, or failing for another reason
/// (a name, an expiry: not the CRL's business), the list is usable.
fn check_applies(dir: &Path, path: &Path, crls: &Crls) -> Result<(), CredsError> {
    let bad = |why: String| CredsError::BadCrl {
        path: path.to_path_buf(),
        why,
    };
    for (file, server) in [(SERVER_CERT, true), (CLIENT_CERT, false)] {
        let own = dir.join(file);
        if !own.exists() {
            continue;
        }
        let leaf = tls::certs(&own)?.remove(0);
        let check = if server {
            // Any name: the name is checked after revocation.
            let name = ServerName::try_from("miggate.invalid").expect("a valid name");
            PeerCheck::servers(dir, crls.clone(), name)
        } else {
            PeerCheck::clients(dir, crls.clone())
        }
        .map_err(|e| bad(e.to_string()))?;
        match check.verify(&leaf, &[]) {
            Err(e) if crl_error(&e) => return Err(bad(describe(&e))),
            _ => {}
        }
    }
    Ok(())
}

/// Errors that are the CRL's fault, not the certificate's.
fn crl_error(e: &TlsError) -> bool {
    matches!(
        e,
        TlsError::InvalidCertRevocationList(_)
            | TlsError::InvalidCertificate(
                CertificateError::UnknownRevocationStatus
                    | CertificateError::ExpiredRevocationList
                    | CertificateError::ExpiredRevocationListContext { .. }
            )
    )
}

fn describe(e: &TlsError) -> String {
    match e {
        TlsError::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            "it is not issued by our CA (ca-cert.pem): no certificate could be checked against it"
                .into()
        }
        TlsError::InvalidCertRevocationList(c) => format!("{c:?} (wrong signer, or damaged?)"),
        other => other.to_string(),
    }
}

/// Verifies peer certificates against `ca-cert.pem` and a set of CRLs,
/// as a handshake would: the target's peers are clients, the source's
/// its target (a server, for `name`).
pub struct PeerCheck {
    kind: Kind,
    crl_path: PathBuf,
}

enum Kind {
    Clients(Arc<dyn ClientCertVerifier>),
    Servers(Arc<WebPkiServerVerifier>, ServerName<'static>),
}

impl PeerCheck {
    pub fn clients(dir: &Path, crls: Crls) -> Result<PeerCheck, CredsError> {
        let v = WebPkiClientVerifier::builder_with_provider(tls::roots(dir)?, tls::provider())
            .with_crls(crls)
            .build()
            .map_err(|e| verifier_err(dir, e))?;
        Ok(PeerCheck {
            kind: Kind::Clients(v),
            crl_path: dir.join(CA_CRL),
        })
    }

    pub fn servers(
        dir: &Path,
        crls: Crls,
        name: ServerName<'static>,
    ) -> Result<PeerCheck, CredsError> {
        let v = WebPkiServerVerifier::builder_with_provider(tls::roots(dir)?, tls::provider())
            .with_crls(crls)
            .build()
            .map_err(|e| verifier_err(dir, e))?;
        Ok(PeerCheck {
            kind: Kind::Servers(v, name),
            crl_path: dir.join(CA_CRL),
        })
    }

    fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), TlsError> {
        let now = UnixTime::now();
        match &self.kind {
            Kind::Clients(v) => v.verify_client_cert(leaf, intermediates, now).map(drop),
            Kind::Servers(v, name) => v
                .verify_server_cert(leaf, intermediates, name, &[], now)
                .map(drop),
        }
    }

    /// `Some(reason)` if the CRLs revoke a certificate of this chain (as
    /// the peer presented it, end-entity first). Any other verdict (valid,
    /// expired since, unparsable) is not a revocation: the handshake
    /// judged those already.
    pub fn revoked(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        let (leaf, intermediates) = chain.split_first()?;
        match self.verify(leaf, intermediates) {
            Err(TlsError::InvalidCertificate(CertificateError::Revoked)) => Some(format!(
                "revoked: peer certificate serial {}{} revoked by {}",
                serial_hex(leaf),
                if intermediates.is_empty() {
                    ""
                } else {
                    " (or an intermediate of its chain)"
                },
                self.crl_path.display()
            )),
            _ => None,
        }
    }
}

fn verifier_err(dir: &Path, e: impl std::fmt::Display) -> CredsError {
    CredsError::Verifier {
        dir: dir.to_path_buf(),
        why: e.to_string(),
    }
}

/// A certificate's serial number in hex (as `openssl x509 -serial` and
/// `certtool -i` show it), or "?" if it does not parse.
pub fn serial_hex(leaf: &[u8]) -> String {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| hex::encode_upper(c.raw_serial()))
        .unwrap_or_else(|_| "?".into())
}

/// Watches `dir/ca-crl.pem`; after each change, `changed` gets the new
/// CRLs, or why they cannot be used. Stops when the watcher is dropped.
pub fn watch(
    dir: &Path,
    mut changed: impl FnMut(Result<Crls, CredsError>) + Send + 'static,
) -> Result<notify::RecommendedWatcher, crate::authz::AuthzError> {
    let owned = dir.to_path_buf();
    crate::authz::watch_file(&dir.join(CA_CRL), "miggate-crl-watch", move || {
        changed(load(&owned));
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::pki;

    /// A fresh CA with a server and a client certificate in `dir`.
    fn pki_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &Default::default()).unwrap();
        dir
    }

    fn leaf(dir: &Path, file: &str) -> Vec<CertificateDer<'static>> {
        tls::certs(&dir.join(file)).unwrap()
    }

    /// No CRL: nothing revoked. After `pki revoke` of the client
    /// certificate: the client check says so with its serial; the server
    /// certificate is still fine.
    #[test]
    fn revoked_peer_by_serial() {
        let dir = pki_dir();
        let d = dir.path();
        let client = leaf(d, CLIENT_CERT);
        assert!(load(d).unwrap().is_empty());
        let check = PeerCheck::clients(d, load(d).unwrap()).unwrap();
        assert_eq!(check.revoked(&client), None);

        pki::revoke(d, &d.join(CLIENT_CERT), 30).unwrap();
        let crls = load(d).unwrap();
        assert_eq!(crls.len(), 1);
        let check = PeerCheck::clients(d, crls.clone()).unwrap();
        let why = check.revoked(&client).expect("revoked");
        let serial = serial_hex(&client[0]);
        assert!(serial.len() >= 2 && serial != "?", "{serial}");
        assert_eq!(
            why,
            format!(
                "revoked: peer certificate serial {serial} revoked by {}",
                d.join(CA_CRL).display()
            )
        );
        let name = ServerName::try_from("localhost").unwrap();
        let servers = PeerCheck::servers(d, crls, name).unwrap();
        assert_eq!(servers.revoked(&leaf(d, SERVER_CERT)), None);
    }

    /// Unusable CRLs are refused with a reason: garbage, an empty file,
    /// and a CRL of another CA (which would fail every handshake).
    #[test]
    fn unusable_crls_are_refused() {
        let dir = pki_dir();
        let d = dir.path();
        let crl = d.join(CA_CRL);
        std::fs::write(&crl, "").unwrap();
        let e = load(d).unwrap_err().to_string();
        assert!(e.contains("no X509 CRL in it"), "{e}");
        std::fs::write(
            &crl,
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        let e = load(d).unwrap_err().to_string();
        assert!(e.contains("ca-crl.pem"), "{e}");

        let other = pki_dir();
        pki::revoke(other.path(), &other.path().join(CLIENT_CERT), 30).unwrap();
        std::fs::copy(other.path().join(CA_CRL), &crl).unwrap();
        let e = load(d).unwrap_err().to_string();
        assert!(e.contains("not issued by our CA"), "{e}");
        // And the server config refuses it up front too.
        assert!(tls::server_config(d, &[]).is_err());

        std::fs::remove_file(&crl).unwrap();
        assert!(load(d).unwrap().is_empty());
    }
}
