//! The target gateway's native-TLS postcopy main channels, as the
//! postcopy preempt channel of a source QEMU with its own TLS finds the
//! one it belongs to.
//!
//! Such a source sends no hello, so its preempt channel (no header, no VM
//! identity, silent until the target faults; 7.2 sends an 8-byte
//! `RAM_SAVE_FLAG_EOS` when postcopy starts, see `wire::qemu`) has no
//! binding token to present. The rule, in the spirit of the source
//! gateway's (`joinable`): a native-TLS connection on the static route,
//! whose DN passed authz, and whose first bytes are absent or not a QEMU
//! header, is the preempt channel of the one live native-TLS main channel
//! *from the same DN* whose stream advised postcopy
//! ([`postcopy_advised`], from the admitted prefix or a [`PostcopyTap`]
//! on the relay), once. Nothing is guessed from timing: it waits, under
//! the stall deadline, until its own bytes say what it is or such a main
//! channel exists; two of them from one DN cannot be told apart and are
//! refused, as is a second connection for one main channel.
//!
//! A joined channel goes to the target QEMU its main channel went to
//! (after it: the main channel registers here once connected there), and
//! lives as long as it does (`gate::bounded_by_main`).
//!
//! What this gives a peer: an authorized DN that already has a live
//! postcopy main channel here may attach one connection to it; it could
//! feed that migration anyway. Any other DN, a main channel that does not
//! advise postcopy, has ended or is a miggate source's (which joins by
//! token), gets nothing past the stall deadline and nothing reaches the
//! target QEMU.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::joinable::{PostcopyTap, PostcopyWatch};
use crate::admit::binding::{JoinRefusal, Joined};
use crate::admit::decide::StaticRoute;
use crate::admit::{Refusal, StreamError};
use crate::wire::qemu::{postcopy_advised, SniffError};

struct Main {
    id: u64,
    dn: String,
    route: Arc<StaticRoute>,
    /// Its stream advises postcopy: `None` until known.
    postcopy: Option<bool>,
    joined: bool,
    ended: watch::Receiver<bool>,
}

/// The live native-TLS main channels of one target listener.
pub struct NativeJoins {
    tx: watch::Sender<Vec<Main>>,
    next: AtomicU64,
}

impl Default for NativeJoins {
    fn default() -> Self {
        NativeJoins {
            tx: watch::Sender::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }
}

/// A native-TLS main channel, registered while it lives.
pub struct NativeMain {
    tx: watch::Sender<Vec<Main>>,
    id: u64,
    ended: watch::Sender<bool>,
}

impl PostcopyWatch for NativeMain {
    fn set_postcopy(&self, advised: bool) {
        let id = self.id;
        self.tx.send_modify(|list| {
            if let Some(m) = list.iter_mut().find(|m| m.id == id) {
                m.postcopy = Some(advised);
            }
        });
    }
}

impl Drop for NativeMain {
    fn drop(&mut self) {
        let id = self.id;
        self.tx.send_modify(|list| list.retain(|m| m.id != id));
        self.ended.send_replace(true);
    }
}

/// A connection admitted as a native main channel's preempt channel.
pub struct NativeJoin {
    /// Its main channel's route: the same target QEMU.
    pub route: Arc<StaticRoute>,
    pub joined: Joined,
}

enum Pick {
    Wait,
    Join(u64),
    Refuse(JoinRefusal),
}

/// What a headerless connection from `dn` is, given the live main channels.
fn pick(list: &[Main], dn: &str) -> Pick {
    let mine = || list.iter().filter(|m| m.dn == dn);
    // One that has not shown yet whether it is postcopy could make two.
    if mine().any(|m| m.postcopy.is_none()) {
        return Pick::Wait;
    }
    let postcopy: Vec<&Main> = mine().filter(|m| m.postcopy == Some(true)).collect();
    match postcopy[..] {
        [] => Pick::Wait,
        [m] if m.joined => Pick::Refuse(JoinRefusal::AlreadyJoined),
        [m] => Pick::Join(m.id),
        _ => Pick::Refuse(JoinRefusal::Ambiguous {
            peer: dn.to_string(),
            mains: postcopy.len(),
        }),
    }
}

/// The first bytes of a connection that is not a QEMU stream at all (no
/// magic), as opposed to a header cut short or malformed.
fn headerless(r: &Refusal) -> bool {
    matches!(
        r,
        Refusal::Stream(StreamError::Sniff(SniffError::NotQemu { .. }))
    )
}

impl NativeJoins {
    /// A native-TLS main channel of `dn` on `route`, now connected to the
    /// target QEMU; `prefix` (its first bytes) may already say whether it
    /// advises postcopy, else [`tap`] its relay.
    pub fn main_channel(
        &self,
        dn: &str,
        route: Arc<StaticRoute>,
        prefix: &[u8],
    ) -> Arc<NativeMain> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (ended, ended_rx) = watch::channel(false);
        self.tx.send_modify(|list| {
            list.push(Main {
                id,
                dn: dn.to_string(),
                route,
                postcopy: postcopy_advised(prefix),
                joined: false,
                ended: ended_rx,
            })
        });
        Arc::new(NativeMain {
            tx: self.tx.clone(),
            id,
            ended,
        })
    }

