//! Subject DN strings exactly as QEMU's tls-authz receives them from GnuTLS.
//!
//! QEMU 7.2 (`crypto/tlssession.c`, `qcrypto_tls_session_check_certificate`)
//! hands `gnutls_x509_crt_get_dn()` to the authz object; later QEMUs use
//! `gnutls_x509_crt_get_dn2()`. Both are `_gnutls_x509_get_dn(...,
//! GNUTLS_X509_DN_FLAG_COMPAT)` (lib/x509/dn.c), which this module mirrors
//! for GnuTLS 3.7.9. Rules, with the GnuTLS function each comes from:
//!
//! * Order (`_gnutls_x509_get_dn`, COMPAT flag): RDNs in the order they are
//!   encoded, *not* reversed as RFC 4514 (and `certtool -i`) would print.
//! * Separators (`append_elements`): after each AttributeTypeAndValue comes
//!   `+` if its RDN has more values, else `,` unless it is in the last RDN.
//!   Multi-valued RDNs keep their encoded (DER-sorted) order. No spaces.
//!   So an empty trailing RDN leaves a dangling `,`, as GnuTLS does.
//! * Names (`gnutls_x509_dn_oid_name` over `_oid2str`, lib/x509/common.c):
//!   `C ST L O OU CN DC UID EMAIL serialNumber title ...`; unknown OIDs in
//!   dotted form, as are the table entries without a name (PKCS#9
//!   challengePassword, friendlyName, localKeyId, messageDigest).
//! * Values (`_gnutls_x509_dn_to_string`):
//!   - unknown OID, wrong ASN.1 type, constructed or undecodable value:
//!     `#` + lowercase hex of the whole DER TLV (`data2hex`), not escaped;
//!   - DirectoryString attributes (`decode_complex_string`): UTF8String and
//!     PrintableString verbatim; TeletexString verbatim if all of it is
//!     printable ASCII; BMPString converted to UTF-8 (`_gnutls_ucs2_to_utf8`:
//!     one trailing U+0000 dropped, an odd last byte ignored); otherwise
//!     (non-ASCII teletex, UniversalString, bad UTF-16) `#` + hex of the
//!     *content*, which the escaping below then turns into `\#...`;
//!     IA5String is not a DirectoryString choice here and becomes hex. An
//!     empty value makes GnuTLS 3.7.9 fail the whole DN (measured);
//!   - fixed-type attributes (`_gnutls_x509_decode_string`): C, serialNumber
//!     ... PrintableString; DC, EMAIL IA5String; etc. Empty value -> hex;
//!   - a decoded string containing NUL -> hex of the TLV (OCTET STRING
//!     attributes excepted: there GnuTLS fails the whole DN).
//! * Escaping (`str_escape`, common.c): a backslash before `, + " \ < > ;`
//!   anywhere, before `#` or space in first position and before a space in
//!   last position. Nothing else (no hex escapes, `=` and control bytes kept).
//!
//! Where GnuTLS would fail (or, for an empty subject, abort), QEMU denies the
//! peer, and so do we by returning an error. GnuTLS copies string bytes
//! without validating them; a DN that is not UTF-8 cannot appear in a QEMU
//! ACL, so it is refused here too.

/// Why a DN could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum DnError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("certificate subject is empty (QEMU cannot name such a peer and denies it)")]
    EmptySubject,
    #[error("subject attribute {0} has an empty value, which GnuTLS (and so QEMU) refuses")]
    EmptyValue(String),
    #[error("subject attribute {0} contains a NUL byte, which GnuTLS (and so QEMU) refuses")]
    EmbeddedNul(String),
    #[error("subject DN is not valid UTF-8, so no QEMU ACL can name it")]
    NotUtf8,
}

/// Renders the subject DN of a DER-encoded certificate the way GnuTLS
/// `gnutls_x509_crt_get_dn()` does.
pub fn subject_dn(cert_der: &[u8]) -> Result<String, DnError> {
    let name = subject_name(cert_der)?;
    let rdns = Der(name.content).all()?;
    let mut out = Vec::new();
    let mut avas = 0;
    for (i, rdn) in rdns.iter().enumerate() {
        // The schema libtasn1 decodes with: RDNSequence ::= SEQUENCE OF
        // RelativeDistinguishedName ::= SET OF AttributeTypeAndValue. An
        // element of another type fails the certificate's import in GnuTLS.
        if !rdn.is(SET) {
            return Err(parse_err("relative distinguished name is not a SET"));
        }
        let values = Der(rdn.content).all()?;
        for (j, ava) in values.iter().enumerate() {
            render_ava(ava, &mut out)?;
            avas += 1;
            if j + 1 < values.len() {
                out.push(b'+');
            } else if i + 1 < rdns.len() {
                out.push(b',');
            }
        }
    }
    if avas == 0 {
        return Err(DnError::EmptySubject);
    }
    String::from_utf8(out).map_err(|_| DnError::NotUtf8)
}

fn parse_err(what: &str) -> DnError {
    DnError::Parse(what.to_string())
}

/// Walks Certificate -> TBSCertificate -> subject.
fn subject_name(cert_der: &[u8]) -> Result<Tlv<'_>, DnError> {
    let cert = Der(cert_der).one()?;
    let tbs = Der(cert.content).first()?;
    let mut fields = Der(tbs.content).all()?.into_iter();
    let mut next = || {
        fields
            .next()
            .ok_or_else(|| parse_err("TBSCertificate too short"))
    };
    let mut field = next()?;
    if field.class == CONTEXT && field.number == 0 {
        field = next()?; // explicit version
    }
    let _serial = field;
    let _signature = next()?;
    let _issuer = next()?;
    let _validity = next()?;
    let subject = next()?;
    if !subject.is(SEQUENCE) {
        return Err(parse_err("subject is not a SEQUENCE"));
    }
    Ok(subject)
}

