//! miggate's own frames, exchanged only when both ends negotiated the ALPN
//! protocol `miggate/1` (a QEMU with native TLS negotiates none and gets the
//! raw QEMU stream).
//!
//! ```text
//! source gateway                                  target gateway
//!   |-- TLS handshake, ALPN "miggate/1" --------------->|
//!   |-- hello:   "MGH1" | be16 len | JSON {version,..} ->|  identity -> authz
//!   |-- QEMU stream bytes (QEVM... / multifd init) ---->|  sniff -> uuid check
//!   |<- verdict: "MGV1" | u8 0=admitted 1=refused | be16 len | reason (UTF-8)
//!   |<========== QEMU stream, both directions =========>|
//! ```
//! The source starts sending the stream right after its hello, because the
//! target can only check the VM UUID in the stream itself; on refusal the
//! target discards what it read, so nothing reaches the target QEMU.
//!
//! A channel that carries no VM identity of its own (postcopy preempt)
//! joins a main channel instead: the main channel's hello asks for a
//! binding (`bind`), the target answers with a bound verdict carrying a
//! random token, and the joining channel's hello presents it (`join`):
//!
//! ```text
//!   |-- hello {bind: true} + QEVM... ------------------>|  main: uuid checked
//!   |<- verdict: "MGV1" | 2=bound | be16 len | token ---|
//!   |-- hello {join: token} (no stream bytes needed) -->|  same peer, live main
//!   |<- verdict: "MGV1" | 0=admitted | 0 ---------------|
//! ```
//!
//! When the path of a postcopy migration is cut, QEMU pauses on both sides
//! and can resume with a new main channel that has no header (it starts
//! with the commands of the recovery). Its hello presents the cut main
//! channel's token (`resume`) and asks for a new binding, which the
//! reconnecting preempt channel then joins.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HELLO_MAGIC: &[u8; 4] = b"MGH1";
pub const VERDICT_MAGIC: &[u8; 4] = b"MGV1";
/// Frames are tiny; a bigger length is a broken or hostile peer.
pub const MAX_FRAME: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Free-form name of the sending gateway, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The one-shot ticket of a registered migration (managed mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<Secret>,
    /// A main channel asking for a binding token (in a [`Verdict::Bound`])
    /// that its postcopy preempt channel will present.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bind: bool,
    /// The token of the main channel this channel joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<Secret>,
    /// The token of the main channel this one resumes: a postcopy
    /// migration recovering after its path was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Secret>,
    /// An NBD channel (storage migration): after the hello come the NBD
    /// client's opening bytes ([`super::nbd`]), not a QEMU stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nbd: bool,
}

