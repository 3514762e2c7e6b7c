//! `miggate migrate --native-tls --authz-list-file` on QEMU 10.0: the
//! target QEMU's tls-authz comes from the ACL file, and which object holds
//! it follows what the target's `object-add` accepts (its QMP schema).
//! QEMU 10.0 accepts `authz-list` but not `authz-list-file` (the QAPI enum
//! says `authz-listfile`, which is no QOM type), so the rules go into an
//! `authz-list` and the command says so. The 7.2 case is in `migrate_cmd`.
//! These tests fail, with the hint to run `scripts/setup.sh`, where QEMU
//! 10.0 is not installed.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::gateway::BIN;
use common::qemu::{Guest, Qemu, QemuOpts, QemuVersion};
use common::scenario::{pki, pki_dir, MIGRATION_TIMEOUT, SOURCE_DN};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::process::Command;

/// Allows the test PKI's client ([`SOURCE_DN`]) by glob.
const ACL_ALLOW: &str = r#"{"rules":[{"match":"O=miggate tests,CN=*","policy":"allow","format":"glob"}],"policy":"deny"}"#;
/// Allows another DN only: the source is denied by the default policy.
const ACL_DENY: &str =
    r#"{"rules":[{"match":"O=miggate tests,CN=someone-else","policy":"allow"}],"policy":"deny"}"#;

/// Two QEMU 10.0 with a paused random-RAM guest, an ACL file with `acl`,
/// and `miggate migrate --native-tls --json --authz-list-file` between
/// them; returns its output, the QEMUs and the ACL file's path.
async fn migrate_on_qemu10(acl: &str, seed: u64) -> Run {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tempfile::Builder::new()
        .prefix("miggate-native-authz-")
        .tempdir()
        .unwrap();
    let acl_path = dir.path().join("acl.json");
    std::fs::write(&acl_path, acl).unwrap();
    let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed }, 64);
    opts.qemu = QemuVersion::V10_0;
    let (mut src, dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    let hash = src.ram_sha256().await.unwrap();
    let args = [
        "--native-tls",
        "--json",
        "--authz-list-file",
        s(&acl_path),
        "--source-qmp",
        s(&sq),
        "--target-qmp",
        s(&tq),
        "--x509-dir",
        s(&pki),
    ];
    let run = Command::new(BIN)
        .arg("migrate")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(MIGRATION_TIMEOUT, run)
        .await
        .expect("miggate migrate did not finish")
        .unwrap();
    eprintln!(
        "miggate migrate {args:?} -> {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        lines: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect(),
        out,
        src,
        dst,
        hash,
        acl: acl_path.display().to_string(),
        _dirs: (dir, pki_t),
    }
}

struct Run {
    out: Output,
    lines: Vec<Value>,
    src: Qemu,
    dst: Qemu,
    /// SHA-256 of the source's RAM before the migration.
    hash: String,
    acl: String,
    // Removed when the test ends, after the QEMUs.
    _dirs: (TempDir, TempDir),
}

impl Run {
    fn of_type(&self, t: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l["type"] == t)
            .filter_map(|l| l["message"].as_str())
            .collect()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An ACL file allowing the source's DN: QEMU 10.0's object-add has no
/// `authz-list-file`, so the command loads the rules into an `authz-list`
/// without trying (its note gives the schema's reason), the target QEMU
/// holds exactly those rules as its tls-authz, and the RAM arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_file_on_qemu10_goes_into_authz_list_and_ram_arrives_intact() {
    let mut run = migrate_on_qemu10(ACL_ALLOW, 0xac10).await;
    assert!(run.out.status.success(), "{}", run.dst.stderr_text());
    let last = run.lines.last().unwrap();
    assert_eq!(last["ok"], true, "{last}");
    let notes = run.of_type("note");
    assert!(
        notes.iter().any(|n| n.starts_with("this QEMU (10.0.")
            && n.contains("cannot create authz-list-file")
            && n.contains("the QMP schema names it authz-listfile")
            && n.contains("1 rule(s) were loaded into an authz-list")),
        "{notes:?}"
    );
    let steps = run.of_type("step");
    let authz = format!("authz-list from {}", run.acl);
    assert!(steps.iter().any(|s| s.contains(&authz)), "{steps:?}");
    assert!(
        !steps.iter().any(|s| s.contains("authz-list-file")),
        "{steps:?}"
    );
    assert_eq!(run.dst.ram_sha256().await.unwrap(), run.hash);
    // The target QEMU's own view: its tls-authz is that authz-list, with
    // the file's rule and policy.
    let params = run
        .dst
        .cmd("query-migrate-parameters", Value::Null)
        .await
        .unwrap();
    assert_eq!(params["tls-authz"], "miggate-authz0");
    let path = "/objects/miggate-authz0";
    let get = |property: &str| json!({"path": path, "property": property});
    assert_eq!(
        run.dst.cmd("qom-get", get("type")).await.unwrap(),
        "authz-list"
    );
    assert_eq!(run.dst.cmd("qom-get", get("policy")).await.unwrap(), "deny");
    assert_eq!(
        run.dst.cmd("qom-get", get("rules")).await.unwrap(),
        json!([{"match": "O=miggate tests,CN=*", "policy": "allow", "format": "glob"}])
    );
}

/// An ACL file that does not allow the source's DN: the target QEMU's
/// tls-authz refuses the TLS session (and keeps waiting, nothing loaded),
/// the command exits 1 with that cause in one sentence, and the VM stays
/// on the source as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_file_on_qemu10_denying_the_dn_is_enforced_by_the_target_qemu() {
    let mut run = migrate_on_qemu10(ACL_DENY, 0xac11).await;
    assert_eq!(run.out.status.code(), Some(1));
    let last = run.lines.last().unwrap();
    assert_eq!(last["ok"], false, "{last}");
    let sentence = last["error"].as_str().unwrap();
    assert!(
        sentence.starts_with(&format!(
            "migration failed: target QEMU: its tls-authz refused the TLS session \
             (peer {SOURCE_DN} not allowed by ACL {} (default policy deny))",
            run.acl
        )),
        "{sentence}"
    );
    assert!(
        sentence.ends_with("; the VM is still on the source, prelaunch as before."),
        "{sentence}"
    );
    // QEMU's own verdict, not miggate's prediction: the target QEMU
    // dropped the TLS session on its authz check of this DN and loaded
    // nothing; QEMU 10.0 keeps its incoming migration waiting ...
    let d = run.dst.query_migrate().await.unwrap();
    assert_eq!(d.status.as_deref(), Some("setup"), "{:?}", d.raw);
    assert_eq!(run.dst.query_status().await.unwrap(), "inmigrate");
    let log = run.dst.stderr_text();
    assert!(
        log.contains(&format!("TLS x509 authz check for {SOURCE_DN} is denied")),
        "{log}"
    );
    // ... and the source's failed, leaving its VM as it was (never
    // started: -S), RAM untouched.
    let info = run.src.query_migrate().await.unwrap();
    assert_eq!(info.status.as_deref(), Some("failed"), "{:?}", info.raw);
    assert_eq!(run.src.query_status().await.unwrap(), "prelaunch");
    assert_eq!(run.src.ram_sha256().await.unwrap(), run.hash);
}
