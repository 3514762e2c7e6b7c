//! A stream cut short is a failure, never a completed migration. A miggate
//! gateway always ends its TLS stream with close_notify, so an EOF without
//! it means the gateway died or the path was cut (or a FIN was injected).

mod common;

use common::qemu::{Guest, QemuOpts};
use common::scenario::*;
use serde_json::json;

/// 64 MiB of random RAM at 2 MiB/s: mid-stream for half a minute.
const CRAWL_BANDWIDTH: u64 = 2 << 20;

/// `kill -9` of the source gateway while the stream flows: the target
/// gateway's record says failed and why; the source QEMU's migration fails
/// and its VM is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_mid_stream_fails_on_the_target() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0xc07 }, 64);
    let (mut src, mut dst, port) = qemu_pair(&opts).await;
    capabilities(&mut src, &mut dst, &[("return-path", true)]).await;
    src.set_parameters(json!({ "max-bandwidth": CRAWL_BANDWIDTH }))
        .await
        .unwrap();
    let mut tgw = target_gateway(&pki, port, &["--authz-identity", SOURCE_DN]).await;
    let sgw = source_gateway(&pki, &tgw.addr, &[]).await;

    let before = src.query_status().await.unwrap();
    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    tgw.wait_event(|v| v["message"] == "admitted", EVENT_TIMEOUT)
        .await
        .unwrap();
    // Mid-stream: a few MiB of RAM have gone through both gateways.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let info = src.query_migrate().await.unwrap();
        let sent = info.ram.as_ref().map_or(0, |r| r.transferred);
        if sent > 2 << 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the migration never got going: {:?}",
            info.raw
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    sgw.stop().await;

    let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "failed", "{rec}");
    assert_eq!(
        rec["reason"], "source->target: the source's TLS stream was cut without close_notify",
        "{rec}"
    );
    assert!(rec["bytes_sent"].as_u64().unwrap() > 2 << 20, "{rec}");
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(s.status.as_deref(), Some("failed"), "{:?}", s.raw);
    assert_eq!(
        src.query_status().await.unwrap(),
        before,
        "the source VM changed state"
    );
}
