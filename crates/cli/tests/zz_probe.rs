mod common;
use common::qemu::{Guest, Qemu, QemuOpts};
use common::scenario::*;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    tag: String,
    t0: Instant,
) {
    let mut buf = vec![0u8; 65536];
    let mut total = 0usize;
    let mut first = true;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if first {
            eprintln!(
                "[{:?}] {tag} first {} bytes: {:02x?}",
                t0.elapsed(),
                n,
                &buf[..n.min(64)]
            );
            first = false;
        }
        total += n;
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    eprintln!("[{:?}] {tag} EOF after {total}", t0.elapsed());
    let _ = w.shutdown().await;
}

async fn wait_status(q: &mut Qemu, status: &str) {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), q.qmp.next_event())
            .await
            .unwrap()
            .unwrap();
        if ev.name == "MIGRATION" {
            eprintln!("event {}", ev.data);
            if ev.data["status"] == status {
                return;
            }
        }
    }
}

async fn probe(versions: Versions, preempt: bool) {
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 5 }, 128);
    let mut caps = vec![("postcopy-ram", true)];
    if preempt {
        caps.push(("postcopy-preempt", true));
    }
    let (mut src, mut dst, port) = qemu_pair_with(&opts, versions, &caps, None).await;
    src.set_parameters(json!({"max-bandwidth": 32u64<<20, "max-postcopy-bandwidth": 8u64<<20}))
        .await
        .unwrap();
    let hash = src.ram_sha256().await.unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lp = l.local_addr().unwrap().port();
    let t0 = Instant::now();
    let socks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let s2 = socks.clone();
    tokio::spawn(async move {
        let mut i = 0;
        loop {
            let (s, _) = l.accept().await.unwrap();
            i += 1;
            eprintln!("[{:?}] conn {i} accepted", t0.elapsed());
            let d = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (sr, sw) = s.into_split();
            let (dr, dw) = d.into_split();
            s2.lock()
                .unwrap()
                .push(tokio::spawn(pump(sr, dw, format!("conn{i} s->d"), t0)));
            s2.lock()
                .unwrap()
                .push(tokio::spawn(pump(dr, sw, format!("conn{i} d->s"), t0)));
        }
    });
    src.forget_old_events().await.unwrap();
    src.migrate(&format!("tcp:127.0.0.1:{lp}")).await.unwrap();
    wait_status(&mut src, "active").await;
    src.cmd("migrate-start-postcopy", json!({})).await.unwrap();
    wait_status(&mut src, "postcopy-active").await;
    wait_status(&mut dst, "postcopy-active").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("[{:?}] CUT", t0.elapsed());
    for h in socks.lock().unwrap().drain(..) {
        h.abort();
    }
    wait_status(&mut src, "postcopy-paused").await;
    wait_status(&mut dst, "postcopy-paused").await;
    let r = dst
        .cmd(
            "migrate-recover",
            json!({"uri": format!("tcp:127.0.0.1:{port}")}),
        )
        .await;
    eprintln!("recover same port: {r:?}");
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{lp}"), "resume": true}),
    )
    .await
    .unwrap();
    let s = src
        .wait_migration_end(Duration::from_secs(60))
        .await
        .unwrap();
    let d = dst
        .wait_migration_end(Duration::from_secs(60))
        .await
        .unwrap();
    eprintln!("[{:?}] src {:?} dst {:?}", t0.elapsed(), s.status, d.status);
    assert_eq!(hash, dst.ram_sha256().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe72() {
    probe(Versions::Q72, true).await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe10() {
    probe(Versions::Q10, true).await
}
