//! The source gateway's main channels, as a postcopy preempt channel finds
//! the one it belongs to.
//!
//! The preempt channel has no header: it is silent until the target faults
//! on a page (see `wire::qemu`). A silent (or unrecognisable) connection is
//! taken as the preempt channel of a main channel from the same local
//! process whose stream advised postcopy and which the target admitted;
//! 7.2 and 10.0 cannot combine postcopy with multifd, so no other channel
//! of such a migration is ever silent. Nothing is guessed from timing: the
//! connection waits (under the stall deadline) until such a main channel
//! exists, or until its own first bytes say what it is.
//!
//! A postcopy main channel that fails (its path was cut) is kept *paused*
//! with its binding token, for the recovery window: the same process's
//! resumed main channel (`wire::qemu::resume_stream`) presents it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::wire::frames::Secret;
use crate::wire::qemu::{postcopy_advised, SNIFF_MAX};

/// How a preempt channel joins its main channel at the target.
#[derive(Debug, Clone)]
pub enum JoinBy {
    /// A miggate target gateway gave the main channel this token.
    Token(Secret),
    /// A target QEMU with native TLS takes the next connection as it.
    Native,
    /// An older miggate target admitted the main channel without a token.
    Unsupported,
}

#[derive(Debug, Clone)]
pub struct MainInfo {
    id: u64,
    /// The local process behind it (unix sockets), if known.
    pid: Option<i32>,
    /// Its stream advises postcopy: `None` until known.
    postcopy: Option<bool>,
    /// Set once the target admitted it.
    join: Option<JoinBy>,
}

impl MainInfo {
    pub fn join(&self) -> Option<&JoinBy> {
        self.join.as_ref()
    }
}

/// A cut postcopy main channel a recovery may resume.
struct Paused {
    pid: Option<i32>,
    /// A token for a miggate target, or `Native`.
    join: JoinBy,
    until: Instant,
}

/// The live main channels of one source gateway, and its paused ones.
#[derive(Clone)]
pub struct Joinable {
    tx: watch::Sender<Vec<MainInfo>>,
    next: Arc<AtomicU64>,
    paused: Arc<Mutex<Vec<Paused>>>,
}

impl Default for Joinable {
    fn default() -> Self {
        Joinable {
            tx: watch::Sender::new(Vec::new()),
            next: Arc::default(),
            paused: Arc::default(),
        }
    }
}

/// Why a connection that could be a preempt channel cannot join one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoJoin {
    #[error("{0} postcopy migrations are running through this listener and the kernel does not say which local process this connection is from: give each migration its own unix socket (--listen unix:... --source-qmp)")]
    Ambiguous(usize),
    #[error("the source QEMU resumes a postcopy migration, but no cut postcopy main channel of this process is paused here (the gateway was restarted, or its recovery window passed)")]
    NothingPaused,
    #[error("{0} cut postcopy migrations are paused on this listener and the kernel does not say which local process this connection is from: give each migration its own unix socket (--listen unix:... --source-qmp)")]
    AmbiguousResume(usize),
}

/// Registered while a main channel lives; dropping it removes it.
pub struct MainEntry {
    joinable: Joinable,
    id: u64,
}

impl MainEntry {
    fn update(&self, f: impl FnOnce(&mut MainInfo)) {
        self.joinable.tx.send_modify(|list| {
            if let Some(m) = list.iter_mut().find(|m| m.id == self.id) {
                f(m);
            }
        });
    }

    /// What its stream says about postcopy (see [`PostcopyTap`]).
    pub fn set_postcopy(&self, advised: bool) {
        self.update(|m| m.postcopy = Some(advised));
    }

    /// The target admitted it; a preempt channel joins it so.
    pub fn admitted(&self, join: JoinBy) {
        self.update(|m| m.join = Some(join));
    }

    /// It failed: a postcopy main channel with a binding token is kept
    /// for the source QEMU's recovery to resume.
    pub fn failed(&self) {
        let list = self.joinable.tx.borrow();
        let Some(m) = list.iter().find(|m| m.id == self.id) else {
            return;
        };
        if let (Some(true), Some(join @ (JoinBy::Token(_) | JoinBy::Native))) =
            (m.postcopy, &m.join)
        {
            let mut paused = self.joinable.lock_paused();
            paused.push(Paused {
                pid: m.pid,
                join: join.clone(),
                until: Instant::now() + crate::timeouts::RECOVERY_WINDOW,
            });
            let excess = paused
                .len()
                .saturating_sub(crate::admit::binding::MAX_PAUSED);
            paused.drain(..excess);
        }
    }
}

impl Drop for MainEntry {
    fn drop(&mut self) {
        let id = self.id;
        self.joinable
            .tx
            .send_modify(|list| list.retain(|m| m.id != id));
    }
}