    /// Waits until the headerless connection of `dn` can be judged, and
    /// joins it to its main channel if it may. A refusal ends the wait
    /// only if `refusals_final` (its bytes say it is no main channel);
    /// otherwise it waits on (see [`NativeJoins::read_or_join`]).
    async fn join(&self, dn: &str, refusals_final: bool) -> Result<NativeJoin, JoinRefusal> {
        let mut rx = self.tx.subscribe();
        loop {
            rx.wait_for(|list| match pick(list, dn) {
                Pick::Wait => false,
                Pick::Refuse(_) => refusals_final,
                Pick::Join(_) => true,
            })
            .await
            .expect("the sender lives in self");
            // Decided and marked under the lock: two connections cannot
            // both join one main channel.
            let mut got = None;
            self.tx.send_if_modified(|list| match pick(list, dn) {
                Pick::Wait => false,
                Pick::Refuse(r) => {
                    got = refusals_final.then_some(Err(r));
                    false
                }
                Pick::Join(id) => {
                    let m = list
                        .iter_mut()
                        .find(|m| m.id == id)
                        .expect("picked from the list");
                    m.joined = true;
                    got = Some(Ok(NativeJoin {
                        route: m.route.clone(),
                        joined: Joined::new(m.ended.clone()),
                    }));
                    true
                }
            });
            if let Some(r) = got {
                return r;
            }
        }
    }

    /// One read of a native-TLS connection's first bytes (`read`); while
    /// it has sent nothing (`silent`), it may instead join the postcopy
    /// main channel of its DN `dn`, whichever comes first (its bytes, if
    /// both: they say what it is). A silent connection that may not join
    /// (its main channel is joined already, or there are two) is refused
    /// only at the stall deadline: it may yet send a main channel's header.
    pub async fn read_or_join(
        &self,
        read: impl Future<Output = Result<(), Refusal>>,
        silent: bool,
        dn: &str,
    ) -> Result<Option<NativeJoin>, Refusal> {
        if !silent {
            return read.await.map(|()| None);
        }
        tokio::select! {
            biased;
            r = read => match r {
                Ok(()) => Ok(None),
                Err(Refusal::Silent(secs)) => Err(match pick(&self.tx.borrow(), dn) {
                    Pick::Refuse(r) => r,
                    Pick::Wait | Pick::Join(_) => JoinRefusal::NoPostcopyMain {
                        peer: dn.to_string(),
                        what: format!("peer sent nothing for {secs} s"),
                    },
                }
                .into()),
                Err(r) => Err(r),
            },
            j = self.join(dn, false) => j.map(Some).map_err(Refusal::from),
        }
    }