fn render_ava(ava: &Tlv, out: &mut Vec<u8>) -> Result<(), DnError> {
    if !ava.is(SEQUENCE) {
        return Err(parse_err("AttributeTypeAndValue is not a SEQUENCE"));
    }
    let mut parts = Der(ava.content).all()?.into_iter();
    let (Some(kind), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(parse_err(
            "AttributeTypeAndValue is not exactly a type and a value",
        ));
    };
    if kind.class != UNIVERSAL || kind.constructed || kind.number != OID {
        return Err(parse_err("attribute type is not an OID"));
    }
    let oid = oid_string(kind.content)?;
    let attr = ATTRS.iter().find(|a| a.oid == oid);
    out.extend_from_slice(attr.and_then(|a| a.name).unwrap_or(&oid).as_bytes());
    out.push(b'=');
    match attr.map(|a| decode_value(a, &value)).transpose()?.flatten() {
        Some(text) => escape(&text, &oid, out),
        None => {
            out.extend_from_slice(hex_value(value.raw).as_bytes());
            Ok(())
        }
    }
}

/// How GnuTLS's `_oid2str` table decodes an attribute value.
#[derive(Clone, Copy)]
enum Syntax {
    /// `PKIX1.DirectoryString` CHOICE, via `decode_complex_string`.
    Directory,
    /// `PKIX1.pkcs-9-challengePassword`: CHOICE of printable and UTF-8.
    Challenge,
    /// One fixed universal string type, via `_gnutls_x509_decode_string`.
    Fixed(u64),
}

struct Attr {
    oid: &'static str,
    name: Option<&'static str>,
    syntax: Syntax,
}

const fn attr(oid: &'static str, name: &'static str, syntax: Syntax) -> Attr {
    Attr {
        oid,
        name: Some(name),
        syntax,
    }
}

const fn unnamed(oid: &'static str, syntax: Syntax) -> Attr {
    Attr {
        oid,
        name: None,
        syntax,
    }
}

const UNIVERSAL: u8 = 0;
const CONTEXT: u8 = 2;
const OCTET_STRING: u64 = 4;
const OID: u64 = 6;
const UTF8: u64 = 12;
const SEQUENCE: u64 = 16;
const SET: u64 = 17;
const NUMERIC: u64 = 18;
const PRINTABLE: u64 = 19;
const TELETEX: u64 = 20;
const IA5: u64 = 22;
const UNIVERSAL_STRING: u64 = 28;
const BMP: u64 = 30;

use Syntax::{Challenge, Directory, Fixed};

/// `_oid2str` of GnuTLS 3.7.9 (lib/x509/common.c), checked entry by entry
/// against libgnutls 3.7.9.
const ATTRS: &[Attr] = &[
    attr("1.3.6.1.5.5.7.9.2", "placeOfBirth", Directory),
    attr("1.3.6.1.5.5.7.9.3", "gender", Fixed(PRINTABLE)),
    attr(
        "1.3.6.1.5.5.7.9.4",
        "countryOfCitizenship",
        Fixed(PRINTABLE),
    ),
    attr("1.3.6.1.5.5.7.9.5", "countryOfResidence", Fixed(PRINTABLE)),
    attr("2.5.4.6", "C", Fixed(PRINTABLE)),
    attr("2.5.4.9", "street", Directory),
    attr("2.5.4.12", "title", Directory),
    attr("2.5.4.10", "O", Directory),
    attr("2.5.4.11", "OU", Directory),
    attr("2.5.4.3", "CN", Directory),
    attr("2.5.4.7", "L", Directory),
    attr("2.5.4.8", "ST", Directory),
    attr("2.5.4.13", "description", Directory),
    attr("2.5.4.5", "serialNumber", Fixed(PRINTABLE)),
    attr("2.5.4.20", "telephoneNumber", Fixed(PRINTABLE)),
    attr("2.5.4.4", "surName", Directory),
    attr("2.5.4.43", "initials", Directory),
    attr("2.5.4.44", "generationQualifier", Directory),
    attr("2.5.4.42", "givenName", Directory),
    attr("2.5.4.65", "pseudonym", Directory),
    attr("2.5.4.46", "dnQualifier", Fixed(PRINTABLE)),
    attr("2.5.4.17", "postalCode", Directory),
    attr("2.5.4.41", "name", Directory),
    attr("2.5.4.15", "businessCategory", Directory),
    attr("0.9.2342.19200300.100.1.25", "DC", Fixed(IA5)),
    attr("0.9.2342.19200300.100.1.1", "UID", Directory),
    attr("1.2.840.113556.1.4.656", "userPrincipalName", Directory),
    attr(
        "1.3.6.1.4.1.311.60.2.1.1",
        "jurisdictionOfIncorporationLocalityName",
        Directory,
    ),
    attr(
        "1.3.6.1.4.1.311.60.2.1.2",
        "jurisdictionOfIncorporationStateOrProvinceName",
        Directory,
    ),
    attr(
        "1.3.6.1.4.1.311.60.2.1.3",
        "jurisdictionOfIncorporationCountryName",
        Fixed(PRINTABLE),
    ),
    attr("1.2.840.113549.1.9.1", "EMAIL", Fixed(IA5)),
    unnamed("1.2.840.113549.1.9.7", Challenge),
    unnamed("1.2.840.113549.1.9.20", Fixed(BMP)),
    unnamed("1.2.840.113549.1.9.21", Fixed(OCTET_STRING)),
    unnamed("1.2.840.113549.1.9.4", Fixed(OCTET_STRING)),
    attr("1.3.6.1.5.5.7.8.5", "XmppAddr", Fixed(UTF8)),
    attr("1.2.643.100.1", "OGRN", Fixed(NUMERIC)),
    attr("1.2.643.100.3", "SNILS", Fixed(NUMERIC)),
    attr("1.2.643.100.5", "OGRNIP", Fixed(NUMERIC)),
    attr("1.2.643.3.131.1.1", "INN", Fixed(NUMERIC)),
];

