//! The admission decision, in order, as a function of what the gate has
//! read. The gate owns the socket; it feeds [`Admission::decide`] the
//! bytes read so far and does what the answer says:
//!
//! ```text
//! miggate peer (ALPN)?  yes: hello frame --ticket--> registered migration
//!                       |                 (registry, listener)
//!                       no ticket / no hello: static route, authz on the DN
//! then the QEMU stream's first bytes (main / multifd, VM UUID):
//!   static route: expected UUID      registered migration: peer, UUID, slot
//! ```
//!
//! A channel whose hello joins a main channel (the postcopy preempt
//! channel: no header, no UUID) is admitted on its route and binding
//! alone, before any of its bytes; one that resumes a paused main channel
//! (postcopy recovery) on its route, the paused binding and its first
//! bytes being a recovery's ([`super::binding`]).
//!
//! Each call answers [`Step::Read`] (read more, up to a byte cap),
//! [`Step::Refused`] or [`Step::Admitted`]. Nothing here does I/O or waits;
//! only a ticket's admission changes state, in the [`Registry`].

use std::sync::Arc;

use super::binding::{Bindings, Joined, Scope};
use super::registry::{ChannelGuard, Migration, Registry};
use super::ticket::Ticket;
use super::{
    check_identity, check_stream, forward_for, Expectation, NbdRefusal, Refusal, StreamError,
    TicketRefusal,
};
use crate::authz::Authz;
use crate::net::Endpoint;
use crate::wire::frames::{self, Hello, Secret};
use crate::wire::nbd;
use crate::wire::qemu::{self, SniffError, StreamKind, SNIFF_MAX};

/// Where connections without a ticket go, and who may send them.
pub struct StaticRoute {
    pub forward: Endpoint,
    pub authz: Arc<dyn Authz>,
    pub expect: Expectation,
    /// Where NBD channels go, and which exports (`--forward-nbd`,
    /// `--nbd-export`); `None`: NBD channels are refused.
    pub nbd: Option<NbdRoute>,
}

/// The static route's NBD channels: the target QEMU's NBD server, and the
/// exports a client may ask for there.
#[derive(Debug, Clone)]
pub struct NbdRoute {
    pub forward: Endpoint,
    pub exports: Vec<String>,
}

/// What the listener offers a connection: the static route (if any), the
/// registry (managed mode) and this listener's index in the daemon.
pub struct Offer<'a> {
    pub route: Option<Arc<StaticRoute>>,
    pub registry: Option<&'a Registry>,
    pub listener: usize,
    /// Live main channels that other channels may join.
    pub bindings: Option<&'a Bindings>,
}

/// Where an admitted channel goes.
pub enum Route {
    Static(Arc<StaticRoute>),
    Ticket(ChannelGuard),
}

impl Route {
    pub fn forward(&self) -> &Endpoint {
        match self {
            Route::Static(r) => &r.forward,
            Route::Ticket(g) => g.forward(),
        }
    }
}

/// What the gate does next.
pub enum Step {
    /// Read more: the buffer may grow to `max` bytes; `from` of them are
    /// the hello (an empty stream so far when `buf.len() == from`).
    Read {
        from: usize,
        max: usize,
    },
    Refused(Refusal),
    /// Admitted: the QEMU stream starts at `buf[from..]` (replay it).
    Admitted {
        from: usize,
        kind: StreamKind,
        route: Route,
    },
}

enum State {
    Start {
        miggate_peer: bool,
    },
    Stream {
        from: usize,
        route: Option<Arc<StaticRoute>>,
    },
    Resume {
        from: usize,
        route: Option<Arc<StaticRoute>>,
        token: Secret,
    },
    /// An NBD channel: its client's opening follows the hello.
    Nbd {
        from: usize,
        route: Option<Arc<StaticRoute>>,
    },
    Decided,
}

/// One connection's admission.
pub struct Admission<'a> {
    peer_dn: &'a str,
    offer: Offer<'a>,
    state: State,
    migration: Option<Arc<Migration>>,
    kind: Option<StreamKind>,
    /// The hello asked for a binding token (a main channel's).
    bind: bool,
    joined: Option<Joined>,
}

