//! Experiment (issue 13, item 4): the relay on rustls' unbuffered API, each
//! TLS record sealed and opened in the relay's own buffers instead of
//! passing through tokio-rustls' buffers. Verdict: not kept. Side by side
//! with [`super::relay`] (`miggate bench --relay-variants`) it did not save
//! the 10 % of CPU per GiB that would have justified it (README, "Records
//! sealed in place"), so the gateways do not use it; it stays for the
//! bench, with its tests.
//!
//! Why, read in rustls 0.23's sources (`conn/unbuffered.rs`,
//! `common_state.rs`): `WriteTraffic::encrypt` copies each record's
//! plaintext into a fresh allocation, seals it there and copies the sealed
//! record into the caller's buffer; a record is opened in place in the
//! caller's buffer, and then copied into an allocation that
//! `ReadTraffic::next_record` lends out ("to support in-place decryption in
//! the future"). The copies the experiment set out to remove are still
//! there, inside rustls; what changes is one 256 KiB socket read for many
//! records instead of one read per record.
//!
//! What the relay keeps of [`super::relay`]: TLS 1.3 key updates after
//! every `rekey` plaintext bytes sent (spaced like [`super::rekey`]), the
//! peer's key updates followed, close_notify sent when the plain side ends
//! and required of a strict peer ([`Close`]), half-close (each direction
//! ends on its own), the `ending` rules, the stall timeout, and the
//! flush rule by construction: every record is written to the socket as
//! soon as it is sealed, nothing is held back for a later flush.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::ops::DerefMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ending, Activity, Close, Counters, EndRule, RelayError, TlsEnd, Truncated};

/// Plaintext read per turn, as `BUF`.
const BUF: usize = super::BUF;
/// The largest TLS record (16 KiB of plaintext plus header, content type
/// and the largest AEAD tag rustls uses, with room to spare).
const MAX_RECORD: usize = 16 * 1024 + 5 + 256;

/// An unbuffered rustls connection, client or server.
pub trait Unbuffered: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Send {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// A TLS session over TCP whose records the relay seals and opens itself.
pub struct Tls<C> {
    tcp: TcpStream,
    conn: C,
    /// Received TLS bytes: `rx[start..end]` not yet processed.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Sealed TLS bytes: `tx[tx_start..tx_end]` not yet written.
    tx: Vec<u8>,
    tx_start: usize,
    tx_end: usize,
}

/// TLS client handshake on `tcp`.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<Tls<UnbufferedClientConnection>> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    Tls::new(tcp, conn).handshake().await
}

/// TLS server handshake on `tcp`.
pub async fn accept(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
) -> io::Result<Tls<UnbufferedServerConnection>> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    Tls::new(tcp, conn).handshake().await
}

impl<C: Unbuffered> Tls<C> {
    fn new(tcp: TcpStream, conn: C) -> Self {
        Tls {
            tcp,
            conn,
            rx: vec![0; BUF + MAX_RECORD],
            rx_start: 0,
            rx_end: 0,
            tx: vec![0; BUF + BUF / 8],
            tx_start: 0,
            tx_end: 0,
        }
    }

    /// The negotiated protocol version, ALPN, peer certificates...
    pub fn session(&self) -> &rustls::CommonState {
        &self.conn
    }