/// The string GnuTLS escapes for a known attribute, or `None` when it falls
/// back to hex of the whole value.
fn decode_value(attr: &Attr, value: &Tlv) -> Result<Option<Vec<u8>>, DnError> {
    let string_tag = value.class == UNIVERSAL && !value.constructed;
    let content = value.content;
    let text = match attr.syntax {
        // GnuTLS 3.7.9 fails the whole DN on an empty DirectoryString value,
        // whatever its tag (measured; not the hex fallback one would expect).
        Directory if content.is_empty() => return Err(DnError::EmptyValue(attr.oid.into())),
        Directory if string_tag => match value.number {
            UTF8 | PRINTABLE => content.to_vec(),
            TELETEX if content.iter().all(|b| (0x20..0x7f).contains(b)) => content.to_vec(),
            TELETEX | UNIVERSAL_STRING => content_hex(content),
            BMP => bmp_to_utf8(content),
            _ => return Ok(None),
        },
        Challenge if string_tag && !content.is_empty() => match value.number {
            UTF8 | PRINTABLE => content.to_vec(),
            _ => return Ok(None),
        },
        Fixed(tag) if string_tag && value.number == tag && !content.is_empty() => {
            if tag == BMP {
                bmp_to_utf8(content)
            } else {
                content.to_vec()
            }
        }
        _ => return Ok(None),
    };
    // GnuTLS refuses embedded NULs in strings (hex fallback), except for
    // OCTET STRING where str_escape later fails the whole DN.
    let octets = matches!(attr.syntax, Fixed(OCTET_STRING));
    Ok((octets || !text.contains(&0)).then_some(text))
}

/// `_gnutls_ucs2_to_utf8` (big-endian), or `#hex` of the content when the
/// UTF-16 is ill-formed (`make_printable_string`).
fn bmp_to_utf8(content: &[u8]) -> Vec<u8> {
    let mut bytes = content;
    if bytes.len() > 2 && bytes.ends_with(&[0, 0]) {
        bytes = &bytes[..bytes.len() - 2];
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    match String::from_utf16(&units) {
        Ok(s) => s.into_bytes(),
        Err(_) => content_hex(content),
    }
}

/// `#` + hex of string content: still goes through `str_escape` (-> `\#`).
fn content_hex(content: &[u8]) -> Vec<u8> {
    format!("#{}", hex::encode(content)).into_bytes()
}

/// `data2hex`: `#` + hex of the whole TLV, emitted unescaped.
fn hex_value(raw: &[u8]) -> String {
    format!("#{}", hex::encode(raw))
}

/// `str_escape` from lib/x509/common.c.
fn escape(text: &[u8], oid: &str, out: &mut Vec<u8>) -> Result<(), DnError> {
    let last = text.len().saturating_sub(1);
    for (i, &b) in text.iter().enumerate() {
        let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';');
        let edge = (i == 0 && (b == b'#' || b == b' ')) || (i == last && b == b' ');
        if b == 0 {
            return Err(DnError::EmbeddedNul(oid.into()));
        }
        if special || edge {
            out.push(b'\\');
        }
        out.push(b);
    }
    Ok(())
}

/// Dotted form of an OID's content octets, as libtasn1 prints it.
fn oid_string(content: &[u8]) -> Result<String, DnError> {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    let mut fresh = true;
    for &b in content {
        if fresh && b == 0x80 {
            return Err(parse_err("OID arc not minimally encoded"));
        }
        acc = acc
            .checked_mul(128)
            .ok_or_else(|| parse_err("OID arc too large"))?
            | u64::from(b & 0x7f);
        fresh = b & 0x80 == 0;
        if fresh {
            arcs.push(acc);
            acc = 0;
        }
    }
    let Some((&first, rest)) = arcs.split_first().filter(|_| fresh) else {
        return Err(parse_err("truncated OID"));
    };
    let (a, b) = match first {
        0..=39 => (0, first),
        40..=79 => (1, first - 40),
        _ => (2, first - 80),
    };
    let mut s = format!("{a}.{b}");
    for arc in rest {
        s.push_str(&format!(".{arc}"));
    }
    Ok(s)
}

/// One BER/DER element: identifier, contents and the raw encoding.
#[derive(Debug)]
struct Tlv<'a> {
    class: u8,
    constructed: bool,
    number: u64,
    content: &'a [u8],
    raw: &'a [u8],
}

/// A cursor over consecutive elements. Like libtasn1, it accepts the long
/// forms of tags and lengths (GnuTLS imports such certificates) but not
/// indefinite lengths.
struct Der<'a>(&'a [u8]);

impl Tlv<'_> {
    /// A constructed universal element of type `number` (SEQUENCE, SET).
    fn is(&self, number: u64) -> bool {
        self.class == UNIVERSAL && self.constructed && self.number == number
    }
}