impl<'a> Admission<'a> {
    /// `miggate_peer`: the peer negotiated miggate's ALPN, so it sends a
    /// hello first (QEMU's own TLS sends its stream straight away).
    pub fn new(peer_dn: &'a str, miggate_peer: bool, offer: Offer<'a>) -> Self {
        Admission {
            peer_dn,
            offer,
            state: State::Start { miggate_peer },
            migration: None,
            kind: None,
            bind: false,
            joined: None,
        }
    }

    /// The peer asked for a binding token with this channel.
    pub fn bind_requested(&self) -> bool {
        self.bind
    }

    /// The main channel an admitted joining channel belongs to.
    pub fn take_joined(&mut self) -> Option<Joined> {
        self.joined.take()
    }

    /// The registered migration the peer's ticket named, once known.
    pub fn migration(&self) -> Option<&Arc<Migration>> {
        self.migration.as_ref()
    }

    /// What the stream is, once its first bytes are read.
    pub fn stream(&self) -> Option<&StreamKind> {
        self.kind.as_ref()
    }

    /// The next step, given everything read from the peer so far. Not to
    /// be called again after a [`Step::Refused`] or [`Step::Admitted`].
    pub fn decide(&mut self, buf: &[u8]) -> Step {
        loop {
            match std::mem::replace(&mut self.state, State::Decided) {
                State::Start { miggate_peer: true } => {
                    let max = frames::MAX_FRAME + 6;
                    match frames::parse_hello(buf) {
                        Ok(None) if buf.len() < max => {
                            self.state = State::Start { miggate_peer: true };
                            return Step::Read { from: 0, max };
                        }
                        Ok(None) => return Step::Refused(unrecognised(buf.len())),
                        Err(e) => return Step::Refused(StreamError::from(e).into()),
                        Ok(Some((hello, used))) => {
                            let route = match self.route(Some(&hello)) {
                                Ok(route) => route,
                                Err(r) => return Step::Refused(r),
                            };
                            self.bind = hello.bind;
                            if hello.nbd {
                                if hello.bind || hello.join.is_some() || hello.resume.is_some() {
                                    return Step::Refused(StreamError::NbdHello.into());
                                }
                                self.state = State::Nbd { from: used, route };
                                continue;
                            }
                            if let Some(token) = hello.resume {
                                self.state = State::Resume {
                                    from: used,
                                    route,
                                    token,
                                };
                                continue;
                            }
                            let Some(token) = &hello.join else {
                                self.state = State::Stream { from: used, route };
                                continue;
                            };
                            self.kind = Some(StreamKind::Preempt);
                            return match self.join(route, token.expose()) {
                                Ok(route) => Step::Admitted {
                                    from: used,
                                    kind: StreamKind::Preempt,
                                    route,
                                },
                                Err(r) => Step::Refused(r),
                            };
                        }
                    }
                }
                State::Start {
                    miggate_peer: false,
                } => match self.route(None) {
                    Ok(route) => self.state = State::Stream { from: 0, route },
                    Err(r) => return Step::Refused(r),
                },
                State::Stream { from, route } => {
                    let kind = match qemu::sniff(&buf[from..]) {
                        Err(SniffError::Incomplete) if buf.len() - from < SNIFF_MAX => {
                            self.state = State::Stream { from, route };
                            return Step::Read {
                                from,
                                max: from + SNIFF_MAX,
                            };
                        }
                        Err(SniffError::Incomplete) => {
                            return Step::Refused(unrecognised(buf.len() - from))
                        }
                        Err(e) => return Step::Refused(StreamError::Sniff(e).into()),
                        Ok(kind) => kind,
                    };
                    self.kind = Some(kind.clone());
                    return match self.admit_stream(route, &kind) {
                        Ok(route) => Step::Admitted { from, kind, route },
                        Err(r) => Step::Refused(r),
                    };
                }
                State::Resume { from, route, token } => {
                    let max = from + 64;
                    match qemu::resume_stream(&buf[from..]) {
                        None if buf.len() < max => {
                            self.state = State::Resume { from, route, token };
                            return Step::Read { from, max };
                        }
                        Some(true) => {}
                        _ => return Step::Refused(StreamError::NotResumed.into()),
                    }
                    self.kind = Some(StreamKind::Resumed);
                    return match self.resume(route, token.expose()) {
                        Ok(route) => Step::Admitted {
                            from,
                            kind: StreamKind::Resumed,
                            route,
                        },
                        Err(r) => Step::Refused(r),
                    };
                }
                State::Nbd { from, route } => {
                    let opening = match nbd::sniff_client(&buf[from..]) {
                        Ok(None) if buf.len() - from < nbd::SNIFF_MAX => {
                            self.state = State::Nbd { from, route };
                            return Step::Read {
                                from,
                                max: from + nbd::SNIFF_MAX,
                            };
                        }
                        Ok(None) => return Step::Refused(unrecognised(buf.len() - from)),
                        Err(e) => return Step::Refused(StreamError::Nbd(e).into()),
                        Ok(Some(o)) => o,
                    };
                    let kind = StreamKind::Nbd {
                        export: opening.export,
                    };
                    self.kind = Some(kind.clone());
                    return match self.admit_stream(route, &kind) {
                        Ok(route) => Step::Admitted { from, kind, route },
                        Err(r) => Step::Refused(r),
                    };
                }
                State::Decided => unreachable!("admission already decided"),
            }
        }
    }