    /// A native-TLS connection of `dn` refused for its first bytes
    /// (`refusal`): if they are no QEMU stream at all, it is the preempt
    /// channel of its DN's postcopy main channel, if one is there by
    /// `deadline`.
    pub async fn headerless(
        &self,
        refusal: Refusal,
        dn: &str,
        deadline: Instant,
    ) -> Result<NativeJoin, Refusal> {
        if !headerless(&refusal) {
            return Err(refusal);
        }
        match tokio::time::timeout_at(deadline, self.join(dn, true)).await {
            Ok(j) => j.map_err(Refusal::from),
            Err(_) => Err(JoinRefusal::NoPostcopyMain {
                peer: dn.to_string(),
                what: refusal.to_string(),
            }
            .into()),
        }
    }
}

/// The relay's read side of a native main channel: tells it whether its
/// stream advises postcopy. Others pass through.
pub fn tap<S>(inner: S, prefix: &[u8], main: Option<&Arc<NativeMain>>) -> PostcopyTap<S> {
    match main {
        Some(m) => PostcopyTap::new(inner, prefix, m.clone()),
        None => PostcopyTap::passthrough(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::Expectation;
    use crate::authz::AnyVerified;
    use crate::net::Endpoint;
    use std::time::Duration;

    fn route() -> Arc<StaticRoute> {
        Arc::new(StaticRoute {
            forward: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            authz: Arc::new(AnyVerified),
            expect: Expectation::default(),
            nbd: None,
        })
    }

    fn advising() -> Vec<u8> {
        let mut v = b"QEVM\0\0\0\x03\x07\0\0\0\x02pc".to_vec();
        v.extend_from_slice(&[0x08, 0, 1, 0, 0, 0x08, 0, 3, 0, 16]);
        v.extend_from_slice(&[0; 16]);
        v
    }

    async fn join_now(j: &NativeJoins, dn: &str) -> Option<Result<NativeJoin, JoinRefusal>> {
        tokio::time::timeout(Duration::from_millis(50), j.join(dn, true))
            .await
            .ok()
    }

    /// Only the DN's own postcopy main channel, once; a second one of the
    /// DN makes it ambiguous; the joined channel learns when its main ends.
    #[tokio::test]
    async fn joins_the_one_postcopy_main_of_its_dn_once() {
        let j = NativeJoins::default();
        let plain = j.main_channel("CN=a", route(), b"QEVM\0\0\0\x03\x07\0\0\0\x02pc\x01");
        assert!(join_now(&j, "CN=a").await.is_none(), "not postcopy");
        drop(plain);
        let j = NativeJoins::default();
        let pc = j.main_channel("CN=a", route(), &advising());
        assert!(join_now(&j, "CN=b").await.is_none(), "another DN waits");
        let joined = join_now(&j, "CN=a").await.unwrap().unwrap();
        assert!(matches!(
            join_now(&j, "CN=a").await,
            Some(Err(JoinRefusal::AlreadyJoined))
        ));
        // A silent connection is not refused for it while it may yet
        // send a header.
        let silent = tokio::time::timeout(Duration::from_millis(50), j.join("CN=a", false));
        assert!(silent.await.is_err());
        let other = j.main_channel("CN=a", route(), &advising());
        assert!(matches!(
            join_now(&j, "CN=a").await,
            Some(Err(JoinRefusal::Ambiguous { mains: 2, .. }))
        ));
        drop(other);
        let ended = tokio::spawn(async move { joined.joined.main_ended().await });
        drop(pc);
        ended.await.unwrap();
        assert!(
            join_now(&j, "CN=a").await.is_none(),
            "ended: nothing to join"
        );
    }

    /// A main channel whose advise is not known yet is waited for, and a
    /// tap on its stream tells it.
    #[tokio::test]
    async fn waits_for_the_tap_to_say_postcopy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let j = Arc::new(NativeJoins::default());
        let pc = j.main_channel("CN=a", route(), b"QEVM");
        let waiting = tokio::spawn({
            let j = j.clone();
            async move { j.join("CN=a", true).await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let (mut qemu, gw) = tokio::io::duplex(4096);
        let mut tapped = tap(gw, b"QEVM", Some(&pc));
        let bytes = advising();
        qemu.write_all(&bytes[4..]).await.unwrap();
        let mut got = vec![0; bytes.len() - 4];
        tapped.read_exact(&mut got).await.unwrap();
        assert!(waiting.await.unwrap());
    }
}
