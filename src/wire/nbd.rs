//! NBD channels (storage migration): the option haggling of the NBD
//! "fixed newstyle" negotiation, split between the gateways so that the
//! target gateway admits a channel by the export it asks for before a byte
//! reaches the target QEMU's NBD server.
//!
//! The NBD server speaks first, so no gateway can wait for the client's
//! first bytes the way it does for a QEMU migration stream. Instead:
//!
//! ```text
//! source QEMU (NBD client)   source gateway           target gateway        target QEMU (NBD server)
//!   |<- greeting (ours) -------|
//!   |-- client flags --------->|
//!   |-- OPT_STRUCTURED_REPLY ->|  answered here (ACK), kept for replay
//!   |<- ACK -------------------|
//!   |-- OPT_SET_META_CONTEXT -->|  names the export: hello {nbd} + flags +
//!   |    (or GO, INFO, EXPORT_NAME)  kept options + this option --------->|
//!   |                          |                        |  DN, ticket, export checked
//!   |                          |                        |-- connect ----------->|
//!   |                          |                        |<- greeting -----------|
//!   |                          |                        |-- flags, kept opts -->|
//!   |                          |                        |<- ACKs (swallowed) ---|
//!   |                          |<- verdict -------------|-- export option ----->|
//!   |<======================== NBD, both ways (options still checked) ======>|
//! ```
//!
//! What the source gateway answers itself is only what does not name an
//! export: `STRUCTURED_REPLY` (acknowledged, and replayed to the real
//! server, which must acknowledge it too), `EXTENDED_HEADERS` (declined:
//! a 7.2 server has none, and the client falls back), `STARTTLS` and
//! `LIST` (refused: the TLS is miggate's, and no export list leaves the
//! target). Every later option the client sends must name the admitted
//! export ([`OptionCheck`]) until the transmission phase starts.
//!
//! Wire format: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>;
//! QEMU's client is `nbd_receive_negotiate()` in nbd/client.c.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First bytes of a transmission-phase request (simple / extended headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;

/// The greeting's handshake flags, then the client's flags.
pub const GREETING_LEN: usize = 18;
const FLAGS_LEN: usize = 4;
/// An option's header: IHAVEOPT, option, length.
const OPT_HEADER: usize = 16;
/// An option reply's header: magic, option, type, length.
const REPLY_HEADER: usize = 20;
/// Largest option payload accepted: an export name (QEMU caps it at 4096
/// bytes) plus a few meta context queries. Anything bigger is hostile.
pub const MAX_OPTION: usize = 8192;
/// Options a client may send before it names an export (QEMU sends one
/// or two); more is a client that haggles forever.
const MAX_EARLY_OPTIONS: usize = 8;
/// The most the target reads before it knows the export: the client
/// flags, the kept options, and the export-naming option.
pub const SNIFF_MAX: usize = FLAGS_LEN + MAX_EARLY_OPTIONS * OPT_HEADER + OPT_HEADER + MAX_OPTION;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("not an NBD client: its first option starts with {0:02x?} instead of IHAVEOPT")]
    NotOption([u8; 8]),
    #[error("NBD client flags {0:#x} lack FIXED_NEWSTYLE (an old-style NBD client)")]
    NotFixedNewstyle(u32),
    #[error("NBD client flags {0:#x} have bits no NBD client sets")]
    UnknownClientFlags(u32),
    #[error("NBD option {} of {len} bytes (at most {MAX_OPTION})", opt_name(*.opt))]
    OptionTooLarge { opt: u32, len: usize },
    #[error("malformed NBD option {}: {what}", opt_name(*.opt))]
    Malformed { opt: u32, what: &'static str },
    #[error("NBD option {} before the export was named: only STRUCTURED_REPLY may come first", opt_name(*.0))]
    UnexpectedEarly(u32),
    #[error("NBD client sent {MAX_EARLY_OPTIONS} options without naming an export")]
    TooManyOptions,
    #[error("NBD client names export {got:?} after export {admitted:?} was admitted")]
    OtherExport { admitted: String, got: String },
    #[error("NBD option {} is not allowed once the export is admitted", opt_name(*.0))]
    NotAllowedLater(u32),
    #[error("the NBD client aborted the negotiation")]
    Aborted,
    #[error("target QEMU's NBD server sent {0:02x?} instead of an NBD greeting")]
    NotServer([u8; 16]),
    #[error("target QEMU's NBD server lacks handshake flags {missing:#x} that the client asked for (it offers {offered:#x})")]
    ServerFlags { offered: u16, missing: u16 },
    #[error("target QEMU's NBD server answered {} with reply {reply:#x} instead of ACK", opt_name(*.opt))]
    ServerRefused { opt: u32, reply: u32 },
    #[error("target QEMU's NBD server sent a malformed option reply")]
    ServerReply,
    #[error("the NBD client closed the connection during the negotiation")]
    Closed,
    #[error("i/o error in the NBD negotiation: {0}")]
    Io(String),
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NbdError::Closed
        } else {
            NbdError::Io(e.to_string())
        }
    }
}