impl<'a> Der<'a> {
    fn next(&mut self) -> Result<Tlv<'a>, DnError> {
        let input = self.0;
        let mut pos = 0;
        let mut byte = || {
            let b = *input.get(pos).ok_or_else(|| parse_err("truncated DER"))?;
            pos += 1;
            Ok::<u8, DnError>(b)
        };
        let id = byte()?;
        let mut number = u64::from(id & 0x1f);
        if number == 0x1f {
            number = 0;
            loop {
                let b = byte()?;
                number = (number << 7) | u64::from(b & 0x7f);
                if number > u64::from(u32::MAX) {
                    return Err(parse_err("tag number too large"));
                }
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        let first = byte()?;
        let len = match first {
            0x80 => return Err(parse_err("indefinite length")),
            0..=0x7f => usize::from(first),
            _ => {
                let mut len: usize = 0;
                for _ in 0..(first & 0x7f) {
                    len = len
                        .checked_mul(256)
                        .ok_or_else(|| parse_err("length too large"))?
                        | usize::from(byte()?);
                }
                len
            }
        };
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= input.len())
            .ok_or_else(|| parse_err("truncated DER"))?;
        self.0 = &input[end..];
        Ok(Tlv {
            class: id >> 6,
            constructed: id & 0x20 != 0,
            number,
            content: &input[pos..end],
            raw: &input[..end],
        })
    }

