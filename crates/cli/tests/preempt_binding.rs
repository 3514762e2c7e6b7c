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