impl Joinable {
    fn lock_paused(&self) -> std::sync::MutexGuard<'_, Vec<Paused>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A gateway started to carry a recovery it did not see cut (`miggate
    /// migrate --recover`: the first gateway lived in another process):
    /// the cut main channel of `pid`, paused, with the binding token the
    /// target daemon gave for its resumption.
    pub fn with_paused(pid: i32, token: Secret) -> Joinable {
        let j = Joinable::default();
        j.lock_paused().push(Paused {
            pid: Some(pid),
            join: JoinBy::Token(token),
            until: Instant::now() + crate::timeouts::RECOVERY_WINDOW,
        });
        j
    }

    /// How the cut postcopy main channel of `pid` (any, if the pid is not
    /// known and only one is paused) was admitted, taken: one resume each.
    pub fn take_paused(&self, pid: Option<i32>) -> Result<JoinBy, NoJoin> {
        let mut paused = self.lock_paused();
        let now = Instant::now();
        paused.retain(|p| p.until > now);
        let mine: Vec<usize> = (0..paused.len())
            .filter(|&i| pid.is_none() || paused[i].pid.is_none() || paused[i].pid == pid)
            .collect();
        match mine[..] {
            [] => Err(NoJoin::NothingPaused),
            [i] => Ok(paused.remove(i).join),
            _ => Err(NoJoin::AmbiguousResume(mine.len())),
        }
    }

    /// A main channel from `pid` (if known); `postcopy` if its first bytes
    /// already say.
    pub fn register(&self, pid: Option<i32>, postcopy: Option<bool>) -> MainEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.tx.send_modify(|list| {
            list.push(MainInfo {
                id,
                pid,
                postcopy,
                join: None,
            })
        });
        MainEntry {
            joinable: self.clone(),
            id,
        }
    }

    /// Waits until a main channel of `pid` that advised postcopy has been
    /// admitted, and returns it. With no pid (TCP), any such main channel,
    /// if it is the only one.
    pub async fn wait_for_main(&self, pid: Option<i32>) -> Result<MainInfo, NoJoin> {
        let mut rx = self.tx.subscribe();
        let mut found = None;
        rx.wait_for(|list| {
            let mut c = list.iter().filter(|m| {
                m.postcopy == Some(true) && (pid.is_none() || m.pid.is_none() || m.pid == pid)
            });
            found = match (c.next(), c.count()) {
                (None, _) => None,
                (Some(m), 0) => m.join.is_some().then(|| Ok(m.clone())),
                (Some(_), more) => Some(Err(NoJoin::Ambiguous(more + 1))),
            };
            found.is_some()
        })
        .await
        .expect("the sender lives in self");
        found.expect("wait_for returned on a match")
    }

    /// Resolves once the main channel `main` has ended.
    pub async fn ended(&self, main: &MainInfo) {
        let mut rx = self.tx.subscribe();
        let _ = rx
            .wait_for(|list| !list.iter().any(|m| m.id == main.id))
            .await;
    }
}

/// A main channel that a postcopy preempt channel may join, told whether
/// its stream advises postcopy: here, or on the target gateway for a
/// native-TLS source (`native_join`).
pub trait PostcopyWatch: Send + Sync {
    fn set_postcopy(&self, advised: bool);
}

impl PostcopyWatch for MainEntry {
    fn set_postcopy(&self, advised: bool) {
        MainEntry::set_postcopy(self, advised);
    }
}

/// Passes a main channel's bytes through and reads, from the first of
/// them, whether its stream advises postcopy; tells `entry` once known.
pub struct PostcopyTap<S> {
    inner: S,
    seen: Vec<u8>,
    entry: Option<Arc<dyn PostcopyWatch>>,
}

impl<S> PostcopyTap<S> {
    /// `prefix`: the bytes already read from `inner` (and sent on).
    pub fn new(inner: S, prefix: &[u8], entry: Arc<dyn PostcopyWatch>) -> Self {
        let mut tap = PostcopyTap {
            inner,
            seen: prefix.to_vec(),
            entry: Some(entry),
        };
        tap.look(false);
        tap
    }

    /// No main channel to tell: the bytes just pass.
    pub fn passthrough(inner: S) -> Self {
        PostcopyTap {
            inner,
            seen: Vec::new(),
            entry: None,
        }
    }