    async fn handshake(mut self) -> io::Result<Self> {
        enum Next {
            Process,
            Transmit,
            Read,
            Established,
        }
        loop {
            let status = self.conn.process(&mut self.rx[self.rx_start..self.rx_end]);
            let discard = status.discard;
            let next = match status.state.map_err(tls_error)? {
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, &mut self.tx, &mut self.tx_end)?;
                    Next::Process
                }
                // The encoded bytes are written right below, before
                // anything else.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    Next::Transmit
                }
                ConnectionState::BlockedHandshake => Next::Read,
                // Data that came with the last flight stays queued in
                // rustls for the relay's first turn.
                ConnectionState::WriteTraffic(_) | ConnectionState::ReadTraffic(_) => {
                    Next::Established
                }
                other => return Err(tls_error(format!("unexpected {other:?} in the handshake"))),
            };
            self.rx_start += discard;
            match next {
                Next::Process => {}
                Next::Transmit => {
                    self.tcp
                        .write_all(&self.tx[self.tx_start..self.tx_end])
                        .await?;
                    (self.tx_start, self.tx_end) = (0, 0);
                }
                Next::Read => {
                    compact(&mut self.rx, &mut self.rx_start, &mut self.rx_end);
                    if self.rx_end == self.rx.len() {
                        return Err(tls_error("handshake message larger than the buffer"));
                    }
                    self.tcp.readable().await?;
                    match self.tcp.try_read(&mut self.rx[self.rx_end..]) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => self.rx_end += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Next::Established => return Ok(self),
            }
        }
    }
}

/// Encodes a handshake message (a key update, after the handshake) at
/// `tx[*end..]`, growing `tx` as rustls asks.
fn encode<D>(e: &mut EncodeTlsData<'_, D>, tx: &mut Vec<u8>, end: &mut usize) -> io::Result<()> {
    loop {
        match e.encode(&mut tx[*end..]) {
            Ok(n) => {
                *end += n;
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => tx.resize(*end + s.required_size, 0),
            Err(e) => return Err(tls_error(e)),
        }
    }
}

/// Seals with `f` (data or close_notify) at `tx[*end..]`, growing `tx` as
/// rustls asks.
fn seal(
    tx: &mut Vec<u8>,
    end: &mut usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    loop {
        match f(&mut tx[*end..]) {
            Ok(n) => {
                *end += n;
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) => tx.resize(*end + s.required_size, 0),
            Err(e) => return Err(tls_error(e)),
        }
    }
}

/// Moves the unprocessed bytes `buf[start..end]` to the front.
fn compact(buf: &mut [u8], start: &mut usize, end: &mut usize) {
    if *start > 0 {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
    }
}

/// The plain side: the local QEMU's socket.
pub trait Plain: Send + Sync {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn shutdown_write(&self) -> io::Result<()>;
}

macro_rules! plain {
    ($t:ty) => {
        impl Plain for $t {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn shutdown_write(&self) -> io::Result<()> {
                socket2::SockRef::from(self).shutdown(Shutdown::Write)
            }
        }
    };
}
plain!(TcpStream);
plain!(tokio::net::UnixStream);

/// Which side of the channel the plain socket is: the source gateway's
/// QEMU connected to it (`A`), the target gateway's QEMU is connected to
/// (`B`). Directions and counters are named as in [`super::relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainIs {
    A,
    B,
}

/// Key updates after every `every` plaintext bytes sent, never twice
/// within `min_gap` (as [`super::rekey::Rekeying`]).
#[derive(Debug, Clone, Copy)]
pub struct Rekey {
    pub every: u64,
    pub min_gap: Duration,
}

/// One direction's step that failed (see `PumpError`).
enum Step {
    Read,
    Write,
    Close,
}

/// What [`super::relay`] makes of an I/O error, per direction (`forward`:
/// a->b) and step: a reset or broken pipe once the other direction ended
/// (or, for the forward close, at all) is the peer's goodbye.
fn judge(
    forward: bool,
    step: Step,
    e: io::Error,
    other_done: bool,
    name: &'static str,
) -> Result<(), RelayError> {
    let r = match (forward, step) {
        (true, Step::Write) => Err(e),
        (true, Step::Close) => ending(Err(e), true),
        (_, _) => ending(Err(e), other_done),
    };
    r.map_err(|source| RelayError::Io {
        direction: name,
        source,
    })
}

