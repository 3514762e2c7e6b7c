//! `miggate pki`: a CA, a server and a client certificate in the layout of
//! QEMU's `tls-creds-x509 dir=` (so QEMU's native TLS can use the same
//! directory), with the extensions QEMU's `qcrypto_tls_creds_check_cert`
//! insists on: CA certs carry basicConstraints CA:TRUE and keyCertSign;
//! leaf certs CA:FALSE, digitalSignature + keyEncipherment and the right
//! extendedKeyUsage (serverAuth / clientAuth).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use super::keyfile::{read_private, KeyFileError};
use super::tls::{CA_CERT, CA_CRL, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// The CA's private key. QEMU's layout has no place for it; it is kept
/// beside the CA cert so that `pki issue` can mint more client identities.
/// Production hosts should not carry it (see README).
pub const CA_KEY: &str = "ca-key.pem";

/// Default subject of the client (source host) certificate.
pub const DEFAULT_CLIENT_DN: &str = "O=miggate,CN=migration-source";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path} already exists: refusing to overwrite an existing CA")]
    CaExists { path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid distinguished name {dn:?}: {why}")]
    BadDn { dn: String, why: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not a certificate or CRL in PEM form ({why})")]
    Parse { path: PathBuf, why: String },
    #[error("{path} was not issued by the CA in {ca_dir}")]
    NotOurs { path: PathBuf, ca_dir: PathBuf },
    /// `ca-key.pem` is accessible by other users (or not ours), or unreadable.
    #[error(transparent)]
    Key(#[from] KeyFileError),
}

/// What `pki init` should create.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Names (DNS or IP) the server certificate is valid for; the first is its CN.
    pub hostnames: Vec<String>,
    /// Subject of the client certificate, in QEMU's DN string form
    /// (`O=Example Org,CN=host.example.com`, attributes in encoding order).
    pub client_dn: String,
    pub days: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            hostnames: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            client_dn: DEFAULT_CLIENT_DN.into(),
            days: 365,
        }
    }
}

/// Creates ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem,
/// client-cert.pem and client-key.pem in `dir`.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<(), PkiError> {
    let ca_path = dir.join(CA_CERT);
    if ca_path.exists() {
        return Err(PkiError::CaExists { path: ca_path });
    }
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let (ca, ca_key) = make_ca(opts.days)?;
    write_file(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
    write_file(&ca_path, &ca.pem(), false)?;

    let server_key = KeyPair::generate()?;
    let server = server_params(&opts.hostnames, opts.days)?.signed_by(&server_key, &ca, &ca_key)?;
    write_file(&dir.join(SERVER_KEY), &server_key.serialize_pem(), true)?;
    write_file(&dir.join(SERVER_CERT), &server.pem(), false)?;

    issue_client_into(dir, &ca, &ca_key, &opts.client_dn, opts.days)
}

