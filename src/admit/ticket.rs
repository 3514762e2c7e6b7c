//! One-shot migration tickets: 256 random bits, handed once to whoever
//! registered the migration; the daemon keeps only their SHA-256 and compares
//! hashes in constant time. On the source side a [`Ticket`] goes from the
//! API's answer (parsed as it is decoded) to the hello frame without being
//! printed, and its text is zeroed when it is dropped.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Ticket length in bytes (256 bits).
pub const TICKET_BYTES: usize = 32;

/// The secret itself. Its Debug never prints it; dropping it zeroes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket(String);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("a ticket is 64 hex digits, this one has {0} characters")]
    Length(usize),
    #[error("a ticket is made of hex digits")]
    NotHex,
}

impl Ticket {
    pub fn generate() -> Ticket {
        let bytes: [u8; TICKET_BYTES] = rand::random();
        Ticket(hex::encode(bytes))
    }

    /// Parses a ticket as given to the source (surrounding whitespace, as
    /// in a file ending with a newline, is ignored).
    pub fn parse(s: &str) -> Result<Ticket, TicketError> {
        let s = s.trim();
        if s.len() != TICKET_BYTES * 2 {
            return Err(TicketError::Length(s.len()));
        }
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TicketError::NotHex);
        }
        Ok(Ticket(s.to_ascii_lowercase()))
    }

    /// The secret, for handing it to the operator once and for the hello.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TicketHash {
        TicketHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

/// The API's `ticket` member: the text on the way out, parsed on the way in.
impl Serialize for Ticket {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Ticket {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ticket, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        Ticket::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ticket(<redacted>)")
    }
}

/// What the daemon stores.
#[derive(Clone, Copy)]
pub struct TicketHash([u8; 32]);

impl TicketHash {
    /// Constant-time comparison: no timing tells how much of a guess matched.
    pub fn matches(&self, other: &TicketHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TicketHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix of the hash is safe to show and helps correlate logs.
        write!(f, "TicketHash({}…)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_hash() {
        let t = Ticket::generate();
        assert_eq!(t.expose().len(), 64);
        let again = Ticket::parse(&format!("  {}\n", t.expose().to_uppercase())).unwrap();
        assert!(again.hash().matches(&t.hash()));
        assert!(!Ticket::generate().hash().matches(&t.hash()));
        assert_eq!(format!("{t:?}"), "Ticket(<redacted>)");
        assert_eq!(Ticket::parse("abc"), Err(TicketError::Length(3)));
        assert_eq!(Ticket::parse(&"g".repeat(64)), Err(TicketError::NotHex));
    }

    #[test]
    fn json_form_is_the_text_and_is_parsed_on_the_way_in() {
        let t = Ticket::generate();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, format!("\"{}\"", t.expose()));
        let back: Ticket = serde_json::from_str(&json).unwrap();
        assert!(back.hash().matches(&t.hash()));
        let e = serde_json::from_str::<Ticket>("\"abc\"").unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
    }
}