/// The option's name in the protocol's words, for errors and logs.
pub fn opt_name(opt: u32) -> String {
    let name = match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => return format!("#{opt}"),
    };
    format!("NBD_OPT_{name}")
}

/// One option frame as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptFrame {
    pub opt: u32,
    pub data: Vec<u8>,
}

impl OptFrame {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(OPT_HEADER + self.data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.opt.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// The export this option names, if it is one that names one.
    pub fn export(&self) -> Result<Option<String>, NbdError> {
        let malformed = |what| NbdError::Malformed {
            opt: self.opt,
            what,
        };
        let name = match self.opt {
            // The whole payload is the name.
            OPT_EXPORT_NAME => &self.data[..],
            // u32 name length, name, then info requests or queries.
            OPT_INFO | OPT_GO | OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let len = self
                    .data
                    .get(..4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
                    .ok_or(malformed("no export name length"))?;
                self.data
                    .get(4..4 + len)
                    .ok_or(malformed("export name longer than the option"))?
            }
            _ => return Ok(None),
        };
        String::from_utf8(name.to_vec())
            .map(Some)
            .map_err(|_| malformed("export name is not UTF-8"))
    }
}

/// Parses one option frame at the start of `buf`: `Ok(None)` if more
/// bytes are needed, else the frame and its length.
pub fn parse_option(buf: &[u8]) -> Result<Option<(OptFrame, usize)>, NbdError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    if buf[..8] != IHAVEOPT.to_be_bytes() {
        return Err(NbdError::NotOption(buf[..8].try_into().unwrap()));
    }
    if buf.len() < OPT_HEADER {
        return Ok(None);
    }
    let opt = u32::from_be_bytes(buf[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(buf[12..16].try_into().unwrap()) as usize;
    if len > MAX_OPTION {
        return Err(NbdError::OptionTooLarge { opt, len });
    }
    if buf.len() < OPT_HEADER + len {
        return Ok(None);
    }
    let data = buf[OPT_HEADER..OPT_HEADER + len].to_vec();
    Ok(Some((OptFrame { opt, data }, OPT_HEADER + len)))
}

fn check_client_flags(flags: u32) -> Result<(), NbdError> {
    if flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(NbdError::NotFixedNewstyle(flags));
    }
    if flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(flags));
    }
    Ok(())
}

/// How an NBD client opened, as the target gateway reads it: the client
/// flags, the options the source gateway acknowledged (to replay), and
/// the first option that names an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOpening {
    pub flags: u32,
    /// Acknowledged by the source gateway: replayed to the real server,
    /// whose acknowledgements are swallowed.
    pub kept: Vec<OptFrame>,
    pub naming: OptFrame,
    pub export: String,
    /// Bytes of the buffer this opening used.
    pub used: usize,
}

impl ClientOpening {
    /// The client flags and the kept options, as the server gets them.
    fn head(&self) -> Vec<u8> {
        let mut out = self.flags.to_be_bytes().to_vec();
        for o in &self.kept {
            out.extend(o.encode());
        }
        out
    }
}