    fn first(mut self) -> Result<Tlv<'a>, DnError> {
        self.next()
    }

    /// Exactly one element, nothing after it.
    fn one(mut self) -> Result<Tlv<'a>, DnError> {
        let tlv = self.next()?;
        if !self.0.is_empty() {
            return Err(parse_err("trailing data after certificate"));
        }
        Ok(tlv)
    }

    fn all(mut self) -> Result<Vec<Tlv<'a>>, DnError> {
        let mut items = Vec::new();
        while !self.0.is_empty() {
            items.push(self.next()?);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    //! Every expected string below was produced by libgnutls 3.7.9's
    //! `gnutls_x509_crt_get_dn()` on the same DER (crates/cli/tests/dn_qemu.rs checks
    //! the ordinary cases against QEMU itself).
    use super::*;
    use rcgen::{
        BmpString, CertificateParams, DistinguishedName, DnType, DnValue, Ia5String, KeyPair,
        PrintableString, TeletexString, UniversalString,
    };

    fn mint(entries: Vec<(DnType, DnValue)>) -> Vec<u8> {
        let mut dn = DistinguishedName::new();
        for (ty, value) in entries {
            dn.push(ty, value);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn custom(oid: &[u64]) -> DnType {
        DnType::CustomDnType(oid.to_vec())
    }

    fn printable(s: &str) -> DnValue {
        DnValue::PrintableString(PrintableString::try_from(s).unwrap())
    }

    fn ia5(s: &str) -> DnValue {
        DnValue::Ia5String(Ia5String::try_from(s).unwrap())
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.into())
    }

    /// A certificate skeleton around `name_hex`: enough for the walk to the
    /// subject, which is all `subject_dn` reads.
    fn wrap(name_hex: &str) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            match content.len() {
                n @ 0..=0x7f => out.push(n as u8),
                n => out.extend([0x82, (n >> 8) as u8, n as u8]),
            }
            out.extend_from_slice(content);
            out
        }
        let name = hex::decode(name_hex).unwrap();
        let tbs = [
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &[1]),
            tlv(0x30, &[]),
            tlv(0x30, &[]),
            tlv(0x30, &[]),
            name,
            tlv(0x30, &[]),
        ]
        .concat();
        tlv(
            0x30,
            &[tlv(0x30, &tbs), tlv(0x30, &[]), tlv(0x03, &[0])].concat(),
        )
    }

    fn dn_of(name_hex: &str) -> Result<String, DnError> {
        subject_dn(&wrap(name_hex))
    }

    #[test]
    fn london_example_in_encoded_order() {
        let der = mint(vec![
            (DnType::CountryName, printable("GB")),
            (DnType::StateOrProvinceName, utf8("London")),
            (DnType::LocalityName, utf8("London")),
            (DnType::OrganizationName, utf8("Example Org")),
            (DnType::CommonName, utf8("laptop.example.com")),
        ]);
        assert_eq!(
            subject_dn(&der).unwrap(),
            "C=GB,ST=London,L=London,O=Example Org,CN=laptop.example.com"
        );
    }

    #[test]
    fn country_as_utf8_string_is_hex() {
        // rcgen's default for a &str is UTF8String; GnuTLS wants a
        // PrintableString for C and prints anything else as hex.
        let der = mint(vec![(DnType::CountryName, utf8("GB"))]);
        assert_eq!(subject_dn(&der).unwrap(), "C=#0c024742");
    }

    #[test]
    fn special_characters_are_escaped() {
        let der = mint(vec![
            (DnType::CommonName, utf8("a,b+c\"d\\e;f<g>h=i")),
            (DnType::OrganizationName, utf8(" both ")),
            (DnType::OrganizationalUnitName, utf8("#lead, trail ")),
        ]);
        assert_eq!(
            subject_dn(&der).unwrap(),
            r#"CN=a\,b\+c\"d\\e\;f\<g\>h=i,O=\ both\ ,OU=\#lead\, trail\ "#
        );
    }

    #[test]
    fn utf8_passes_through() {
        let der = mint(vec![(DnType::CommonName, utf8("Zürich Ünïcode 東京"))]);
        assert_eq!(subject_dn(&der).unwrap(), "CN=Zürich Ünïcode 東京");
    }

    #[test]
    fn string_types() {
        let der = mint(vec![
            (
                DnType::CommonName,
                DnValue::BmpString(BmpString::try_from("Zürich").unwrap()),
            ),
            (
                DnType::OrganizationName,
                DnValue::TeletexString(TeletexString::try_from("tele tex").unwrap()),
            ),
            (
                DnType::OrganizationalUnitName,
                DnValue::UniversalString(UniversalString::try_from("ab").unwrap()),
            ),
            (DnType::LocalityName, ia5("ia5")),
        ]);
        assert_eq!(
            subject_dn(&der).unwrap(),
            r"CN=Zürich,O=tele tex,OU=\#0000006100000062,L=#1603696135"
        );
    }

    #[test]
    fn named_and_unknown_attributes() {
        let der = mint(vec![
            (custom(&[0, 9, 2342, 19200300, 100, 1, 25]), ia5("example")),
            (custom(&[0, 9, 2342, 19200300, 100, 1, 1]), utf8("joe")),
            (custom(&[2, 5, 4, 5]), printable("1234")),
            (
                custom(&[1, 2, 840, 113549, 1, 9, 1]),
                ia5("joe@example.com"),
            ),
            (custom(&[1, 3, 6, 1, 4, 1, 99999, 1]), utf8("hello")),
        ]);
        assert_eq!(
            subject_dn(&der).unwrap(),
            "DC=example,UID=joe,serialNumber=1234,EMAIL=joe@example.com,\
             1.3.6.1.4.1.99999.1=#0c0568656c6c6f"
        );
    }

    #[test]
    fn openssl_multivalued_rdn_keeps_der_set_order() {
        // openssl req -multivalue-rdn -subj "/O=Org/OU=a+CN=b": DER sorts the SET.
        let name = "3024310c300a060355040a0c034f72673114300806035504030c01623008060355040b0c0161";
        assert_eq!(dn_of(name).unwrap(), "O=Org,CN=b+OU=a");
        // An unsorted SET is printed as encoded, too.
        let unsorted = "301631143008060355040a0c0162300806035504030c0161";
        assert_eq!(dn_of(unsorted).unwrap(), "O=b+CN=a");
    }

    #[test]
    fn openssl_duplicates_dc_and_email() {
        // -subj "/DC=example/DC=com/OU=one/OU=two/CN=joe/emailAddress=joe@example.com"
        let name = "307831173015060a0992268993f22c64011916076578616d706c6531133011060a0992268993\
                    f22c6401191603636f6d310c300a060355040b0c036f6e65310c300a060355040b0c0374776f\
                    310c300a06035504030c036a6f65311e301c06092a864886f70d010901160f6a6f6540657861\
                    6d706c652e636f6d";
        assert_eq!(
            dn_of(name).unwrap(),
            "DC=example,DC=com,OU=one,OU=two,CN=joe,EMAIL=joe@example.com"
        );
    }

    #[test]
    fn openssl_v1_certificate_with_unknown_oid() {
        // openssl req -x509 (no extensions, so no version field), subject
        // "/1.2.3.4=hello/CN=x" via an oid_section.
        const CERT: &str = "\
            308201313081d90214131843ce61267cdb15ded351da404802a3a1f04c300a06082a8648ce3d040302301c\
            310e300c06032a03040c0568656c6c6f310a300806035504030c0178301e170d3236313132333038343732\
            385a170d3236313132343038343732385a301c310e300c06032a03040c0568656c6c6f310a300806035504\
            030c01783059301306072a8648ce3d020106082a8648ce3d0301070342000428d9c4a3bf789c4ea8871b60\
            8dab97d8a7b6d17e2f096c258878644bbccc65a09f2a921fa945e32eb288c2b635d90d3933c576baece978\
            721541c0083afab258300a06082a8648ce3d04030203470030440220682d609d0f6cb9e1c8daff0a477a94\
            747ae61d5aec442e0a74cd30ab61f065f40220233878d8b3812139df04cb75c4811794951a11da1d0c2ebf\
            786cef5d1d6317d8";
        let der = hex::decode(CERT).unwrap();
        assert_eq!(subject_dn(&der).unwrap(), "1.2.3.4=#0c0568656c6c6f,CN=x");
    }

    #[test]
    fn non_string_and_odd_values() {
        let cases = [
            ("300c310a30080603550403020105", "CN=#020105"),
            (
                "30133111300f0603550403140874656c65e9746578",
                r"CN=\#74656c65e9746578",
            ),
            ("300f310d300b06035504031e04d8000061", r"CN=\#d8000061"),
            ("3010310e300c06035504031e050061000000", "CN=a"),
            ("300e310c300a06035504030c03610062", "CN=#0c03610062"),
            ("300b3109300706035504061300", "C=#1300"),
            ("300e310a300806035504030c01783100", "CN=x,"),
            (
                "301c311a300b06035504030c8103616263300b06032a03040c8103616263",
                "CN=abc+1.2.3.4=#0c8103616263",
            ),
            (
                "30263124300f06092a864886f70d01090713027077301106092a864886f70d0109141e040066006e",
                "1.2.840.113549.1.9.7=pw+1.2.840.113549.1.9.20=fn",
            ),
            (
                "301d310c300a06035504031f0c024742310d300b0603550403330413024742",
                "CN=GB,CN=#330413024742",
            ),
        ];
        for (name, want) in cases {
            assert_eq!(dn_of(name).unwrap(), want, "name {name}");
        }
    }

    #[test]
    fn names_gnutls_refuses() {
        let empty_cn = dn_of("300b3109300706035504030c00");
        assert!(
            matches!(empty_cn, Err(DnError::EmptyValue(_))),
            "{empty_cn:?}"
        );
        let nul_octets = dn_of("30133111300f06092a864886f70d01091504026100");
        assert!(
            matches!(nul_octets, Err(DnError::EmbeddedNul(_))),
            "{nul_octets:?}"
        );
        assert!(matches!(dn_of("3000"), Err(DnError::EmptySubject)));
        assert!(matches!(dn_of("30023100"), Err(DnError::EmptySubject)));
        let raw = dn_of("300e310c300a06035504030c0361ff62");
        assert!(matches!(raw, Err(DnError::NotUtf8)), "{raw:?}");
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for der in [
            &b""[..],
            b"\x30",
            b"\x30\x80\x00\x00",
            b"\x30\x03\x30\x01\x02",
            b"\x04\x00",
        ] {
            assert!(matches!(subject_dn(der), Err(DnError::Parse(_))), "{der:?}");
        }
        let mut der = wrap("300e310c300a06035504030c0361ff62");
        der.push(0);
        assert!(matches!(subject_dn(&der), Err(DnError::Parse(_))));
    }

    /// Found by fuzzing (fuzz/regressions/dn/): a Name whose elements are
    /// not SET OF SEQUENCE {type, value} was rendered as if they were;
    /// GnuTLS's DER decoder refuses such a certificate, so QEMU denies it.
    #[test]
    fn rdn_and_ava_types_are_checked() {
        // O=Org, then CN=b and OU=a inside a [UNIVERSAL 18] instead of a SET.
        let not_a_set =
            "3024310c300a060355040a0c034f72673214300806035504030c01623008060355040b0c0161";
        assert!(matches!(dn_of(not_a_set), Err(DnError::Parse(_))));
        // The same with a SET renders.
        let set = "3024310c300a060355040a0c034f72673114300806035504030c01623008060355040b0c0161";
        assert_eq!(dn_of(set).unwrap(), "O=Org,CN=b+OU=a");
        // An AVA that is a SET, not a SEQUENCE.
        assert!(matches!(
            dn_of("300e310c310a06035504030c03616263"),
            Err(DnError::Parse(_))
        ));
        // An attribute type that is a constructed OID (tag 0x26).
        assert!(matches!(
            dn_of("300e310c300a26035504030c03616263"),
            Err(DnError::Parse(_))
        ));
        // An AVA with a third element.
        assert!(matches!(
            dn_of("3011310f300d06035504030c036162630500"),
            Err(DnError::Parse(_))
        ));
    }
}