    /// Before the stream is read: a ticket names its migration; without
    /// one the static route takes the connection if the DN is authorized,
    /// so an unauthorized peer gets nothing in.
    fn route(&mut self, hello: Option<&Hello>) -> Result<Option<Arc<StaticRoute>>, Refusal> {
        if let Some(ticket) = hello.and_then(|h| h.ticket.as_ref().map(Secret::expose)) {
            self.migration = Some(self.find_migration(ticket)?);
            return Ok(None);
        }
        let route = self
            .offer
            .route
            .clone()
            .ok_or(TicketRefusal::RegisteredOnly)?;
        check_identity(route.authz.as_ref(), self.peer_dn)?;
        Ok(Some(route))
    }

    fn find_migration(&self, ticket: &str) -> Result<Arc<Migration>, Refusal> {
        let registry = self.offer.registry.ok_or(TicketRefusal::NoRegistry)?;
        let ticket = Ticket::parse(ticket).map_err(TicketRefusal::Malformed)?;
        let mig = registry.find_by_ticket(&ticket)?;
        mig.check_listener(self.offer.listener)?;
        Ok(mig)
    }

    /// A channel joining a live main channel of the same peer, on the same
    /// route (static) or migration (ticket), which takes its preempt slot.
    fn join(&mut self, route: Option<Arc<StaticRoute>>, token: &str) -> Result<Route, Refusal> {
        let bindings = self
            .offer
            .bindings
            .ok_or(super::binding::JoinRefusal::Unknown)?;
        let (route, joined) = match (route, &self.migration) {
            (Some(route), _) => {
                forward_for(&route.forward, &StreamKind::Preempt)?;
                let j = bindings.join(token, self.peer_dn, &Scope::Static)?;
                (Route::Static(route), j)
            }
            (None, Some(m)) => {
                let j = bindings.join(token, self.peer_dn, &Scope::Migration(m.id.clone()))?;
                let g = m.admit_channel(self.peer_dn, &StreamKind::Preempt)?;
                (Route::Ticket(g), j)
            }
            (None, None) => unreachable!("a connection has a route or a migration"),
        };
        self.joined = Some(joined);
        Ok(route)
    }

    /// A main channel resuming the paused binding of a cut one (postcopy
    /// recovery) of the same peer, on the same route or migration.
    fn resume(&mut self, route: Option<Arc<StaticRoute>>, token: &str) -> Result<Route, Refusal> {
        let bindings = self
            .offer
            .bindings
            .ok_or(super::binding::JoinRefusal::NotPaused)?;
        match (route, &self.migration) {
            (Some(route), _) => {
                forward_for(&route.forward, &StreamKind::Resumed)?;
                bindings.resume(token, self.peer_dn, &Scope::Static)?;
                Ok(Route::Static(route))
            }
            (None, Some(m)) => {
                // Only the cut main channel of this migration, resumed by
                // its peer: checked first, since a channel the registration
                // took and then dropped would fail the recovery. Then the
                // registration (its recovery ticket, once), then the
                // binding is spent.
                let scope = Scope::Migration(m.id.clone());
                bindings.check_resume(token, self.peer_dn, &scope)?;
                let g = m.admit_channel(self.peer_dn, &StreamKind::Resumed)?;
                bindings.resume(token, self.peer_dn, &scope)?;
                Ok(Route::Ticket(g))
            }
            (None, None) => unreachable!("a connection has a route or a migration"),
        }
    }

