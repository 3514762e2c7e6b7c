//! Credentials: QEMU's tls-creds-x509 directory layout, rustls configs, DN strings.

pub mod crl_watch;
pub mod dn;
pub mod keyfile;
pub mod pki;
pub mod tls;
