//! The ACL file is reloaded live: allow -> deny -> broken (denied, with the
//! reason) -> fixed (allowed), with real migrations and no restart.

mod common;

use std::path::Path;

use common::gateway::{miggate, Gateway};
use common::qemu::{Guest, Qemu, QemuOpts};
use common::scenario::*;
use serde_json::json;

/// Replaces the file the way editors do: write a sibling, rename over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn acl(policy_for_source: &str) -> String {
    json!({
        "rules": [
            { "match": "O=miggate tests,CN=*", "policy": policy_for_source, "format": "glob" },
            { "match": "O=nobody,CN=x", "policy": "allow" }
        ],
        "policy": "deny"
    })
    .to_string()
}

async fn source_vm(seed: u64) -> Qemu {
    let mut q = Qemu::spawn(QemuOpts::new(Guest::PausedRandomRam { seed }, 64))
        .await
        .unwrap();
    q.set_capabilities(&[("return-path", true)]).await.unwrap();
    q.set_unlimited_bandwidth().await.unwrap();
    q
}

async fn target_vm(sock: &Path) -> Qemu {
    let mut q = Qemu::spawn(QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming())
        .await
        .unwrap();
    q.set_capabilities(&[("return-path", true)]).await.unwrap();
    q.migrate_incoming(&format!("unix:{}", sock.display()))
        .await
        .unwrap();
    q
}

async fn reloaded(tgw: &mut Gateway, ok: bool) -> serde_json::Value {
    let msg = if ok {
        "ACL file reloaded"
    } else {
        "ACL file cannot be loaded; denying every peer until it is fixed"
    };
    tgw.wait_event(|v| v["message"] == msg, EVENT_TIMEOUT)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_file_reload_allow_deny_broken_fixed() {
    let pki = pki();
    let pki = pki_dir(&pki);
    let dir = tempfile::tempdir().unwrap();
    let acl_path = dir.path().join("acl.json");
    let sock = dir.path().join("dst.sock");
    replace(&acl_path, &acl("allow"));
    let forward = format!("unix:{}", sock.display());
    let mut tgw = miggate()
        .target(&[
            "--x509-dir",
            pki.to_str().unwrap(),
            "--forward",
            &forward,
            "--authz-list-file",
            acl_path.to_str().unwrap(),
        ])
        .await
        .unwrap();
    let sgw = source_gateway(&pki, &tgw.addr, &[]).await;
    let uri = format!("tcp:{}", sgw.addr);

    // 1. Allowed.
    let (mut src, mut dst) = tokio::join!(source_vm(1), target_vm(&sock));
    migrate_and_expect_completed(&mut src, &mut dst, &uri).await;
    let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "completed", "{rec}");
    drop((src, dst));

    // 2. Denied by the new rule, without a restart.
    replace(&acl_path, &acl("deny"));
    reloaded(&mut tgw, true).await;
    let (mut src, mut dst) = tokio::join!(source_vm(2), target_vm(&sock));
    migrate_and_expect_failure(&mut src, &uri).await;
    let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains(SOURCE_DN)
            && reason.contains("not allowed by ACL")
            && reason.contains("rule 1"),
        "{rec}"
    );

    // 3. Broken file: everyone denied, and the reason says why.
    replace(&acl_path, "{ \"rules\": [ { \"match\": ");
    reloaded(&mut tgw, false).await;
    migrate_and_expect_failure(&mut src, &uri).await;
    let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot be loaded") && reason.contains(acl_path.to_str().unwrap()),
        "{rec}"
    );

    // 4. Fixed: the same source gets through to the same target QEMU.
    replace(&acl_path, &acl("allow"));
    reloaded(&mut tgw, true).await;
    migrate_and_expect_completed(&mut src, &mut dst, &uri).await;
    let rec = tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "completed", "{rec}");
}