/// A secret as a frame carries it (a ticket, a binding token): the text,
/// not yet judged. The target's admission parses it (a malformed ticket is
/// a refusal with its own reason, not a broken hello); never printed by
/// `Debug`, zeroed on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: &str) -> Secret {
        Secret(text.to_owned())
    }

    /// The text, for the admission check.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Hello {
    fn default() -> Self {
        Hello {
            version: 1,
            agent: Some(format!("miggate/{}", env!("CARGO_PKG_VERSION"))),
            ticket: None,
            bind: false,
            join: None,
            resume: None,
            nbd: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    Refused {
        reason: String,
    },
    /// Admitted, and other channels may join this one with `token`.
    Bound {
        token: Secret,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer sent {got:02x?} where a miggate {what} frame was expected")]
    BadMagic { what: &'static str, got: [u8; 4] },
    #[error("miggate {what} frame too large ({len} bytes)")]
    TooLarge { what: &'static str, len: usize },
    #[error("malformed miggate hello: {0}")]
    BadHello(#[from] serde_json::Error),
    #[error("unknown verdict code {0}")]
    BadVerdict(u8),
    #[error("connection closed before the {what} frame was complete")]
    Closed { what: &'static str },
    #[error("i/o error on the {what} frame: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> FrameError {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed { what }
        } else {
            FrameError::Io { what, source }
        }
    }
}

/// Panics on a hello larger than [`MAX_FRAME`]: every field is bounded
/// where it is made (a fixed agent, 64-hex secrets parsed on the way in),
/// and a length cut to 16 bits would send the peer a garbled frame.
pub fn encode_hello(hello: &Hello) -> Vec<u8> {
    let body = serde_json::to_vec(hello).expect("hello serializes");
    assert!(
        body.len() <= MAX_FRAME,
        "a hello of {} bytes exceeds the frame limit of {MAX_FRAME}",
        body.len()
    );
    let mut out = Vec::with_capacity(6 + body.len());
    out.extend_from_slice(HELLO_MAGIC);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Parses a hello from the start of `buf`. `Ok(None)`: need more bytes.
/// On success returns the hello and how many bytes it used.
pub fn parse_hello(buf: &[u8]) -> Result<Option<(Hello, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    if &buf[..4] != HELLO_MAGIC {
        let mut got = [0u8; 4];
        got.copy_from_slice(&buf[..4]);
        return Err(FrameError::BadMagic { what: "hello", got });
    }
    if buf.len() < 6 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[4], buf[5]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { what: "hello", len });
    }
    if buf.len() < 6 + len {
        return Ok(None);
    }
    let hello = serde_json::from_slice(&buf[6..6 + len])?;
    Ok(Some((hello, 6 + len)))
}

pub fn encode_verdict(v: &Verdict) -> Vec<u8> {
    let (code, reason) = match v {
        Verdict::Admitted => (0u8, ""),
        Verdict::Refused { reason } => (1u8, reason.as_str()),
        Verdict::Bound { token } => (2u8, token.expose()),
    };
    // Truncate on a char boundary so a long reason still fits the frame.
    let mut end = reason.len().min(MAX_FRAME);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut out = Vec::with_capacity(7 + reason.len());
    out.extend_from_slice(VERDICT_MAGIC);
    out.push(code);
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason);
    out
}

pub async fn write_verdict<W: AsyncWrite + Unpin>(w: &mut W, v: &Verdict) -> std::io::Result<()> {
    w.write_all(&encode_verdict(v)).await?;
    w.flush().await
}

/// Reads exactly one verdict frame (and nothing after it).
pub async fn read_verdict<R: AsyncRead + Unpin>(r: &mut R) -> Result<Verdict, FrameError> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head).await.map_err(io_err("verdict"))?;
    if &head[..4] != VERDICT_MAGIC {
        let mut got = [0u8; 4];
        got.copy_from_slice(&head[..4]);
        return Err(FrameError::BadMagic {
            what: "verdict",
            got,
        });
    }
    let len = u16::from_be_bytes([head[5], head[6]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            what: "verdict",
            len,
        });
    }
    let mut reason = vec![0u8; len];
    r.read_exact(&mut reason).await.map_err(io_err("verdict"))?;
    match head[4] {
        0 => Ok(Verdict::Admitted),
        1 => Ok(Verdict::Refused {
            reason: String::from_utf8_lossy(&reason).into_owned(),
        }),
        2 => Ok(Verdict::Bound {
            token: Secret::new(&String::from_utf8_lossy(&reason)),
        }),
        c => Err(FrameError::BadVerdict(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_roundtrip_and_every_prefix_is_incomplete() {
        let bytes = encode_hello(&Hello::default());
        for n in 0..bytes.len() {
            assert!(parse_hello(&bytes[..n]).unwrap().is_none(), "prefix {n}");
        }
        let mut with_tail = bytes.clone();
        with_tail.extend_from_slice(b"QEVM");
        let (hello, used) = parse_hello(&with_tail).unwrap().unwrap();
        assert_eq!(hello, Hello::default());
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn hello_carries_the_ticket_text_but_never_prints_it() {
        let secret = "ab".repeat(32);
        let hello = Hello {
            ticket: Some(Secret::new(&secret)),
            ..Hello::default()
        };
        assert!(!format!("{hello:?}").contains(&secret));
        let (back, _) = parse_hello(&encode_hello(&hello)).unwrap().unwrap();
        assert_eq!(back.ticket.unwrap().expose(), secret);
        // Not judged here: a malformed ticket is admission's to refuse.
        let odd = br#"{"version":1,"ticket":"nope"}"#;
        let mut frame = HELLO_MAGIC.to_vec();
        frame.extend_from_slice(&(odd.len() as u16).to_be_bytes());
        frame.extend_from_slice(odd);
        let (h, _) = parse_hello(&frame).unwrap().unwrap();
        assert_eq!(h.ticket.unwrap().expose(), "nope");
    }

    #[test]
    #[should_panic(expected = "exceeds the frame limit")]
    fn an_oversized_hello_is_never_sent_garbled() {
        let hello = Hello {
            agent: Some("x".repeat(MAX_FRAME)),
            ..Hello::default()
        };
        encode_hello(&hello);
    }

    /// An older gateway's hello (no bind, no join) still parses, and the
    /// new fields are left out when unused.
    #[test]
    fn binding_fields_are_optional() {
        let old = br#"{"version":1,"agent":"miggate/0.1.0"}"#;
        let mut frame = HELLO_MAGIC.to_vec();
        frame.extend_from_slice(&(old.len() as u16).to_be_bytes());
        frame.extend_from_slice(old);
        let (h, _) = parse_hello(&frame).unwrap().unwrap();
        assert!(!h.bind && h.join.is_none());
        let plain = encode_hello(&Hello::default());
        assert!(!String::from_utf8_lossy(&plain).contains("bind"));
        let joining = Hello {
            join: Some(Secret::new("ab")),
            ..Hello::default()
        };
        let (back, _) = parse_hello(&encode_hello(&joining)).unwrap().unwrap();
        assert_eq!(back.join.unwrap().expose(), "ab");
    }

    #[test]
    fn hello_rejects_qemu_stream_and_oversize() {
        assert!(matches!(
            parse_hello(b"QEVM\0\0\0\x03"),
            Err(FrameError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_hello(b"MGH1\xff\xff"),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_hello(b"MGH1\0\x02{x"),
            Err(FrameError::BadHello(_))
        ));
    }

    #[tokio::test]
    async fn verdict_roundtrip_reads_nothing_more() {
        let v = Verdict::Refused {
            reason: "VM UUID mismatch".into(),
        };
        let mut bytes = encode_verdict(&v);
        bytes.extend_from_slice(b"rest");
        let mut r = &bytes[..];
        assert_eq!(read_verdict(&mut r).await.unwrap(), v);
        assert_eq!(r, b"rest");
        let mut r = &encode_verdict(&Verdict::Admitted)[..];
        assert_eq!(read_verdict(&mut r).await.unwrap(), Verdict::Admitted);
        let bound = Verdict::Bound {
            token: Secret::new("0f".repeat(32).as_str()),
        };
        let mut r = &encode_verdict(&bound)[..];
        assert_eq!(read_verdict(&mut r).await.unwrap(), bound);
        assert!(!format!("{bound:?}").contains("0f0f"));
        let mut short = &encode_verdict(&v)[..5];
        assert!(matches!(
            read_verdict(&mut short).await,
            Err(FrameError::Closed { .. })
        ));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// `read_verdict` on an in-memory reader: it never waits, so a
    /// current-thread runtime without I/O or timers does.
    fn read(bytes: &[u8]) -> (Result<Verdict, FrameError>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut r = bytes;
        let v = rt.block_on(read_verdict(&mut r));
        (v, r.to_vec())
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            // Anything, control characters and non-BMP included.
            any::<String>(),
            // What JSON must escape.
            prop::collection::vec(
                prop::sample::select(vec!['"', '\\', '\n', '\u{0}', '\u{1f}', '/', 'é', '😀']),
                0..12
            )
            .prop_map(|v| v.into_iter().collect()),
            // A ticket or a token: 64 hex digits.
            "[0-9a-f]{64}",
        ]
    }

    fn secret() -> impl Strategy<Value = Option<Secret>> {
        prop::option::of(text().prop_map(|s| Secret::new(&s)))
    }

    fn hello() -> impl Strategy<Value = Hello> {
        (
            any::<u32>(),
            prop::option::of(text()),
            secret(),
            any::<bool>(),
            secret(),
            secret(),
        )
            .prop_map(|(version, agent, ticket, bind, join, resume)| Hello {
                nbd: false,
                version,
                agent,
                ticket,
                bind,
                join,
                resume,
            })
    }

    fn verdict() -> impl Strategy<Value = Verdict> {
        prop_oneof![
            Just(Verdict::Admitted),
            text().prop_map(|reason| Verdict::Refused { reason }),
            text().prop_map(|t| Verdict::Bound {
                token: Secret::new(&t)
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn hello_round_trips_and_every_prefix_waits(
            h in hello(),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let bytes = encode_hello(&h);
            for n in 0..bytes.len() {
                prop_assert!(matches!(parse_hello(&bytes[..n]), Ok(None)), "prefix {}", n);
            }
            let mut with_tail = bytes.clone();
            with_tail.extend(&tail);
            let (back, used) = parse_hello(&with_tail)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .expect("whole frame");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, h);
        }

        /// Whatever follows a hello magic, parsing answers without panicking.
        #[test]
        fn hello_parser_never_panics(
            len in prop_oneof![0u16..64, any::<u16>()],
            body in prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    prop::sample::select(br#"{}[]":,\ 0123456789truefalsnulversionagentbindjoin"#.to_vec()),
                ],
                0..64,
            ),
        ) {
            let mut frame = HELLO_MAGIC.to_vec();
            frame.extend(len.to_be_bytes());
            frame.extend(body);
            let _ = parse_hello(&frame);
        }

        #[test]
        fn verdict_round_trips_and_reads_nothing_more(
            v in verdict(),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let bytes = encode_verdict(&v);
            let mut with_tail = bytes.clone();
            with_tail.extend(&tail);
            let (back, rest) = read(&with_tail);
            prop_assert_eq!(back.map_err(|e| TestCaseError::fail(e.to_string()))?, v);
            prop_assert_eq!(rest, tail);
            for n in 0..bytes.len() {
                let (r, _) = read(&bytes[..n]);
                prop_assert!(matches!(r, Err(FrameError::Closed { .. })), "prefix {}", n);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// A reason longer than a frame is cut to the longest prefix that
        /// fits and ends on a character boundary.
        #[test]
        fn long_reason_is_cut_on_a_char_boundary(
            unit in prop::sample::select(vec!["a", "é", "€", "😀", "a😀"]),
            extra in 0usize..8,
        ) {
            let reason = unit.repeat(MAX_FRAME / unit.len() + extra);
            let (back, _) = read(&encode_verdict(&Verdict::Refused { reason: reason.clone() }));
            let Ok(Verdict::Refused { reason: got }) = back else {
                return Err(TestCaseError::fail(format!("{back:?}")));
            };
            prop_assert!(got.len() <= MAX_FRAME);
            prop_assert!(reason.starts_with(&got));
            let next = reason[got.len()..].chars().next().map_or(0, char::len_utf8);
            prop_assert!(got.len() == reason.len() || got.len() + next > MAX_FRAME);
        }
    }
}