/// The state of one channel's two directions.
struct Channel<'a, P, C> {
    plain: P,
    tls: Tls<C>,
    /// Plaintext read from the plain side, sealed at once.
    seal_buf: Vec<u8>,
    /// Opened plaintext the plain side has not taken yet.
    out: Vec<u8>,
    out_start: usize,
    out_end: usize,
    plain_eof: bool,
    close_notify_queued: bool,
    seal_done: bool,
    tls_ended: bool,
    open_done: bool,
    rekey: Option<Rekey>,
    since_rekey: u64,
    last_rekey: Option<std::time::Instant>,
    counters: &'a Counters,
    seal_count: &'a AtomicU64,
    open_count: &'a AtomicU64,
}

/// What to do in the write state, once rustls has nothing else to say.
#[derive(Clone, Copy)]
enum Want {
    Nothing,
    /// `seal_buf[from..to]`.
    Seal(usize, usize),
    CloseNotify,
}

/// Whether the next records go out under fresh keys.
fn rekey_due(rekey: Option<Rekey>, since: u64, last: Option<std::time::Instant>) -> bool {
    rekey.is_some_and(|r| since >= r.every && last.map_or(true, |t| t.elapsed() >= r.min_gap))
}

impl<P: Plain, C: Unbuffered> Channel<'_, P, C> {
    /// Runs rustls over the received bytes until it has nothing more to
    /// say: opened records are gathered in `out` (one write for all the
    /// records of one read: writing each 16 KiB record as rustls lends it
    /// out cost more CPU, measured), handshake messages (key updates) go
    /// into `tx`; then seals `want`. Errors are TLS errors.
    fn drive(&mut self, mut want: Want) -> io::Result<()> {
        loop {
            let t = &mut self.tls;
            let status = t.conn.process(&mut t.rx[t.rx_start..t.rx_end]);
            let discard = status.discard;
            let mut done = false;
            match status.state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let data = rec.map_err(tls_error)?.payload;
                        // The plain side is gone: what it would have got is dropped.
                        if self.open_done {
                            continue;
                        }
                        self.open_count
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        if !data.is_empty() {
                            if self.out_start == self.out_end {
                                (self.out_start, self.out_end) = (0, 0);
                            }
                            let end = self.out_end + data.len();
                            if end > self.out.len() {
                                self.out.resize(end, 0);
                            }
                            self.out[self.out_end..end].copy_from_slice(data);
                            self.out_end = end;
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, &mut t.tx, &mut t.tx_end)?,
                // The bytes go out in order with the rest of `tx`.
                ConnectionState::TransmitTlsData(d) => d.done(),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    if !self.tls_ended {
                        self.tls_ended = true;
                        self.counters
                            .tls_end
                            .store(TlsEnd::CloseNotify.to_u8(), Ordering::Relaxed);
                    }
                }
                ConnectionState::WriteTraffic(mut w) => match want {
                    Want::Seal(..) if rekey_due(self.rekey, self.since_rekey, self.last_rekey) => {
                        // rustls hands the KeyUpdate over in the next
                        // turn; the data follows under the fresh keys.
                        w.refresh_traffic_keys().map_err(|e| {
                            io::Error::other(format!("cannot refresh the TLS keys: {e}"))
                        })?;
                        self.since_rekey = 0;
                        self.last_rekey = Some(std::time::Instant::now());
                        self.counters.key_updates.fetch_add(1, Ordering::Relaxed);
                    }
                    Want::Seal(from, to) => {
                        // Up to the next key update, if one is due within.
                        let end = match self.rekey {
                            Some(r) if self.since_rekey < r.every => {
                                to.min(from + (r.every - self.since_rekey) as usize)
                            }
                            _ => to,
                        };
                        let plain = &self.seal_buf[from..end];
                        seal(&mut t.tx, &mut t.tx_end, |out| w.encrypt(plain, out))?;
                        let n = (end - from) as u64;
                        self.since_rekey += n;
                        self.seal_count.fetch_add(n, Ordering::Relaxed);
                        want = if end == to {
                            Want::Nothing
                        } else {
                            Want::Seal(end, to)
                        };
                    }
                    Want::CloseNotify => {
                        seal(&mut t.tx, &mut t.tx_end, |out| w.queue_close_notify(out))?;
                        want = Want::Nothing;
                    }
                    Want::Nothing => done = true,
                },
                ConnectionState::BlockedHandshake => done = true,
                other => return Err(tls_error(format!("unexpected {other:?} while relaying"))),
            }
            t.rx_start += discard;
            if done || (self.tls_ended && matches!(want, Want::Nothing)) {
                return Ok(());
            }
        }
    }
}

