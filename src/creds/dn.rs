//! Subject DN strings exactly as QEMU's tls-authz receives them from GnuTLS
//! (`gnutls_x509_crt_get_dn`, the "compat" form).

/// Why a DN could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum DnError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
}

/// Renders the subject DN of a DER-encoded certificate the way GnuTLS
/// `gnutls_x509_crt_get_dn()` does.
pub fn subject_dn(cert_der: &[u8]) -> Result<String, DnError> {
    let _ = cert_der;
    Err(DnError::Parse("not implemented yet".into()))
}