/// Mints another client certificate from the CA in `ca_dir` into `out`
/// (a new directory that also receives a copy of ca-cert.pem), so that one
/// CA can give each source host its own DN.
pub fn issue_client(ca_dir: &Path, out: &Path, dn: &str, days: u32) -> Result<(), PkiError> {
    let (ca, ca_key) = load_ca(ca_dir)?;
    fs::create_dir_all(out).map_err(|source| PkiError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    write_file(&out.join(CA_CERT), &ca.pem(), false)?;
    issue_client_into(out, &ca, &ca_key, dn, days)
}

/// Adds the certificate in `cert_path` to the CA's revocation list
/// (`ca-crl.pem` in `ca_dir`, created if absent, replaced atomically), valid
/// for `days`. Returns how many certificates the list now revokes. Copy the
/// new ca-crl.pem to the target hosts' directories and reload them.
pub fn revoke(ca_dir: &Path, cert_path: &Path, days: u32) -> Result<usize, PkiError> {
    use rcgen::{CertificateRevocationListParams, RevokedCertParams, SerialNumber};
    use x509_parser::prelude::{FromDer, X509Certificate};

    let (ca, ca_key) = load_ca(ca_dir)?;
    let parse_err = |path: &Path, why: String| PkiError::Parse {
        path: path.to_path_buf(),
        why,
    };
    let pem = fs::read(cert_path).map_err(|source| PkiError::Read {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
        .map_err(|e| parse_err(cert_path, e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| parse_err(cert_path, e.to_string()))?;
    let ca_pem = fs::read(ca_dir.join(CA_CERT)).map_err(|source| PkiError::Read {
        path: ca_dir.join(CA_CERT),
        source,
    })?;
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(&ca_pem)
        .map_err(|e| parse_err(&ca_dir.join(CA_CERT), e.to_string()))?;
    let (_, ca_parsed) = X509Certificate::from_der(&ca_der)
        .map_err(|e| parse_err(&ca_dir.join(CA_CERT), e.to_string()))?;
    if cert.issuer().as_raw() != ca_parsed.subject().as_raw()
        || cert.verify_signature(Some(ca_parsed.public_key())).is_err()
    {
        return Err(PkiError::NotOurs {
            path: cert_path.to_path_buf(),
            ca_dir: ca_dir.to_path_buf(),
        });
    }

    // Keep what the current list revokes, and count its number up.
    let crl_path = ca_dir.join(CA_CRL);
    let now = OffsetDateTime::now_utc();
    let mut revoked = Vec::new();
    let mut number: u64 = 1;
    if crl_path.exists() {
        let pem = fs::read(&crl_path).map_err(|source| PkiError::Read {
            path: crl_path.clone(),
            source,
        })?;
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&pem)
            .map_err(|e| parse_err(&crl_path, e.to_string()))?;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            .map_err(|e| parse_err(&crl_path, e.to_string()))?;
        number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0)
            + 1;
        for r in crl.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let serial = cert.raw_serial();
    if !revoked.iter().any(|r| r.serial_number.to_bytes() == serial) {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(serial),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let count = revoked.len();
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(i64::from(days)),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &ca_key)?;
    let tmp = ca_dir.join(format!(".{CA_CRL}.tmp"));
    let _ = fs::remove_file(&tmp);
    write_file(&tmp, &crl.pem()?, false)?;
    fs::rename(&tmp, &crl_path).map_err(|source| PkiError::Write {
        path: crl_path.clone(),
        source,
    })?;
    Ok(count)
}

fn issue_client_into(
    dir: &Path,
    ca: &Certificate,
    ca_key: &KeyPair,
    dn: &str,
    days: u32,
) -> Result<(), PkiError> {
    let key = KeyPair::generate()?;
    let cert = client_params(dn, days)?.signed_by(&key, ca, ca_key)?;
    write_file(&dir.join(CLIENT_KEY), &key.serialize_pem(), true)?;
    write_file(&dir.join(CLIENT_CERT), &cert.pem(), false)
}

fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair), PkiError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|source| PkiError::Read { path, source })
    };
    // The CA's key is held to the rule of every private key miggate reads.
    let pem = read_private(&dir.join(CA_KEY))?;
    let key = KeyPair::from_pem(&String::from_utf8_lossy(&pem))?;
    // Re-creating the CA certificate object from its own params and key
    // yields the same subject and key, which is all signing needs.
    let params = CertificateParams::from_ca_cert_pem(&read(CA_CERT)?)?;
    let ca = params.self_signed(&key)?;
    Ok((ca, key))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // Backdate a little: hosts' clocks are rarely in perfect agreement.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

fn make_ca(days: u32) -> Result<(Certificate, KeyPair), PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "miggate");
    // A random suffix tells two CAs apart in logs and in certtool output.
    let tag: u32 = rand::random();
    dn.push(
        DnType::CommonName,
        format!("miggate migration CA {tag:08x}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn leaf_params(dn: DistinguishedName, days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    params
}

fn server_params(hostnames: &[String], days: u32) -> Result<CertificateParams, PkiError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "miggate");
    dn.push(
        DnType::CommonName,
        hostnames.first().map(String::as_str).unwrap_or("localhost"),
    );
    let mut params = leaf_params(dn, days);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    for name in hostnames {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    Ok(params)
}