/// [`super::relay`] with the TLS side's records sealed and opened here:
/// between `plain` and `tls` until both directions ended, one failed, or
/// nothing moved for `stall`. `tls_close` says how the TLS peer's stream
/// may end.
#[allow(clippy::too_many_arguments)]
pub async fn relay<P: Plain, C: Unbuffered>(
    plain: P,
    plain_is: PlainIs,
    tls: Tls<C>,
    names: (&'static str, &'static str),
    tls_close: Close,
    rekey: Option<Rekey>,
    stall: Duration,
    counters: Arc<Counters>,
) -> Result<(), RelayError> {
    let act = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    // Sealing runs plain -> TLS: a->b when the plain side is `a`.
    let (seal_name, open_name) = match plain_is {
        PlainIs::A => (names.0, names.1),
        PlainIs::B => (names.1, names.0),
    };
    let seal_fwd = plain_is == PlainIs::A;
    let (seal_count, open_count) = match plain_is {
        PlainIs::A => (&counters.forward, &counters.back),
        PlainIs::B => (&counters.back, &counters.forward),
    };
    let mut ch = Channel {
        plain,
        tls,
        seal_buf: vec![0; BUF],
        out: vec![0; BUF],
        out_start: 0,
        out_end: 0,
        plain_eof: false,
        close_notify_queued: false,
        seal_done: false,
        tls_ended: false,
        open_done: false,
        rekey: rekey.map(|r| Rekey {
            every: r.every.max(1),
            ..r
        }),
        since_rekey: 0,
        last_rekey: None,
        counters: &counters,
        seal_count,
        open_count,
    };
    // rustls failing (a record that does not open, a protocol error)
    // cuts the channel; its error comes from what was received.
    let tls_failed = |source: io::Error| RelayError::Io {
        direction: open_name,
        source,
    };
    // Data that came with the handshake's last flight.
    ch.drive(Want::Nothing).map_err(tls_failed)?;
    loop {
        // The opening direction ends once the peer ended and the plain
        // side took everything.
        if ch.tls_ended && !ch.open_done && ch.out_start == ch.out_end {
            ch.open_done = true;
            if let Err(e) = ch.plain.shutdown_write() {
                judge(!seal_fwd, Step::Close, e, ch.seal_done, open_name)?;
            }
        }
        // The sealing direction ends once close_notify went out.
        let tx_empty = ch.tls.tx_start == ch.tls.tx_end;
        if ch.close_notify_queued && !ch.seal_done && tx_empty {
            ch.seal_done = true;
            if let Err(e) = socket2::SockRef::from(&ch.tls.tcp).shutdown(Shutdown::Write) {
                judge(seal_fwd, Step::Close, e, ch.open_done, seal_name)?;
            }
        }
        if ch.plain_eof && !ch.close_notify_queued && tx_empty {
            ch.close_notify_queued = true;
            ch.drive(Want::CloseNotify).map_err(tls_failed)?;
            continue;
        }
        if ch.seal_done && ch.open_done {
            return Ok(());
        }
        let want_plain_read = !ch.plain_eof && tx_empty;
        let want_tls_write = !tx_empty;
        let want_tls_read = !ch.tls_ended && ch.out_start == ch.out_end;
        let want_plain_write = ch.out_start != ch.out_end;
        let deadline = act.last() + stall;
        enum Ready {
            PlainRead,
            TlsWrite,
            TlsRead,
            PlainWrite,
            Timer,
        }
        let ready = tokio::select! {
            r = ch.plain.readable(), if want_plain_read => r.map(|()| Ready::PlainRead),
            r = ch.tls.tcp.writable(), if want_tls_write => r.map(|()| Ready::TlsWrite),
            r = ch.tls.tcp.readable(), if want_tls_read => r.map(|()| Ready::TlsRead),
            r = ch.plain.writable(), if want_plain_write => r.map(|()| Ready::PlainWrite),
            _ = tokio::time::sleep_until(deadline) => Ok(Ready::Timer),
        };
        match ready {
            Ok(Ready::PlainRead) => match ch.plain.try_read(&mut ch.seal_buf) {
                Ok(0) => ch.plain_eof = true,
                Ok(n) => {
                    act.touch();
                    ch.drive(Want::Seal(0, n)).map_err(tls_failed)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // A goodbye: this direction ends without close_notify.
                    judge(seal_fwd, Step::Read, e, ch.open_done, seal_name)?;
                    (ch.plain_eof, ch.close_notify_queued, ch.seal_done) = (true, true, true);
                }
            },
            Ok(Ready::TlsWrite) => {
                let t = &mut ch.tls;
                match t.tcp.try_write(&t.tx[t.tx_start..t.tx_end]) {
                    Ok(n) => {
                        act.touch();
                        t.tx_start += n;
                        if t.tx_start == t.tx_end {
                            (t.tx_start, t.tx_end) = (0, 0);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        judge(seal_fwd, Step::Write, e, ch.open_done, seal_name)?;
                        (ch.plain_eof, ch.close_notify_queued, ch.seal_done) = (true, true, true);
                        (t.tx_start, t.tx_end) = (0, 0);
                    }
                }
            }
            Ok(Ready::TlsRead) => {
                let t = &mut ch.tls;
                compact(&mut t.rx, &mut t.rx_start, &mut t.rx_end);
                match t.tcp.try_read(&mut t.rx[t.rx_end..]) {
                    Ok(0) => {
                        // A TCP EOF without close_notify.
                        ch.tls_ended = true;
                        if let Close::Tls { .. } = tls_close {
                            counters
                                .tls_end
                                .store(TlsEnd::Eof.to_u8(), Ordering::Relaxed);
                        }
                        if let Close::Tls {
                            peer,
                            rule: rule @ (EndRule::Miggate | EndRule::QemuMultifd { .. }),
                        } = tls_close
                        {
                            return Err(RelayError::Truncated {
                                direction: open_name,
                                source: Truncated { peer, rule },
                            });
                        }
                    }
                    Ok(n) => {
                        act.touch();
                        t.rx_end += n;
                        ch.drive(Want::Nothing).map_err(tls_failed)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        if e.kind() == io::ErrorKind::ConnectionReset {
                            counters
                                .tls_end
                                .store(TlsEnd::Reset.to_u8(), Ordering::Relaxed);
                        }
                        judge(!seal_fwd, Step::Read, e, ch.seal_done, open_name)?;
                        (ch.tls_ended, ch.open_done) = (true, true);
                        (ch.out_start, ch.out_end) = (0, 0);
                    }
                }
            }
            Ok(Ready::PlainWrite) => match ch.plain.try_write(&ch.out[ch.out_start..ch.out_end]) {
                Ok(n) => {
                    act.touch();
                    ch.out_start += n;
                    if ch.out_start == ch.out_end {
                        (ch.out_start, ch.out_end) = (0, 0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    judge(!seal_fwd, Step::Write, e, ch.seal_done, open_name)?;
                    (ch.tls_ended, ch.open_done) = (true, true);
                    (ch.out_start, ch.out_end) = (0, 0);
                }
            },
            Ok(Ready::Timer) => {
                if act.last() + stall <= Instant::now() {
                    return Err(RelayError::Stalled(stall));
                }
            }
            // Readiness itself failed (the reactor is gone).
            Err(e) => {
                return Err(RelayError::Io {
                    direction: seal_name,
                    source: e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::{pki, tls};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UnixStream};

    const STALL: Duration = Duration::from_secs(30);

    fn configs() -> (tempfile::TempDir, Arc<ServerConfig>, Arc<ClientConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::init(&pki_dir, &pki::InitOptions::default()).unwrap();
        let server = tls::server_config(&pki_dir, &[]).unwrap();
        let client = tls::client_config(&pki_dir, &[]).unwrap();
        (dir, server, client)
    }

    fn name() -> rustls_pki_types::ServerName<'static> {
        rustls_pki_types::ServerName::try_from("localhost").unwrap()
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| (i * seed + i / 4093) as u8).collect()
    }

    fn rekey(every: u64) -> Option<Rekey> {
        Some(Rekey {
            every,
            min_gap: Duration::ZERO,
        })
    }

    /// Writes `data` into `w` and half-closes it, while reading `r` to
    /// the end.
    async fn exchange(
        mut r: tokio::net::unix::OwnedReadHalf,
        mut w: tokio::net::unix::OwnedWriteHalf,
        data: Vec<u8>,
    ) -> Vec<u8> {
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        drop(writer.await.unwrap());
        got
    }

    /// Source QEMU -> in-place source gateway -> TLS 1.3 on loopback ->
    /// in-place target gateway -> target QEMU: 8 MiB forward and 3 MiB
    /// back at once, both gateways rekeying every 64 KiB they send; both
    /// ends arrive byte for byte, each direction half-closes on its own,
    /// and both gateways saw the other's close_notify.
    #[tokio::test]
    async fn round_trip_with_key_updates_both_ways() {
        let (_dir, server_cfg, client_cfg) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (src_qemu, src_plain) = UnixStream::pair().unwrap();
        let (dst_plain, dst_qemu) = UnixStream::pair().unwrap();
        let (sc, tc) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let names = ("source->target", "target->source");

        let c = tc.clone();
        let target = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = accept(server_cfg, tcp).await.unwrap();
            let close = Close::tls_peer(true, "source");
            relay(
                dst_plain,
                PlainIs::B,
                tls,
                names,
                close,
                rekey(64 << 10),
                STALL,
                c,
            )
            .await
        });
        let c = sc.clone();
        let source = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = connect(client_cfg, name(), tcp).await.unwrap();
            let close = Close::tls_peer(true, "target");
            relay(
                src_plain,
                PlainIs::A,
                tls,
                names,
                close,
                rekey(64 << 10),
                STALL,
                c,
            )
            .await
        });

        let fwd = pattern(8 << 20, 7);
        let back = pattern(3 << 20, 13);
        let (sr, sw) = src_qemu.into_split();
        let (dr, dw) = dst_qemu.into_split();
        let (got_back, got_fwd) = tokio::join!(
            exchange(sr, sw, fwd.clone()),
            exchange(dr, dw, back.clone())
        );
        assert!(got_fwd == fwd, "the target QEMU got corrupted bytes");
        assert!(got_back == back, "the source QEMU got corrupted bytes");
        source.await.unwrap().unwrap();
        target.await.unwrap().unwrap();
        assert_eq!((sc.forward(), sc.back()), (8 << 20, 3 << 20));
        assert_eq!((tc.forward(), tc.back()), (8 << 20, 3 << 20));
        assert!(sc.key_updates() >= 100, "source: {}", sc.key_updates());
        assert!(tc.key_updates() >= 40, "target: {}", tc.key_updates());
        assert_eq!(sc.tls_end(), Some(TlsEnd::CloseNotify));
        assert_eq!(tc.tls_end(), Some(TlsEnd::CloseNotify));
    }

    /// The in-place source gateway against today's target gateway
    /// (tokio-rustls, [`super::super::relay`]): the same wire. A question
    /// gets its answer while both directions stay open (the flush rule),
    /// then the source side half-closes and the answer direction goes on.
    #[tokio::test]
    async fn interoperates_with_the_buffered_relay_and_flushes_each_turn() {
        let (_dir, server_cfg, client_cfg) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (src_qemu, src_plain) = UnixStream::pair().unwrap();
        let (dst_plain, dst_qemu) = UnixStream::pair().unwrap();
        let names = ("source->target", "target->source");
        let target = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server_cfg)
                .accept(tcp)
                .await
                .unwrap();
            let close = (Close::tls_peer(true, "source"), Close::AnyEof);
            super::super::relay(tls, dst_plain, names, close, STALL, Arc::default()).await
        });
        let sc = Arc::new(Counters::default());
        let c = sc.clone();
        let source = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = connect(client_cfg, name(), tcp).await.unwrap();
            let close = Close::tls_peer(true, "target");
            relay(
                src_plain,
                PlainIs::A,
                tls,
                names,
                close,
                rekey(1 << 10),
                STALL,
                c,
            )
            .await
        });
        let (mut sr, mut sw) = src_qemu.into_split();
        let (mut dr, mut dw) = dst_qemu.into_split();
        const WAIT: Duration = Duration::from_secs(10);
        for turn in 0..20u8 {
            let question = vec![turn; 3000];
            sw.write_all(&question).await.unwrap();
            let mut got = vec![0; 3000];
            tokio::time::timeout(WAIT, dr.read_exact(&mut got))
                .await
                .expect("the question was held back")
                .unwrap();
            assert_eq!(got, question);
            dw.write_all(&[turn; 7]).await.unwrap();
            let mut answer = [0; 7];
            tokio::time::timeout(WAIT, sr.read_exact(&mut answer))
                .await
                .expect("the answer was held back")
                .unwrap();
            assert_eq!(answer, [turn; 7]);
        }
        assert!(sc.key_updates() >= 20, "{}", sc.key_updates());
        // Half-close: the source side ends, the target still answers.
        sw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        dr.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        dw.write_all(b"last words").await.unwrap();
        dw.shutdown().await.unwrap();
        let mut last = Vec::new();
        sr.read_to_end(&mut last).await.unwrap();
        assert_eq!(last, b"last words");
        source.await.unwrap().unwrap();
        target.await.unwrap().unwrap();
        assert_eq!(sc.tls_end(), Some(TlsEnd::CloseNotify));
    }

    /// A gateway peer whose TCP stream ends without close_notify: the
    /// bytes before the cut are delivered, and the channel fails as cut.
    #[tokio::test]
    async fn eof_without_close_notify_from_a_gateway_is_a_cut() {
        let (_dir, server_cfg, client_cfg) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dst_plain, mut dst_qemu) = UnixStream::pair().unwrap();
        let tc = Arc::new(Counters::default());
        let c = tc.clone();
        let target = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = accept(server_cfg, tcp).await.unwrap();
            let close = Close::tls_peer(true, "source");
            let names = ("source->target", "target->source");
            relay(dst_plain, PlainIs::B, tls, names, close, None, STALL, c).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client_cfg)
            .connect(name(), tcp)
            .await
            .unwrap();
        tls.write_all(b"half a migration").await.unwrap();
        tls.flush().await.unwrap();
        tls.get_mut().0.shutdown().await.unwrap(); // FIN, no close_notify
        let err = target.await.unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "source->target: the source's TLS stream was cut without close_notify"
        );
        assert_eq!(tc.tls_end(), Some(TlsEnd::Eof));
        let mut got = vec![0; 16];
        dst_qemu.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"half a migration");
    }
}
