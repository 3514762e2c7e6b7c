//! What an unauthenticated peer can cost: while a running guest migrates
//! through the two gateways, 1,000 hostile connections hit the target
//! gateway (a `miggate daemon` with a static route, for its metrics):
//! garbage bytes, TLS without a client certificate, a certificate from
//! another CA, a denied DN, clients that stall mid-handshake; the first 500
//! all at once, the rest 16 at a time. They come from four loopback
//! addresses other than the source gateway's, so the per-address limit
//! meets them before the global one.
//!
//! The migration is held at 1 MiB/s (it cannot converge: the guest dirties
//! more per downtime window) until the flood is over, so the whole flood
//! meets an admitted, relaying channel; then the bandwidth is lifted and
//! it must complete with the guest still counting on the destination.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use common::gateway::miggate;
use common::qemu::{Guest, QemuExt, QemuOpts};
use common::scenario::*;
use miggate::creds::tls;
use miggate_bench::flood::Hostiles;
use miggate_lab::DaemonOpts;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const VM: Uuid = Uuid::from_u128(0xf100_d000_0000_4000_8000_0000_0000_0001);
const HOSTILE: usize = 1000;
const AT_ONCE: usize = HOSTILE / 2;
/// In flight at a time for the second half.
const TRICKLE: usize = 16;
/// Hostile source addresses (127.0.0.2 and up).
const ADDRESSES: u8 = 4;
/// The target's limits in this test: tighter than the defaults so that
/// both the per-address and the global limit are reached.
const MAX_PENDING: usize = 128;
const MAX_PENDING_PER_IP: usize = 48;
/// Descriptors the daemon holds besides pending connections (stdio,
/// listeners, API and metrics sockets, epoll, inotify, the admitted channel
/// and its backend, one just accepted).
const FIXED_FDS: usize = 64;
const MAX_RSS_KIB: u64 = 64 * 1024;
/// Slow enough that the running guest never converges (it dirties ~576 KiB
/// continuously; 1 MiB/s x 300 ms of downtime is less).
const CRAWL: u64 = 1 << 20;

#[derive(Default)]
struct Peak {
    rss_kib: AtomicU64,
    fds: AtomicU64,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// One GET /metrics; the value of each `series` line.
async fn metrics(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp
}

fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_hostile_connections_does_not_stop_a_migration() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = QemuOpts::new(Guest::RunningCounter, 64);
    opts.uuid = Some(VM);
    let (mut src, mut dst, port) = qemu_pair(&opts).await;
    let caps = [("return-path", true), ("validate-uuid", true)];
    capabilities(&mut src, &mut dst, &caps).await;
    src.set_parameters(json!({ "max-bandwidth": CRAWL }))
        .await
        .unwrap();
    src.assert_running_and_counting().await;

    let opts = DaemonOpts {
        api_socket: "run/api.sock".into(),
        metrics: true,
        target_extra: format!(
            "forward = \"tcp:127.0.0.1:{port}\"\nauthz_identity = \"{SOURCE_DN}\"\n\
             expect_uuid = \"{VM}\"\nstall_timeout = 10\nhandshake_timeout = 1\n\
             max_pending = {MAX_PENDING}\nmax_pending_per_ip = {MAX_PENDING_PER_IP}\n"
        ),
        log_file: None,
    };
    let daemon = miggate().daemon(tmp.path(), &pki, &opts).await.unwrap();
    let metrics_addr = daemon.metrics.unwrap();
    let mut tgw = daemon.gw;
    let pid = tgw.pid().unwrap();
    let sgw = source_gateway(&pki, &tgw.addr, &[]).await;

    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    tgw.wait_event(|v| v["message"] == "admitted", EVENT_TIMEOUT)
        .await
        .unwrap();
    let (rss_before, fds_before) = (rss_kib(pid), fds(pid));