fn client_params(dn: &str, days: u32) -> Result<CertificateParams, PkiError> {
    let mut params = leaf_params(parse_dn(dn)?, days);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// Parses `ATTR=value,ATTR=value` (QEMU's order: as encoded) into an rcgen
/// DN. `\,` escapes a comma inside a value. Only the attributes rcgen can
/// encode are accepted; one value per attribute type.
pub fn parse_dn(dn: &str) -> Result<DistinguishedName, PkiError> {
    let bad = |why: &str| PkiError::BadDn {
        dn: dn.to_string(),
        why: why.to_string(),
    };
    let mut out = DistinguishedName::new();
    let mut seen = Vec::new();
    for part in split_unescaped(dn, ',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad("each part must be ATTR=value"))?;
        let ty = match key.trim() {
            "C" => DnType::CountryName,
            "ST" => DnType::StateOrProvinceName,
            "L" => DnType::LocalityName,
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "CN" => DnType::CommonName,
            other => {
                return Err(bad(&format!(
                    "unsupported attribute {other:?} (use C, ST, L, O, OU, CN)"
                )))
            }
        };
        if seen.contains(&ty) {
            return Err(bad("an attribute appears twice"));
        }
        if value.is_empty() {
            return Err(bad("empty value"));
        }
        seen.push(ty.clone());
        // GnuTLS renders a UTF8String country as hex (`C=#0c024742`), so an
        // ACL naming `C=GB` would not match: countries are PrintableString.
        let value = if ty == DnType::CountryName {
            let printable = value
                .to_string()
                .try_into()
                .ok()
                .filter(|_| value.len() == 2)
                .ok_or_else(|| bad("C must be a two-letter country code"))?;
            DnValue::PrintableString(printable)
        } else {
            DnValue::Utf8String(value.to_string())
        };
        out.push(ty, value);
    }
    if seen.is_empty() {
        return Err(bad("empty DN"));
    }
    Ok(out)
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
            }
            c if c == sep => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    // Private keys are readable by their owner only, like QEMU expects of them.
    opts.mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_qemu_layout_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &InitOptions::default()).unwrap();
        for f in [
            CA_CERT,
            CA_KEY,
            SERVER_CERT,
            SERVER_KEY,
            CLIENT_CERT,
            CLIENT_KEY,
        ] {
            assert!(dir.path().join(f).is_file(), "{f} missing");
        }
        let err = init(dir.path(), &InitOptions::default()).unwrap_err();
        assert!(matches!(err, PkiError::CaExists { .. }), "{err}");
    }

    /// The DN given to `pki` is the DN QEMU's tls-authz (and miggate) will see.
    #[test]
    fn issued_client_dn_renders_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let dn = "C=GB,ST=London,L=London,O=Example Org,CN=laptop.example.com";
        let opts = InitOptions {
            client_dn: dn.into(),
            ..Default::default()
        };
        init(dir.path(), &opts).unwrap();
        let pem = fs::read(dir.path().join(CLIENT_CERT)).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(crate::creds::dn::subject_dn(&der).unwrap(), dn);
        assert!(parse_dn("C=GBR,CN=x").is_err());
    }

    #[test]
    fn revoked_client_is_refused_by_the_verifier() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &InitOptions::default()).unwrap();
        let other = dir.path().join("other");
        issue_client(dir.path(), &other, "O=t,CN=other", 30).unwrap();
        assert_eq!(
            revoke(dir.path(), &dir.path().join(CLIENT_CERT), 30).unwrap(),
            1
        );
        // Revoking again keeps the list; a second cert adds to it.
        assert_eq!(
            revoke(dir.path(), &dir.path().join(CLIENT_CERT), 30).unwrap(),
            1
        );
        let cert = |d: &Path| {
            let pem = fs::read(d.join(CLIENT_CERT)).unwrap();
            rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
        };
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            let pem = fs::read(dir.path().join(CA_CERT)).unwrap();
            r.add(rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
                .unwrap();
            std::sync::Arc::new(r)
        };
        let crl_pem = fs::read(dir.path().join(CA_CRL)).unwrap();
        let crl = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&crl_pem).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            crate::creds::tls::provider(),
        )
        .with_crls(vec![crl])
        .build()
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let err = verifier
            .verify_client_cert(&cert(dir.path()), &[], now)
            .unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );
        verifier
            .verify_client_cert(&cert(&other), &[], now)
            .unwrap();
        // A certificate of another CA is not ours to revoke.
        let foreign = tempfile::tempdir().unwrap();
        init(foreign.path(), &InitOptions::default()).unwrap();
        assert!(matches!(
            revoke(dir.path(), &foreign.path().join(CLIENT_CERT), 30),
            Err(PkiError::NotOurs { .. })
        ));
    }

    /// Keys are created 0600 (never written then chmod-ed), whatever the
    /// umask; `pki issue` and `pki revoke` refuse a CA key others can read.
    #[test]
    fn keys_are_created_private_and_an_open_ca_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &InitOptions::default()).unwrap();
        for f in [CA_KEY, SERVER_KEY, CLIENT_KEY] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
        let out = dir.path().join("issued");
        issue_client(dir.path(), &out, "O=t,CN=issued", 30).unwrap();
        assert_eq!(mode(&out.join(CLIENT_KEY)), 0o600);

        let ca_key = dir.path().join(CA_KEY);
        fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = issue_client(dir.path(), &dir.path().join("again"), "O=t,CN=x", 30).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, PkiError::Key(KeyFileError::TooOpen { .. })),
            "{msg}"
        );
        assert!(
            msg.contains("ca-key.pem") && msg.contains("mode 0644"),
            "{msg}"
        );
        assert!(!dir.path().join("again").exists(), "nothing issued");
        let err = revoke(dir.path(), &out.join(CLIENT_CERT), 30).unwrap_err();
        assert!(
            matches!(err, PkiError::Key(KeyFileError::TooOpen { .. })),
            "{err}"
        );
        assert!(!dir.path().join(CA_CRL).exists(), "nothing revoked");
        fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o600)).unwrap();
        revoke(dir.path(), &out.join(CLIENT_CERT), 30).unwrap();
    }

    #[test]
    fn dn_parser_keeps_order_and_rejects_junk() {
        let dn = parse_dn("C=GB,O=Example\\, Org,CN=x").unwrap();
        let order: Vec<_> = dn.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(
            order,
            vec![
                DnType::CountryName,
                DnType::OrganizationName,
                DnType::CommonName
            ]
        );
        assert!(parse_dn("CN").is_err());
        assert!(parse_dn("XX=1").is_err());
        assert!(parse_dn("CN=a,CN=b").is_err());
    }
}