/// The target gateway's sniffer: `Ok(None)` while more bytes are needed
/// (never more than [`SNIFF_MAX`]).
pub fn sniff_client(buf: &[u8]) -> Result<Option<ClientOpening>, NbdError> {
    if buf.len() < FLAGS_LEN {
        return Ok(None);
    }
    let flags = u32::from_be_bytes(buf[..4].try_into().unwrap());
    check_client_flags(flags)?;
    let mut at = FLAGS_LEN;
    let mut kept = Vec::new();
    loop {
        let Some((frame, used)) = parse_option(&buf[at..])? else {
            return Ok(None);
        };
        at += used;
        if let Some(export) = frame.export()? {
            return Ok(Some(ClientOpening {
                flags,
                kept,
                naming: frame,
                export,
                used: at,
            }));
        }
        // Only what the source gateway acknowledges, without payload.
        if frame.opt != OPT_STRUCTURED_REPLY || !frame.data.is_empty() {
            return Err(NbdError::UnexpectedEarly(frame.opt));
        }
        if kept.len() == MAX_EARLY_OPTIONS {
            return Err(NbdError::TooManyOptions);
        }
        kept.push(frame);
    }
}

/// What the source gateway learnt from its NBD client before the target
/// was contacted: the bytes for the target (client flags, kept options,
/// the export-naming option) and the option waiting for its answer.
#[derive(Debug)]
pub struct Opening {
    pub prefix: Vec<u8>,
    pub export: String,
    pub naming: OptFrame,
}

async fn read_option<S: AsyncRead + Unpin>(s: &mut S) -> Result<OptFrame, NbdError> {
    let mut head = [0u8; OPT_HEADER];
    s.read_exact(&mut head).await?;
    if head[..8] != IHAVEOPT.to_be_bytes() {
        return Err(NbdError::NotOption(head[..8].try_into().unwrap()));
    }
    let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize;
    if len > MAX_OPTION {
        return Err(NbdError::OptionTooLarge { opt, len });
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).await?;
    Ok(OptFrame { opt, data })
}

/// An option reply frame with an optional message (errors carry one).
pub fn encode_reply(opt: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(REPLY_HEADER + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The source gateway's half: greets the local NBD client as a server
/// would, answers what does not name an export, and returns at the first
/// option that does. The caller bounds it in time.
pub async fn greet_client<S>(s: &mut S) -> Result<Opening, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(GREETING_LEN);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).await?;
    let flags = s.read_u32().await?;
    check_client_flags(flags)?;
    let mut prefix = flags.to_be_bytes().to_vec();
    for _ in 0..MAX_EARLY_OPTIONS {
        let frame = read_option(s).await?;
        if let Some(export) = frame.export()? {
            prefix.extend(frame.encode());
            return Ok(Opening {
                prefix,
                export,
                naming: frame,
            });
        }
        let (reply, msg): (u32, &str) = match frame.opt {
            OPT_STRUCTURED_REPLY if frame.data.is_empty() => {
                prefix.extend(frame.encode());
                (REP_ACK, "")
            }
            OPT_ABORT => {
                s.write_all(&encode_reply(frame.opt, REP_ACK, b"")).await?;
                return Err(NbdError::Aborted);
            }
            OPT_STARTTLS => (
                REP_ERR_POLICY,
                "miggate: this NBD channel is already carried over miggate's TLS; connect without tls-creds",
            ),
            OPT_LIST => (
                REP_ERR_POLICY,
                "miggate: exports are not listed; name the export",
            ),
            // EXTENDED_HEADERS among them: a 7.2 target has none, and the
            // client falls back to structured replies.
            _ => (REP_ERR_UNSUP, ""),
        };
        s.write_all(&encode_reply(frame.opt, reply, msg.as_bytes()))
            .await?;
    }
    Err(NbdError::TooManyOptions)
}

/// Tells the local NBD client why its export was not admitted: an error
/// reply to the option waiting for one, and to every option it tries
/// next, until it gives up (aborts, closes, or sends `EXPORT_NAME`, which
/// has no error reply: the close says it). QEMU's error names the option
/// the server denied; the reason travels as the reply's message, which
/// QEMU shows as a hint. The caller bounds it in time.
pub async fn refuse_client<S>(s: &mut S, naming: &OptFrame, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let msg = format!("miggate: {reason}");
    let mut end = msg.len().min(4096);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg.as_bytes()[..end];
    let mut opt = naming.opt;
    for _ in 0..MAX_EARLY_OPTIONS {
        let reply = match opt {
            OPT_EXPORT_NAME => break,
            OPT_ABORT => encode_reply(opt, REP_ACK, b""),
            _ => encode_reply(opt, REP_ERR_POLICY, msg),
        };
        if s.write_all(&reply).await.is_err() || opt == OPT_ABORT {
            break;
        }
        match read_option(s).await {
            Ok(next) => opt = next.opt,
            Err(_) => break,
        }
    }
    let _ = s.shutdown().await;
}

