//! Who may join a main channel as its postcopy preempt channel: real TLS on
//! loopback into a real target gateway, whose "target QEMU" is a plain
//! listener counting the connections that reach it (a refused join must
//! never be one of them). The preempt channel through real QEMUs is in
//! `postcopy.rs`.

mod common;

use std::sync::Arc;

use common::scenario::*;
use miggate::creds::tls;
use miggate::wire::frames::{self, Hello, Secret, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

const STALL: u64 = 2;
const OTHER_DN: &str = "O=miggate tests,CN=other.test";

/// A miggate-speaking TLS client with the certificate in `pki`.
async fn connect(pki: &std::path::Path, addr: &str) -> TlsStream<TcpStream> {
    let config = tls::client_config(pki, &[tls::ALPN_MIGGATE]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&config));
    let sock = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, sock).await.unwrap()
}

/// Sends `hello` (and `stream`), returns the verdict.
async fn offer(tls: &mut TlsStream<TcpStream>, hello: Hello, stream: &[u8]) -> Verdict {
    let mut bytes = frames::encode_hello(&hello);
    bytes.extend_from_slice(stream);
    tls.write_all(&bytes).await.unwrap();
    tokio::time::timeout(EVENT_TIMEOUT, frames::read_verdict(tls))
        .await
        .unwrap()
        .unwrap()
}

async fn join(pki: &std::path::Path, addr: &str, token: &str) -> (TlsStream<TcpStream>, Verdict) {
    let mut tls = connect(pki, addr).await;
    let hello = Hello {
        join: Some(Secret::new(token)),
        ..Hello::default()
    };
    let v = offer(&mut tls, hello, &[]).await;
    (tls, v)
}

fn refused(reason: &str) -> Verdict {
    Verdict::Refused {
        reason: reason.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_main_channels_peer_with_its_token_joins_it_once_while_it_lives() {
    let dir = pki();
    let pki = pki_dir(&dir);
    let other = common::gateway::pki_issue(&pki, &dir.path().join("other"), OTHER_DN);
    // The "target QEMU": counts connections and what reaches it.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = backend.local_addr().unwrap().port();
    let (conn_tx, mut conns) = mpsc::unbounded_channel();
    let (accept_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = backend.accept().await.unwrap();
            let _ = accept_tx.send(());
            let tx = conn_tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = tx.send(got);
            });
        }
    });
    // Any verified peer passes authz: the binding alone must refuse.
    let stall = STALL.to_string();
    let mut tgw = target_gateway(
        &pki,
        port,
        &["--allow-any-verified-peer", "--stall-timeout", &stall],
    )
    .await;

    let main_stream = miggate_lab::fixtures::QEMU72_MAIN_UUID;
    let mut main = connect(&pki, &tgw.addr).await;
    let hello = Hello {
        bind: true,
        ..Hello::default()
    };
    let Verdict::Bound { token } = offer(&mut main, hello, main_stream).await else {
        panic!("a main channel asking for a binding gets a token");
    };
    let token = token.expose().to_string();
    assert_eq!(token.len(), 64);

    // Another DN with the token, and the right DN with another token.
    let (_, v) = join(&other, &tgw.addr, &token).await;
    assert_eq!(v, refused("binding token not valid for this peer"));
    let (_, v) = join(&pki, &tgw.addr, &"ab".repeat(32)).await;
    assert_eq!(v, refused("no live main channel for this binding token"));
    // The main channel's peer joins, once.
    let (mut preempt, v) = join(&pki, &tgw.addr, &token).await;
    assert_eq!(v, Verdict::Admitted);
    let (_, v) = join(&pki, &tgw.addr, &token).await;
    assert_eq!(v, refused("main channel already joined"));
    preempt.write_all(b"urgent page").await.unwrap();
    preempt.flush().await.unwrap();

    let records = outcomes(&mut tgw, 3).await;
    let reasons: Vec<&str> = records
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    for r in &records {
        assert_eq!(r["outcome"], "refused", "{r}");
        assert_eq!(r["channel"], "postcopy-preempt", "{r}");
    }
    assert!(reasons[0].contains(OTHER_DN), "{reasons:?}");
    assert!(
        reasons[1].starts_with("no live main channel"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("already joined"), "{reasons:?}");

    // The main channel ends: the idle preempt channel is cut STALL s later,
    // and the token is gone with it.
    main.shutdown().await.unwrap();
    let main_rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(main_rec["channel"], "main", "{main_rec}");
    let p = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(p["channel"], "postcopy-preempt", "{p}");
    assert_eq!(p["outcome"], "failed", "{p}");
    let reason = p["reason"].as_str().unwrap();
    assert!(reason.contains("main channel ended"), "{reason}");
    let (_, v) = join(&pki, &tgw.addr, &token).await;
    assert_eq!(v, refused("no live main channel for this binding token"));

    // Exactly two connections reached the target: the main channel (its
    // stream) and the one admitted join (its bytes). A refused channel
    // would have connected before its record was written.
    let mut got: Vec<Vec<u8>> = Vec::new();
    for _ in 0..2 {
        let c = tokio::time::timeout(EVENT_TIMEOUT, conns.recv())
            .await
            .unwrap();
        got.push(c.unwrap());
    }
    got.sort_by_key(Vec::len);
    assert_eq!(got[0], b"urgent page");
    assert_eq!(got[1], main_stream);
    let mut n = 0;
    while accepted.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 2, "a refused join reached the target QEMU");
}