    /// `ended`: the stream ended (or failed) here, so what is not known
    /// now never will be.
    fn look(&mut self, ended: bool) {
        let verdict = match postcopy_advised(&self.seen) {
            // The advise comes within the first few dozen bytes; a stream
            // that has not shown it by then never will.
            None if self.seen.len() < SNIFF_MAX && !ended => return,
            None => false,
            Some(v) => v,
        };
        if let Some(entry) = self.entry.take() {
            entry.set_postcopy(verdict);
        }
        self.seen = Vec::new();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PostcopyTap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Some(_), Poll::Ready(res)) = (&this.entry, &r) {
            let new = &buf.filled()[before..];
            let room = SNIFF_MAX.saturating_sub(this.seen.len());
            this.seen.extend_from_slice(&new[..new.len().min(room)]);
            this.look(res.is_err() || new.is_empty());
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PostcopyTap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn advising_stream() -> Vec<u8> {
        let mut v = b"QEVM\0\0\0\x03\x07\0\0\0\x02pc".to_vec();
        v.extend_from_slice(&[0x08, 0, 1, 0, 0, 0x08, 0, 3, 0, 16]);
        v.extend_from_slice(&[0; 16]);
        v.extend_from_slice(&[0x01; 100]);
        v
    }

    /// A silent connection waits for a postcopy main channel of its
    /// process to be admitted, not for any main channel.
    #[tokio::test]
    async fn preempt_waits_for_an_admitted_postcopy_main_of_its_process() {
        let j = Joinable::default();
        let other = j.register(Some(7), Some(true));
        other.admitted(JoinBy::Native);
        let waiting = tokio::spawn({
            let j = j.clone();
            async move { j.wait_for_main(Some(42)).await }
        });
        let mine = Arc::new(j.register(Some(42), None));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Its stream advises postcopy, read through the tap.
        let (mut qemu, gw) = tokio::io::duplex(4096);
        let mut tap = PostcopyTap::new(gw, b"QEVM", mine.clone());
        let bytes = advising_stream();
        qemu.write_all(&bytes[4..]).await.unwrap();
        let mut got = vec![0; bytes.len() - 4];
        tap.read_exact(&mut got).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "not admitted yet");
        mine.admitted(JoinBy::Token(Secret::new("t")));
        let found = waiting.await.unwrap().unwrap();
        assert!(matches!(found.join(), Some(JoinBy::Token(_))));
        // It ends with its main channel.
        let ended = tokio::spawn({
            let j = j.clone();
            async move { j.ended(&found).await }
        });
        drop(tap);
        drop(mine);
        ended.await.unwrap();
        drop(other);
    }

    /// A cut postcopy main channel with a token is resumable once, by its
    /// own process; a channel that was not postcopy, or had no token, is not.
    #[tokio::test]
    async fn a_cut_postcopy_main_is_paused_for_its_process() {
        let j = Joinable::default();
        let plain = j.register(Some(1), Some(false));
        plain.admitted(JoinBy::Token(Secret::new("p")));
        plain.failed();
        let old = j.register(Some(1), Some(true));
        old.admitted(JoinBy::Unsupported);
        old.failed();
        assert_eq!(j.take_paused(Some(1)).err(), Some(NoJoin::NothingPaused));
        let cut = j.register(Some(1), Some(true));
        cut.admitted(JoinBy::Token(Secret::new("t1")));
        cut.failed();
        drop(cut);
        assert_eq!(j.take_paused(Some(2)).err(), Some(NoJoin::NothingPaused));
        let Ok(JoinBy::Token(t)) = j.take_paused(Some(1)) else {
            panic!("the cut main channel's token");
        };
        assert_eq!(t.expose(), "t1");
        assert_eq!(j.take_paused(Some(1)).err(), Some(NoJoin::NothingPaused));
    }

    /// Without a pid, two postcopy migrations on one listener cannot be
    /// told apart: refused, not guessed.
    #[tokio::test]
    async fn without_a_pid_two_postcopy_mains_are_ambiguous() {
        let j = Joinable::default();
        let a = j.register(None, Some(true));
        let b = j.register(None, Some(true));
        a.admitted(JoinBy::Native);
        b.admitted(JoinBy::Native);
        assert_eq!(
            j.wait_for_main(None).await.err(),
            Some(NoJoin::Ambiguous(2))
        );
        // A main channel that does not advise postcopy is never joined.
        drop((a, b));
        let plain = j.register(None, Some(false));
        plain.admitted(JoinBy::Native);
        let w = tokio::time::timeout(std::time::Duration::from_millis(50), j.wait_for_main(None));
        assert!(w.await.is_err());
    }

    /// A gateway started for a recovery it did not see cut resumes the
    /// main channel of its QEMU's pid only, once.
    #[test]
    fn a_recovery_gateway_holds_one_paused_entry_for_its_pid() {
        let j = Joinable::with_paused(5, Secret::new("t"));
        assert_eq!(j.take_paused(Some(6)).err(), Some(NoJoin::NothingPaused));
        let Ok(JoinBy::Token(t)) = j.take_paused(Some(5)) else {
            panic!("no token for pid 5")
        };
        assert_eq!(t.expose(), "t");
        assert_eq!(j.take_paused(Some(5)).err(), Some(NoJoin::NothingPaused));
    }
}