#[cfg(test)]
mod props {
    //! Random subjects minted with rcgen, rendered, and read back with a
    //! strict RFC 4514 reader written here. GnuTLS's rendering is RFC 4514's
    //! escaping (minus the reversed RDN order, irrelevant to reading it
    //! back), so every value comes back: a string exactly, a hex fallback as
    //! the bytes of the value's DER TLV. The one lossy case is documented in
    //! the module: GnuTLS shows a string it cannot convert (UniversalString,
    //! teletex that is not printable ASCII) as the *text* `#` + hex of its
    //! content, escaped; the model below expects that text, since the
    //! original string cannot be recovered from the DN.
    use super::*;
    use proptest::prelude::*;
    use rcgen::{
        BmpString, CertificateParams, DistinguishedName, DnType, DnValue, Ia5String, KeyPair,
        PrintableString, TeletexString, UniversalString,
    };
    use std::sync::OnceLock;

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// A DirectoryString attribute (CN, O, ...).
        Directory,
        /// Only this universal tag decodes (C: PrintableString, DC: IA5String).
        Fixed(u8),
        /// An OID GnuTLS does not know: always hex.
        Unknown,
    }

    /// (rendered name, OID, kind). rcgen gives each type one RDN of one
    /// value, in the order pushed, and keeps one value per type.
    const TYPES: &[(&str, &[u64], Kind)] = &[
        ("CN", &[2, 5, 4, 3], Kind::Directory),
        ("O", &[2, 5, 4, 10], Kind::Directory),
        ("OU", &[2, 5, 4, 11], Kind::Directory),
        ("L", &[2, 5, 4, 7], Kind::Directory),
        ("ST", &[2, 5, 4, 8], Kind::Directory),
        ("title", &[2, 5, 4, 12], Kind::Directory),
        ("UID", &[0, 9, 2342, 19200300, 100, 1, 1], Kind::Directory),
        ("C", &[2, 5, 4, 6], Kind::Fixed(0x13)),
        ("serialNumber", &[2, 5, 4, 5], Kind::Fixed(0x13)),
        ("DC", &[0, 9, 2342, 19200300, 100, 1, 25], Kind::Fixed(0x16)),
        ("EMAIL", &[1, 2, 840, 113549, 1, 9, 1], Kind::Fixed(0x16)),
        (
            "1.3.6.1.4.1.99999.7",
            &[1, 3, 6, 1, 4, 1, 99999, 7],
            Kind::Unknown,
        ),
    ];

    /// Every character str_escape treats specially, `=` and `#` inside a
    /// value, DEL (teletex-legal, not printable), and non-ASCII of 2, 3 and
    /// 4 bytes (the last one outside the BMP).
    const VALUE_CHARS: &[char] = &[
        'a', 'Z', '0', ' ', ',', '+', '"', '\\', '<', '>', ';', '=', '#', '\u{7f}', 'é', '東', '😀',
    ];

    /// String types rcgen can encode, with their universal tags.
    const STRING_TAGS: &[u8] = &[0x0c, 0x13, 0x14, 0x16, 0x1c, 0x1e];

    fn dn_value(tag: u8, s: &str) -> Option<DnValue> {
        Some(match tag {
            0x0c => DnValue::Utf8String(s.into()),
            0x13 => DnValue::PrintableString(PrintableString::try_from(s).ok()?),
            0x14 => DnValue::TeletexString(TeletexString::try_from(s).ok()?),
            0x16 => DnValue::Ia5String(Ia5String::try_from(s).ok()?),
            0x1c => DnValue::UniversalString(UniversalString::try_from(s).ok()?),
            0x1e => DnValue::BmpString(BmpString::try_from(s).ok()?),
            _ => unreachable!(),
        })
    }

    /// The content octets rcgen writes for `s` as `tag`.
    fn content(tag: u8, s: &str) -> Vec<u8> {
        match tag {
            0x1c => s.chars().flat_map(|c| (c as u32).to_be_bytes()).collect(),
            0x1e => s.encode_utf16().flat_map(u16::to_be_bytes).collect(),
            _ => s.as_bytes().to_vec(),
        }
    }

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = content.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let len = n.to_be_bytes();
            let skip = len.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (len.len() - skip) as u8);
            out.extend_from_slice(&len[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Val {
        Str(String),
        /// An RFC 4514 hexstring: the value's whole DER encoding.
        Hex(Vec<u8>),
    }

    /// What GnuTLS prints for `s` encoded as `tag` under an attribute of `kind`.
    fn expected(kind: Kind, tag: u8, s: &str) -> Val {
        let hex_tlv = || Val::Hex(tlv(tag, &content(tag, s)));
        let content_hex = || Val::Str(format!("#{}", hex::encode(content(tag, s))));
        match kind {
            Kind::Unknown => hex_tlv(),
            Kind::Fixed(want) if want == tag => Val::Str(s.into()),
            Kind::Fixed(_) => hex_tlv(),
            Kind::Directory => match tag {
                0x0c | 0x13 | 0x1e => Val::Str(s.into()),
                0x14 if s.bytes().all(|b| (0x20..0x7f).contains(&b)) => Val::Str(s.into()),
                0x14 | 0x1c => content_hex(),
                _ => hex_tlv(),
            },
        }
    }

    /// An attribute type and its value, as read back.
    type Ava = (String, Val);

    /// Strict RFC 4514 reader: `type=value` pairs separated by `,` or `+`;
    /// in a string value the specials `, + " \ < > ;` appear only escaped,
    /// a leading `#` or space and a trailing space only escaped, and `\` is
    /// followed only by one of those (GnuTLS never writes `\XX` hex pairs);
    /// an unescaped leading `#` starts a hexstring. Returns the pairs and
    /// the separators.
    fn read_dn(dn: &str) -> Result<(Vec<Ava>, Vec<char>), String> {
        let chars: Vec<char> = dn.chars().collect();
        let mut i = 0;
        let (mut avas, mut seps) = (Vec::new(), Vec::new());
        loop {
            let start = i;
            while i < chars.len() && chars[i] != '=' {
                if matches!(chars[i], ',' | '+' | '\\') {
                    return Err(format!("bad attribute type at {i}"));
                }
                i += 1;
            }
            let ty: String = chars[start..i].iter().collect();
            if ty.is_empty() || i == chars.len() {
                return Err(format!("missing type or '=' at {start}"));
            }
            i += 1;
            let value = if chars.get(i) == Some(&'#') {
                i += 1;
                let start = i;
                while i < chars.len() && !matches!(chars[i], ',' | '+') {
                    i += 1;
                }
                let digits: String = chars[start..i].iter().collect();
                if digits.is_empty() || digits.chars().any(|c| c.is_ascii_uppercase()) {
                    return Err(format!("bad hexstring {digits:?}"));
                }
                Val::Hex(hex::decode(&digits).map_err(|e| format!("{digits:?}: {e}"))?)
            } else {
                let mut s = String::new();
                let first = i;
                // Index in `s` of the last escaped character, to tell an
                // escaped trailing space from a bare one.
                let mut last_escaped = None;
                while i < chars.len() && !matches!(chars[i], ',' | '+') {
                    let c = chars[i];
                    if c == '\\' {
                        let Some(&e) = chars.get(i + 1) else {
                            return Err("dangling backslash".into());
                        };
                        let allowed = matches!(e, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
                            || (i == first && matches!(e, '#' | ' '))
                            || (e == ' ' && matches!(chars.get(i + 2), None | Some(',' | '+')));
                        if !allowed {
                            return Err(format!("needless escape of {e:?} at {i}"));
                        }
                        last_escaped = Some(s.chars().count());
                        s.push(e);
                        i += 2;
                        continue;
                    }
                    if matches!(c, '"' | '<' | '>' | ';') || (i == first && c == ' ') {
                        return Err(format!("unescaped {c:?} at {i}"));
                    }
                    s.push(c);
                    i += 1;
                }
                let n = s.chars().count();
                if s.ends_with(' ') && last_escaped != Some(n - 1) {
                    return Err("unescaped trailing space".into());
                }
                Val::Str(s)
            };
            avas.push((ty, value));
            match chars.get(i) {
                None => return Ok((avas, seps)),
                Some(&c) => {
                    seps.push(c);
                    i += 1;
                }
            }
        }
    }

    fn keys() -> &'static [KeyPair; 2] {
        static KEYS: OnceLock<[KeyPair; 2]> = OnceLock::new();
        KEYS.get_or_init(|| [KeyPair::generate().unwrap(), KeyPair::generate().unwrap()])
    }

    fn mint(entries: &[(usize, u8, String)], key: &KeyPair, serial: u64) -> Vec<u8> {
        let mut dn = DistinguishedName::new();
        for (t, tag, s) in entries {
            let ty = DnType::from_oid(TYPES[*t].1);
            dn.push(ty, dn_value(*tag, s).unwrap());
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.serial_number = Some(serial.into());
        params.self_signed(key).unwrap().der().to_vec()
    }

    /// 1 to 6 distinct attribute types in random order, each with a
    /// non-empty value in a string type rcgen can encode it in.
    fn subject() -> impl Strategy<Value = Vec<(usize, u8, String)>> {
        let value = prop::collection::vec(prop::sample::select(VALUE_CHARS), 1..8)
            .prop_map(|v| v.into_iter().collect::<String>());
        let entry = (value, prop::sample::select(STRING_TAGS)).prop_map(|(s, tag)| {
            // Fall back to UTF8String where the chosen type cannot hold `s`.
            let tag = if dn_value(tag, &s).is_some() {
                tag
            } else {
                0x0c
            };
            (tag, s)
        });
        (
            Just((0..TYPES.len()).collect::<Vec<_>>()).prop_shuffle(),
            1..=6usize,
            prop::collection::vec(entry, 6),
        )
            .prop_map(|(order, n, entries)| {
                order
                    .into_iter()
                    .take(n)
                    .zip(entries)
                    .map(|(t, (tag, s))| (t, tag, s))
                    .collect()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn rendering_reads_back_as_the_subject(entries in subject(), serial in 1u64..1 << 60) {
            let der = mint(&entries, &keys()[0], serial);
            let dn = subject_dn(&der).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (avas, seps) = read_dn(&dn)
                .map_err(|e| TestCaseError::fail(format!("{dn:?}: {e}")))?;
            // One value per RDN: only ',' separators, and none dangling.
            prop_assert!(seps.iter().all(|&c| c == ','), "{:?}", dn);
            let want: Vec<Ava> = entries
                .iter()
                .map(|(t, tag, s)| (TYPES[*t].0.to_string(), expected(TYPES[*t].2, *tag, s)))
                .collect();
            prop_assert_eq!(avas, want, "{:?}", dn);
        }

        #[test]
        fn multi_valued_rdns_read_back(rdns in hand_built_name()) {
            let name: Vec<u8> = rdns
                .iter()
                .flat_map(|rdn| {
                    let avas: Vec<u8> = rdn
                        .iter()
                        .flat_map(|(t, tag, s)| {
                            let oid = tlv(0x06, &oid_der(TYPES[*t].1));
                            tlv(0x30, &[oid, tlv(*tag, &content(*tag, s))].concat())
                        })
                        .collect();
                    tlv(0x31, &avas)
                })
                .collect();
            let dn = subject_dn(&wrap(tlv(0x30, &name)))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (avas, seps) = read_dn(&dn)
                .map_err(|e| TestCaseError::fail(format!("{dn:?}: {e}")))?;
            let want: Vec<Ava> = rdns
                .iter()
                .flatten()
                .map(|(t, tag, s)| (TYPES[*t].0.to_string(), expected(TYPES[*t].2, *tag, s)))
                .collect();
            let want_seps: Vec<char> = rdns
                .iter()
                .flat_map(|rdn| {
                    let mut v = vec!['+'; rdn.len() - 1];
                    v.push(',');
                    v
                })
                .collect();
            prop_assert_eq!(avas, want, "{:?}", dn);
            prop_assert_eq!(&seps[..], &want_seps[..want_seps.len() - 1], "{:?}", dn);
        }

        /// The DN depends on the subject alone: another key and serial
        /// number (so another signature and issuer-independent fields) give
        /// the same string.
        #[test]
        fn rendering_depends_only_on_the_subject(entries in subject(), serial in 1u64..1 << 60) {
            let a = subject_dn(&mint(&entries, &keys()[0], serial)).unwrap();
            let b = subject_dn(&mint(&entries, &keys()[1], serial ^ 0x5a5a)).unwrap();
            prop_assert_eq!(a, b);
        }
    }

    /// DER content octets of an OID.
    fn oid_der(arcs: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |mut arc: u64| {
            let mut groups = vec![(arc & 0x7f) as u8];
            arc >>= 7;
            while arc > 0 {
                groups.push(0x80 | (arc & 0x7f) as u8);
                arc >>= 7;
            }
            out.extend(groups.iter().rev());
        };
        push(arcs[0] * 40 + arcs[1]);
        arcs[2..].iter().for_each(|&a| push(a));
        out
    }

    /// A certificate skeleton around a subject `Name`: enough for the walk
    /// to the subject, which is all `subject_dn` reads.
    fn wrap(name: Vec<u8>) -> Vec<u8> {
        let tbs = [
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &[1]),
            tlv(0x30, &[]),
            tlv(0x30, &[]),
            tlv(0x30, &[]),
            name,
            tlv(0x30, &[]),
        ]
        .concat();
        tlv(
            0x30,
            &[tlv(0x30, &tbs), tlv(0x30, &[]), tlv(0x03, &[0])].concat(),
        )
    }

    /// What rcgen cannot mint: several values in one RDN (in any order,
    /// as GnuTLS prints a SET as encoded), and the same type repeated.
    fn hand_built_name() -> impl Strategy<Value = Vec<Vec<(usize, u8, String)>>> {
        let value = prop::collection::vec(prop::sample::select(VALUE_CHARS), 1..6)
            .prop_map(|v| v.into_iter().collect::<String>());
        let ava =
            (0..TYPES.len(), prop::sample::select(STRING_TAGS), value).prop_map(|(t, tag, s)| {
                let tag = if dn_value(tag, &s).is_some() {
                    tag
                } else {
                    0x0c
                };
                (t, tag, s)
            });
        prop::collection::vec(prop::collection::vec(ava, 1..4), 1..5)
    }

    #[test]
    fn reader_is_strict() {
        let ok = |s: &str| read_dn(s).unwrap().0;
        assert_eq!(
            ok(r"CN=\ a\,b=c\ ,O=#0c0161"),
            [
                ("CN".into(), Val::Str(" a,b=c ".into())),
                ("O".into(), Val::Hex(vec![0x0c, 1, b'a'])),
            ]
        );
        assert_eq!(ok(r"CN=\#x")[0].1, Val::Str("#x".into()));
        for bad in [
            r"CN=a\=b", "CN=a;b", "CN= a", "CN=a ", "CN=#zz", r"CN=a\ b", "CN",
        ] {
            assert!(read_dn(bad).is_err(), "{bad}");
        }
    }
}