/// The target gateway's half, once the channel is admitted: opens the
/// real server's negotiation with the client's flags and kept options
/// (swallowing their acknowledgements, which the client already got),
/// then passes the export-naming option on. The caller bounds it in time.
pub async fn open_server<S>(s: &mut S, opening: &ClientOpening) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting).await?;
    if greeting[..8] != NBDMAGIC.to_be_bytes() || greeting[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(NbdError::NotServer(greeting[..16].try_into().unwrap()));
    }
    let offered = u16::from_be_bytes([greeting[16], greeting[17]]);
    let wanted = opening.flags as u16;
    if offered & wanted != wanted {
        return Err(NbdError::ServerFlags {
            offered,
            missing: wanted & !offered,
        });
    }
    s.write_all(&opening.head()).await?;
    for kept in &opening.kept {
        let mut head = [0u8; REPLY_HEADER];
        s.read_exact(&mut head).await?;
        if head[..8] != REPLY_MAGIC.to_be_bytes() {
            return Err(NbdError::ServerReply);
        }
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        if opt != kept.opt || len > MAX_OPTION {
            return Err(NbdError::ServerReply);
        }
        let mut msg = vec![0u8; len];
        s.read_exact(&mut msg).await?;
        if reply != REP_ACK {
            return Err(NbdError::ServerRefused {
                opt: kept.opt,
                reply,
            });
        }
    }
    s.write_all(&opening.naming.encode()).await?;
    s.flush().await?;
    Ok(())
}

/// Checks the options a client sends after its export was admitted:
/// each must name that export (or abort), until the first transmission
/// request, after which bytes pass unchecked. Fed the client's bytes in
/// order; says how many of them may be passed on.
#[derive(Debug)]
pub struct OptionCheck {
    export: String,
    /// Bytes of the current frame seen so far (at most one header and
    /// [`MAX_OPTION`] bytes of payload).
    pending: Vec<u8>,
    transmission: bool,
}

impl OptionCheck {
    pub fn new(export: &str) -> OptionCheck {
        OptionCheck {
            export: export.to_owned(),
            pending: Vec::new(),
            transmission: false,
        }
    }

    /// Past the negotiation: nothing is checked any more.
    pub fn transmission(&self) -> bool {
        self.transmission
    }

    /// Takes `input` (the client's next bytes) and returns the bytes that
    /// may go to the server now: whole checked frames, or anything once
    /// the transmission phase started. Bytes of an incomplete frame are
    /// held until it is complete.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>, NbdError> {
        if self.transmission {
            return Ok(input.to_vec());
        }
        self.pending.extend_from_slice(input);
        let mut out = Vec::new();
        loop {
            if self.pending.len() < 4 {
                return Ok(out);
            }
            let magic = u32::from_be_bytes(self.pending[..4].try_into().unwrap());
            if magic == REQUEST_MAGIC || magic == EXTENDED_REQUEST_MAGIC {
                self.transmission = true;
                out.append(&mut self.pending);
                return Ok(out);
            }
            let Some((frame, used)) = parse_option(&self.pending)? else {
                return Ok(out);
            };
            match frame.export()? {
                Some(e) if e == self.export => {}
                Some(got) => {
                    return Err(NbdError::OtherExport {
                        admitted: self.export.clone(),
                        got,
                    })
                }
                None if frame.opt == OPT_ABORT => {}
                None => return Err(NbdError::NotAllowedLater(frame.opt)),
            }
            out.extend(self.pending.drain(..used));
        }
    }
}

/// A stream whose reads pass through an [`OptionCheck`]: the relay reads
/// the client's side through it, so an option naming another export
/// fails the channel before it reaches the server.
pub struct CheckedReads<S> {
    inner: S,
    /// `None`: not an NBD channel, every read passes.
    check: Option<OptionCheck>,
    /// Checked bytes not yet handed to the reader.
    ready: Vec<u8>,
    at: usize,
}