/// A client speaking QEMU's own TLS (no ALPN), with the certificate in `pki`.
async fn connect_native(pki: &std::path::Path, addr: &str) -> TlsStream<TcpStream> {
    let config = tls::client_config(pki, &[]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&config));
    let sock = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, sock).await.unwrap()
}

/// The first bytes of a main channel advising postcopy, as 7.2 and 10.0
/// send them: header, configuration, open return path, ping, advise.
fn postcopy_main_stream() -> Vec<u8> {
    let mut v = b"QEVM\0\0\0\x03\x07\0\0\0\x0dpc-i440fx-7.2".to_vec();
    v.extend_from_slice(&[0x08, 0, 1, 0, 0, 0x08, 0, 2, 0, 4, 0, 0, 0, 1]);
    v.extend_from_slice(&[0x08, 0, 3, 0, 16]);
    v.extend_from_slice(&[0; 16]);
    v
}

/// The "target QEMU": numbers its connections and reports what each sends.
struct Backend {
    port: u16,
    chunks: mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    /// What each connection sent so far, in the order they connected.
    got: Vec<Vec<u8>>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, chunks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for id in 0.. {
                let (mut s, _) = listener.accept().await.unwrap();
                // Sent before the next accept: ids arrive in order.
                let _ = tx.send((id, Vec::new()));
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let _ = tx.send((id, buf[..n].to_vec()));
                    }
                });
            }
        });
        Backend {
            port,
            chunks,
            got: Vec::new(),
        }
    }

    /// Waits until connection `id` has reached the target and sent
    /// `bytes`; returns how many connections have reached it.
    async fn reached(&mut self, id: usize, bytes: usize) -> usize {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        while self.got.get(id).map_or(true, |g| g.len() < bytes) {
            let (i, c) = tokio::time::timeout_at(deadline, self.chunks.recv())
                .await
                .unwrap_or_else(|_| panic!("connection {id} did not reach the target"))
                .unwrap();
            if i == self.got.len() {
                self.got.push(Vec::new());
            }
            self.got[i].extend_from_slice(&c);
        }
        self.got.len()
    }
}

/// What QEMU 7.2's preempt channel sends when postcopy starts
/// (`RAM_SAVE_FLAG_EOS`).
const EOS: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 0x10];

/// A main channel that goes on sending (a byte every 200 ms), so that the
/// stall timeout does not cut it; dropping the handle ends it with
/// close_notify.
fn hold(mut main: TlsStream<TcpStream>) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = &mut rx => break,
                _ = tick.tick() => {
                    if main.write_all(&[0]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = main.shutdown().await;
    });
    tx
}

/// The outcome records of a gateway, taken by what they say rather than
/// in the order concurrent connections ended.
struct Records(Vec<serde_json::Value>);

impl Records {
    async fn take(
        &mut self,
        gw: &mut common::gateway::Gateway,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            if let Some(i) = self.0.iter().position(&pred) {
                return self.0.remove(i);
            }
            let r = tokio::time::timeout(EVENT_TIMEOUT, gw.wait_outcome(EVENT_TIMEOUT))
                .await
                .unwrap_or_else(|_| panic!("no record {what}; others: {:?}", self.0))
                .unwrap();
            self.0.push(r);
        }
    }
}

fn reason(r: &serde_json::Value) -> &str {
    r["reason"].as_str().unwrap_or_default()
}