    /// The stream's own checks: the static route's expected UUID, or the
    /// registered migration's peer, UUID and channel slots.
    fn admit_stream(
        &self,
        route: Option<Arc<StaticRoute>>,
        kind: &StreamKind,
    ) -> Result<Route, Refusal> {
        match (route, &self.migration) {
            (Some(route), _) if matches!(kind, StreamKind::Nbd { .. }) => {
                let StreamKind::Nbd { export } = kind else {
                    unreachable!()
                };
                let nbd = route.nbd.as_ref().ok_or(NbdRefusal::NoRoute)?;
                if !nbd.exports.contains(export) {
                    return Err(NbdRefusal::NotRegistered {
                        export: export.clone(),
                        migration: None,
                    }
                    .into());
                }
                Ok(Route::Static(Arc::new(StaticRoute {
                    forward: nbd.forward.clone(),
                    authz: route.authz.clone(),
                    expect: route.expect.clone(),
                    nbd: route.nbd.clone(),
                })))
            }
            (Some(route), _) => {
                check_stream(&route.expect, kind)?;
                // A per-VM forward: this channel's own copy of the route,
                // pointing at its VM's socket.
                let route = match forward_for(&route.forward, kind)? {
                    None => route,
                    Some(forward) => Arc::new(StaticRoute {
                        forward,
                        authz: route.authz.clone(),
                        expect: route.expect.clone(),
                        nbd: route.nbd.clone(),
                    }),
                };
                Ok(Route::Static(route))
            }
            (None, Some(m)) => Ok(Route::Ticket(m.admit_channel(self.peer_dn, kind)?)),
            (None, None) => unreachable!("a connection has a route or a migration"),
        }
    }
}

fn unrecognised(bytes: usize) -> Refusal {
    StreamError::Unrecognised(bytes).into()
}