    // The flood, with the target's memory and descriptors sampled throughout.
    let peak = Arc::new(Peak::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                peak.rss_kib.fetch_max(rss_kib(pid), Relaxed);
                peak.fds.fetch_max(fds(pid), Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let target: SocketAddr = tgw.addr.parse().unwrap();
    let hostiles = Arc::new(Hostiles::prepare(&pki, tmp.path(), target, ADDRESSES).unwrap());
    let started = std::time::Instant::now();
    let errors = hostiles.flood(HOSTILE, AT_ONCE, TRICKLE).await;
    let flood_time = started.elapsed();
    stop.store(true, Relaxed);
    sampler.await.unwrap();
    assert!(
        errors.is_empty(),
        "every hostile connection must reach the target and be closed by it: {errors:#?}"
    );

    // The migration survived the flood and is still relaying; let it finish.
    let during = src.query_migrate().await.unwrap();
    assert_eq!(
        during.status.as_deref(),
        Some("active"),
        "the migration should still be running after the flood: {:?}",
        during.raw
    );
    src.set_unlimited_bandwidth().await.unwrap();
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(s.status.as_deref(), Some("completed"), "{:?}", s.raw);
    assert_eq!(d.status.as_deref(), Some("completed"), "{:?}", d.raw);
    dst.wait_status("running", EVENT_TIMEOUT).await.unwrap();
    dst.assert_running_and_counting().await;

    // Bounded cost.
    let (rss, nfds) = (peak.rss_kib.load(Relaxed), peak.fds.load(Relaxed));
    eprintln!(
        "FIGURE flood: {HOSTILE} hostile connections in {flood_time:?}; target RSS {rss_before} KiB before, peak {rss} KiB; descriptors {fds_before} before, peak {nfds}"
    );
    assert!(rss < MAX_RSS_KIB, "target RSS peaked at {rss} KiB");
    assert!(
        nfds <= (MAX_PENDING + FIXED_FDS) as u64,
        "target descriptors peaked at {nfds}"
    );

    // Every hostile connection refused and counted, the migration's channel
    // completed; the exact counts are in the metrics.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let text = loop {
        let text = metrics(&metrics_addr).await;
        let done = sample(&text, "miggate_connections_total{outcome=\"completed\"}") == 1
            && sample(&text, "miggate_connections_total{outcome=\"refused\"}") >= HOSTILE as u64;
        if done || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let get = |s: &str| sample(&text, s);
    assert_eq!(
        get("miggate_connections_total{outcome=\"refused\"}"),
        HOSTILE as u64,
        "{text}"
    );
    assert_eq!(
        get("miggate_connections_total{outcome=\"completed\"}"),
        1,
        "{text}"
    );
    assert_eq!(
        get("miggate_connections_total{outcome=\"failed\"}"),
        0,
        "{text}"
    );
    let classes = ["tls", "authz", "stream", "stalled", "overload", "other"];
    let by_class: Vec<(&str, u64)> = classes
        .iter()
        .map(|c| {
            (
                *c,
                get(&format!("miggate_refusals_total{{reason=\"{c}\"}}")),
            )
        })
        .collect();
    eprintln!("FIGURE flood refusals by class: {by_class:?}");
    assert_eq!(
        by_class.iter().map(|(_, n)| n).sum::<u64>(),
        HOSTILE as u64,
        "{text}"
    );
    for c in ["tls", "authz", "overload"] {
        assert!(
            get(&format!("miggate_refusals_total{{reason=\"{c}\"}}")) > 0,
            "{text}"
        );
    }
    assert_eq!(get("miggate_refusals_total{reason=\"other\"}"), 0, "{text}");

    // The log is rate-limited, but its summary lines account for every
    // refusal it left out.
    let log_deadline = tokio::time::Instant::now() + miggate::outcome::LOG_WINDOW + EVENT_TIMEOUT;
    loop {
        let logged = tgw
            .outcomes()
            .iter()
            .filter(|v| v["outcome"] == "refused")
            .count() as u64;
        let summarised: u64 = tgw
            .lines()
            .iter()
            .filter(|v| v["target"] == "miggate::refusals")
            .map(|v: &Value| v["suppressed"].as_u64().unwrap_or(0))
            .sum();
        if logged + summarised == HOSTILE as u64 {
            assert!(logged < HOSTILE as u64 / 4, "{logged} refusal lines logged");
            break;
        }
        assert!(
            tokio::time::Instant::now() < log_deadline,
            "{logged} refusals logged + {summarised} in summaries != {HOSTILE}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from after the command name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Out of descriptors (a low RLIMIT_NOFILE set on the running gateway with
/// prlimit), the target backs off instead of spinning on accept, and
/// serves again as soon as descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_out_of_descriptors_backs_off_and_recovers() {
    const NOFILE: usize = 48;
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let mut tgw = target_gateway(
        &pki,
        9,
        &["--allow-any-verified-peer", "--handshake-timeout", "300"],
    )
    .await;
    let pid = tgw.pid().unwrap();
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={NOFILE}:{NOFILE}"),
        ])
        .output()
        .expect("prlimit (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // More silent connections than descriptors: the kernel queues the rest.
    let mut held = Vec::new();
    for _ in 0..NOFILE * 2 {
        held.push(tokio::net::TcpStream::connect(&tgw.addr).await.unwrap());
    }
    tgw.wait_event(|v| v["message"] == "accept failed", EVENT_TIMEOUT)
        .await
        .unwrap();
    let before = cpu_seconds(pid);
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await; // measuring an interval, not waiting for an event
    let spent = cpu_seconds(pid) - before;
    eprintln!("FIGURE out of descriptors: {spent:.2} CPU-s in {window:?}");
    assert!(spent < 0.5, "the gateway spun: {spent} CPU-s in {window:?}");

    // Each failure was not logged: at most a burst per window.
    let logged = tgw
        .lines()
        .iter()
        .filter(|v| v["message"] == "accept failed")
        .count();
    assert!(
        logged <= miggate::outcome::LOG_BURST as usize,
        "{logged} 'accept failed' lines in {window:?}"
    );

    drop(held);
    let config = tls::client_config(&pki, &[]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let sock = tokio::net::TcpStream::connect(&tgw.addr).await.unwrap();
            if connector.connect(name.clone(), sock).await.is_ok() {
                break;
            }
        }
    })
    .await
    .expect("the target must serve again once descriptors are free");
}