impl<S> CheckedReads<S> {
    /// `leftover`: client bytes already read past the export-naming option.
    pub fn new(inner: S, export: &str, leftover: &[u8]) -> Result<CheckedReads<S>, NbdError> {
        let mut check = OptionCheck::new(export);
        let ready = check.feed(leftover)?;
        Ok(CheckedReads {
            inner,
            check: Some(check),
            ready,
            at: 0,
        })
    }

    /// Checks nothing (any other channel).
    pub fn passthrough(inner: S) -> CheckedReads<S> {
        CheckedReads {
            inner,
            check: None,
            ready: Vec::new(),
            at: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CheckedReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.at < this.ready.len() {
                let n = (this.ready.len() - this.at).min(buf.remaining());
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                if this.at == this.ready.len() {
                    this.ready.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let check = match &mut this.check {
                Some(c) if !c.transmission() => c,
                _ => return Pin::new(&mut this.inner).poll_read(cx, buf),
            };
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.ready = check.feed(rb.filled()).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
                    })?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CheckedReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(opt: u32, data: &[u8]) -> OptFrame {
        OptFrame {
            opt,
            data: data.to_vec(),
        }
    }

    /// `SET_META_CONTEXT` as QEMU 7.2 sends it (captured through a relay).
    fn meta(export: &str) -> OptFrame {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        opt(OPT_SET_META_CONTEXT, &d)
    }

    fn go(export: &str) -> OptFrame {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&[0, 1, 0, 3]);
        opt(OPT_GO, &d)
    }

    fn qemu_opening(export: &str) -> Vec<u8> {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend(opt(OPT_STRUCTURED_REPLY, b"").encode());
        b.extend(meta(export).encode());
        b
    }

    #[test]
    fn sniffs_qemus_opening_byte_by_byte() {
        let b = qemu_opening("disk0");
        for end in 0..b.len() {
            assert_eq!(sniff_client(&b[..end]), Ok(None), "at {end}");
        }
        let o = sniff_client(&b).unwrap().unwrap();
        assert_eq!(o.export, "disk0");
        assert_eq!(o.kept, vec![opt(OPT_STRUCTURED_REPLY, b"")]);
        assert_eq!(o.naming, meta("disk0"));
        assert_eq!(o.used, b.len());
        let mut head = o.head();
        head.extend(o.naming.encode());
        assert_eq!(head, b, "replayed as sent");
    }

    #[test]
    fn sniff_refuses_what_the_source_gateway_never_sends() {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend(opt(OPT_STARTTLS, b"").encode());
        assert_eq!(
            sniff_client(&b),
            Err(NbdError::UnexpectedEarly(OPT_STARTTLS))
        );
        assert_eq!(
            sniff_client(&0u32.to_be_bytes()),
            Err(NbdError::NotFixedNewstyle(0))
        );
        assert!(matches!(
            sniff_client(b"\0\0\0\x03QEVM\0\0\0\x03"),
            Err(NbdError::NotOption(_))
        ));
        let mut b = 1u32.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(MAX_OPTION as u32 + 1).to_be_bytes());
        assert!(matches!(
            sniff_client(&b),
            Err(NbdError::OptionTooLarge { .. })
        ));
        let mut b = 1u32.to_be_bytes().to_vec();
        for _ in 0..=MAX_EARLY_OPTIONS {
            b.extend(opt(OPT_STRUCTURED_REPLY, b"").encode());
        }
        assert_eq!(sniff_client(&b), Err(NbdError::TooManyOptions));
        assert!(b.len() < SNIFF_MAX);
    }

    #[test]
    fn export_names_of_every_naming_option() {
        assert_eq!(opt(OPT_EXPORT_NAME, b"d1").export(), Ok(Some("d1".into())));
        assert_eq!(go("d2").export(), Ok(Some("d2".into())));
        assert_eq!(meta("").export(), Ok(Some(String::new())));
        assert_eq!(opt(OPT_STRUCTURED_REPLY, b"").export(), Ok(None));
        assert!(opt(OPT_GO, &[0, 0, 0, 9, b'a']).export().is_err());
        assert!(opt(OPT_INFO, &[0, 0]).export().is_err());
        assert!(opt(OPT_EXPORT_NAME, &[0xff]).export().is_err());
    }