/// The sniff decision for a reader that only labels the stream (the source
/// gateway): `None` while more bytes are needed.
pub fn sniff_decider(skip: usize) -> impl FnMut(&[u8]) -> Option<Result<StreamKind, Refusal>> {
    move |buf| match qemu::sniff(&buf[skip.min(buf.len())..]) {
        Err(SniffError::Incomplete) => None,
        Ok(kind) => Some(Ok(kind)),
        Err(e) => Some(Err(StreamError::Sniff(e).into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{AnyVerified, DenyAll};

    fn route(authz: Arc<dyn Authz>) -> Option<Arc<StaticRoute>> {
        Some(Arc::new(StaticRoute {
            forward: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            authz,
            expect: Expectation::default(),
            nbd: None,
        }))
    }

    fn offer(route: Option<Arc<StaticRoute>>) -> Offer<'static> {
        Offer {
            route,
            registry: None,
            listener: 0,
            bindings: None,
        }
    }

    fn refusal(step: Step) -> Refusal {
        match step {
            Step::Refused(r) => r,
            _ => panic!("not refused"),
        }
    }

    /// Identity comes before any byte is read: nothing is asked of a peer
    /// that may not send.
    #[test]
    fn route_and_authz_before_the_stream() {
        let mut a = Admission::new("CN=x", false, offer(None));
        let r = refusal(a.decide(&[]));
        assert_eq!(
            r.public(),
            "this gateway admits registered migrations only: present a ticket"
        );
        let mut a = Admission::new("CN=x", false, offer(route(Arc::new(DenyAll))));
        assert!(matches!(refusal(a.decide(&[])), Refusal::NotAuthorized(_)));
    }

    /// The hello is read first, then the stream after it; its bytes are
    /// not the stream's.
    #[test]
    fn hello_then_stream_in_order() {
        let mut hello = frames::encode_hello(&Hello {
            version: 1,
            agent: None,
            ticket: None,
            ..Hello::default()
        });
        let mut a = Admission::new("CN=x", true, offer(route(Arc::new(AnyVerified))));
        for end in 0..hello.len() {
            assert!(matches!(
                a.decide(&hello[..end]),
                Step::Read { from: 0, .. }
            ));
        }
        let from = hello.len();
        assert!(matches!(a.decide(&hello), Step::Read { from: f, .. } if f == from));
        hello.extend_from_slice(b"QEV");
        assert!(matches!(a.decide(&hello), Step::Read { from: f, .. } if f == from));
        hello.extend_from_slice(&[0x16; 8]);
        assert_eq!(refusal(a.decide(&hello)).class(), "stream");
        assert!(a.stream().is_none());
    }

    #[test]
    fn a_ticket_needs_a_registry() {
        let hello = frames::encode_hello(&Hello {
            version: 1,
            agent: None,
            ticket: Some(Secret::new("t")),
            ..Hello::default()
        });
        let mut a = Admission::new("CN=x", true, offer(route(Arc::new(AnyVerified))));
        assert_eq!(
            refusal(a.decide(&hello)).public(),
            "this gateway does not take tickets"
        );
    }
}

#[cfg(test)]
mod recovery_tests {
    use std::time::Duration;

    use super::*;
    use crate::admit::registry::{IncomingSpec, Phase};
    use crate::authz::Simple;

    const DN: &str = "CN=src";

    /// A resumed main channel: `MIG_CMD_RECV_BITMAP` naming block "pc.ram".
    fn resumed_stream() -> Vec<u8> {
        let mut s = vec![0x08, 0x00, 0x0a, 0x00, 0x07, 0x06];
        s.extend_from_slice(b"pc.ram");
        s
    }

    fn hello(ticket: &str, resume: &str) -> Vec<u8> {
        let mut b = frames::encode_hello(&Hello {
            ticket: Some(Secret::new(ticket)),
            resume: Some(Secret::new(resume)),
            bind: true,
            ..Hello::default()
        });
        b.extend(resumed_stream());
        b
    }

    /// On the ticket route, a resumed main channel needs the recovery's
    /// ticket and the migration's own paused binding; a wrong token is
    /// refused without failing the recovery, the right one resumes it.
    #[test]
    fn a_recovery_is_admitted_with_its_ticket_and_binding_only() {
        let reg = Registry::new(Duration::from_secs(60));
        let bindings = Arc::new(Bindings::default());
        let (mig, first) = reg.register(IncomingSpec {
            vm_uuid: None,
            allow: Arc::new(Simple::new(DN)),
            allow_desc: DN.into(),
            forward: Endpoint::Tcp("127.0.0.1:1".parse().unwrap()),
            channels: 1,
            listeners: vec![0],
            ttl: Duration::from_secs(60),
            disks: Vec::new(),
            nbd_forward: None,
        });
        // Another migration's paused binding, same peer.
        let (other, mut g) = bindings.bind(DN, Scope::Migration("other".into()));
        g.failed();
        drop(g);
        let main = StreamKind::Main {
            uuid: None,
            machine: None,
        };
        let (_, mut g) = bindings.bind(DN, Scope::Migration(mig.id.clone()));
        g.failed();
        drop(g);
        mig.admit_channel(DN, &main)
            .unwrap()
            .finish(Err("cut".into()));
        assert!(mig.pause("paused".into(), Duration::from_secs(60)));
        let (ticket, _) = mig.recover().unwrap();
        let token = bindings
            .rekey_paused(&Scope::Migration(mig.id.clone()))
            .unwrap();
        let offer = || Offer {
            route: None,
            registry: Some(&reg),
            listener: 0,
            bindings: Some(&bindings),
        };
        let decide = |t: &str, r: &str| Admission::new(DN, true, offer()).decide(&hello(t, r));

        let Step::Refused(r) = decide(first.expose(), token.expose()) else {
            panic!("the first ticket resumed it")
        };
        assert!(r.to_string().contains("replaced"), "{r}");
        let Step::Refused(r) = decide(ticket.expose(), other.expose()) else {
            panic!("another migration's binding resumed it")
        };
        assert!(matches!(r, Refusal::Join(_)), "{r}");
        assert_eq!(mig.view().state, Phase::Recovering, "{:?}", mig.view());
        let Step::Admitted { kind, route, .. } = decide(ticket.expose(), token.expose()) else {
            panic!("the recovery was refused")
        };
        assert!(matches!(kind, StreamKind::Resumed));
        assert_eq!(mig.view().state, Phase::Active);
        // Once: the binding is spent, and so is the recovery.
        let Step::Refused(_) = decide(ticket.expose(), token.expose()) else {
            panic!("resumed twice")
        };
        drop(route);
    }
}