/// QEMU's own TLS sends no hello, so its preempt channel cannot present a
/// token: a native-TLS connection without a QEMU header (silent, or 7.2's
/// EOS marker) joins the one live postcopy main channel of its DN, once.
/// Not another DN's, not a main channel that does not advise postcopy,
/// not when two could be meant; nothing refused reaches the target, and
/// the joined channel is cut the stall timeout after its main channel ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_headerless_connection_joins_only_its_dns_postcopy_main_once() {
    let dir = pki();
    let pki = pki_dir(&dir);
    let other = common::gateway::pki_issue(&pki, &dir.path().join("other"), OTHER_DN);
    let mut target = Backend::start().await;
    let stall = STALL.to_string();
    let args = ["--allow-any-verified-peer", "--stall-timeout", &stall];
    let mut tgw = target_gateway(&pki, target.port, &args).await;
    let mut records = Records(Vec::new());
    let no_main = |dn: &'static str| {
        move |r: &serde_json::Value| {
            r["outcome"] == "refused"
                && reason(r).contains(&format!(
                    "no live native-TLS main channel from {dn} advises postcopy"
                ))
        }
    };

    // A main channel that does not advise postcopy: a silent connection
    // of its DN, and one sending 7.2's EOS marker, are not joined.
    let main_stream = miggate_lab::fixtures::QEMU72_MAIN_UUID;
    let mut plain = connect_native(&pki, &tgw.addr).await;
    plain.write_all(main_stream).await.unwrap();
    assert_eq!(target.reached(0, main_stream.len()).await, 1);
    let plain = hold(plain);
    let _silent = connect_native(&pki, &tgw.addr).await;
    let mut eos = connect_native(&pki, &tgw.addr).await;
    eos.write_all(&EOS).await.unwrap();
    let r = records.take(&mut tgw, "silent", no_main(SOURCE_DN)).await;
    let r2 = records.take(&mut tgw, "eos", no_main(SOURCE_DN)).await;
    let mut reasons = [reason(&r).to_string(), reason(&r2).to_string()];
    reasons.sort();
    assert!(
        reasons[0].starts_with("not a QEMU migration stream (starts with 00 00"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with(&format!("peer sent nothing for {STALL} s")),
        "{reasons:?}"
    );

    // A postcopy main channel: another DN's silent connection is not
    // joined; its own DN's is, once.
    let pc_stream = postcopy_main_stream();
    let mut pc = connect_native(&pki, &tgw.addr).await;
    pc.write_all(&pc_stream).await.unwrap();
    assert_eq!(target.reached(1, pc_stream.len()).await, 2);
    let pc = hold(pc);
    let _foreign = connect_native(&other, &tgw.addr).await;
    let mut preempt = connect_native(&pki, &tgw.addr).await;
    assert_eq!(
        target.reached(2, 0).await,
        3,
        "the preempt channel reached the target"
    );
    preempt.write_all(b"urgent page").await.unwrap();
    target.reached(2, b"urgent page".len()).await;
    let _second = connect_native(&pki, &tgw.addr).await;
    let r = records
        .take(&mut tgw, "second", |r| {
            r["outcome"] == "refused" && reason(r).contains("already joined")
        })
        .await;
    assert_eq!(r["channel"], "postcopy-preempt", "{r}");
    records.take(&mut tgw, "foreign", no_main(OTHER_DN)).await;

    // Two postcopy main channels of one DN: which one a headerless
    // connection belongs to cannot be told.
    let mut pc2 = connect_native(&pki, &tgw.addr).await;
    pc2.write_all(&pc_stream).await.unwrap();
    assert_eq!(target.reached(3, pc_stream.len()).await, 4);
    let pc2 = hold(pc2);
    // At once for bytes that are no header; at the stall deadline for
    // silence (it might still send one).
    let mut eos = connect_native(&pki, &tgw.addr).await;
    eos.write_all(&EOS).await.unwrap();
    let _third = connect_native(&pki, &tgw.addr).await;
    for what in ["eos", "silent"] {
        let r = records
            .take(&mut tgw, what, |r| {
                r["outcome"] == "refused"
                    && reason(r).starts_with("2 live native-TLS main channels")
            })
            .await;
        assert_eq!(r["channel"], "postcopy-preempt", "{r}");
    }

    // The main channel ends: its idle preempt channel is cut STALL s later.
    drop(pc);
    let p = records
        .take(&mut tgw, "preempt", |r| {
            r["channel"] == "postcopy-preempt" && r["outcome"] != "refused"
        })
        .await;
    assert_eq!(p["outcome"], "failed", "{p}");
    assert!(reason(&p).contains("main channel ended"), "{p}");
    assert_eq!(p["peer.dn"], SOURCE_DN, "{p}");

    // Now one postcopy main channel is left: 7.2's EOS marker joins it.
    let mut eos = connect_native(&pki, &tgw.addr).await;
    eos.write_all(&EOS).await.unwrap();
    assert_eq!(target.reached(4, EOS.len()).await, 5);
    assert_eq!(target.got[4], EOS);

    // Exactly five connections reached the target: the three main
    // channels and the two joined.
    drop((plain, pc2));
    let p = records
        .take(&mut tgw, "eos joined", |r| {
            r["channel"] == "postcopy-preempt" && r["outcome"] != "refused"
        })
        .await;
    assert_eq!(p["bytes_sent"], EOS.len(), "{p}");
    while let Ok((i, _)) = target.chunks.try_recv() {
        assert!(i < 5, "a refused connection reached the target QEMU");
    }
}