    #[test]
    fn later_options_must_name_the_admitted_export() {
        let mut c = OptionCheck::new("disk0");
        let g = go("disk0").encode();
        // Held until the frame is whole.
        assert_eq!(c.feed(&g[..10]).unwrap(), b"");
        assert_eq!(c.feed(&g[10..]).unwrap(), g);
        let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
        req.extend_from_slice(&[0; 24]);
        assert_eq!(c.feed(&req).unwrap(), req);
        assert!(c.transmission());
        // Anything goes after that (it is data).
        assert_eq!(c.feed(&go("other").encode()).unwrap(), go("other").encode());

        let mut c = OptionCheck::new("disk0");
        assert_eq!(
            c.feed(&go("disk1").encode()),
            Err(NbdError::OtherExport {
                admitted: "disk0".into(),
                got: "disk1".into()
            })
        );
        let mut c = OptionCheck::new("disk0");
        assert_eq!(
            c.feed(&opt(OPT_LIST, b"").encode()),
            Err(NbdError::NotAllowedLater(OPT_LIST))
        );
        let mut c = OptionCheck::new("disk0");
        assert_eq!(c.feed(&opt(OPT_ABORT, b"").encode()).unwrap().len(), 16);
    }

    /// Both halves against each other over in-memory pipes: the client's
    /// view (our greeting, our ACK) and the server's (the replay).
    #[tokio::test]
    async fn greet_then_open_replays_what_was_acknowledged() {
        let (mut client, mut gw) = tokio::io::duplex(1 << 16);
        let client_side = async {
            let mut g = [0u8; GREETING_LEN];
            client.read_exact(&mut g).await.unwrap();
            assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
            client.write_all(&3u32.to_be_bytes()).await.unwrap();
            client
                .write_all(&opt(OPT_EXTENDED_HEADERS, b"").encode())
                .await
                .unwrap();
            let mut r = [0u8; REPLY_HEADER];
            client.read_exact(&mut r).await.unwrap();
            assert_eq!(r[12..16], REP_ERR_UNSUP.to_be_bytes());
            client
                .write_all(&opt(OPT_STRUCTURED_REPLY, b"").encode())
                .await
                .unwrap();
            client.read_exact(&mut r).await.unwrap();
            assert_eq!(r[12..16], REP_ACK.to_be_bytes());
            client.write_all(&meta("disk0").encode()).await.unwrap();
        };
        let (_, opening) = tokio::join!(client_side, greet_client(&mut gw));
        let opening = opening.unwrap();
        assert_eq!(opening.export, "disk0");
        let sniffed = sniff_client(&opening.prefix).unwrap().unwrap();
        assert_eq!(sniffed.export, "disk0");

        let (mut server, mut gw) = tokio::io::duplex(1 << 16);
        let server_side = async {
            let mut g = NBDMAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&3u16.to_be_bytes());
            server.write_all(&g).await.unwrap();
            assert_eq!(server.read_u32().await.unwrap(), 3);
            assert_eq!(
                read_option(&mut server).await.unwrap().opt,
                OPT_STRUCTURED_REPLY
            );
            server
                .write_all(&encode_reply(OPT_STRUCTURED_REPLY, REP_ACK, b""))
                .await
                .unwrap();
            read_option(&mut server).await.unwrap()
        };
        let (naming, r) = tokio::join!(server_side, open_server(&mut gw, &sniffed));
        r.unwrap();
        assert_eq!(naming, meta("disk0"));
    }

    #[tokio::test]
    async fn a_server_without_structured_replies_fails_the_channel() {
        let sniffed = sniff_client(&qemu_opening("d")).unwrap().unwrap();
        let (mut server, mut gw) = tokio::io::duplex(1 << 16);
        let server_side = async {
            let mut g = NBDMAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&1u16.to_be_bytes());
            server.write_all(&g).await.unwrap();
        };
        let (_, r) = tokio::join!(server_side, open_server(&mut gw, &sniffed));
        assert_eq!(
            r,
            Err(NbdError::ServerFlags {
                offered: 1,
                missing: 2
            })
        );
    }
}
