//! `miggate migrate --recover ID`: a managed postcopy (+preempt) migration
//! whose path to the daemon's listener is cut mid-postcopy pauses on both
//! QEMUs; the daemon keeps the registration paused; the first command
//! exits saying how to recover; `--recover` resumes it through the daemon
//! with a fresh one-shot ticket and completes it.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cut_path::CutPath;
use common::gateway::BIN;
use common::managed_run::{counter_pair, messages, run_migrate, s, CounterPair};
use common::qemu::{Qemu, QemuExt, QemuVersion};
use common::scenario::{EVENT_TIMEOUT, MIGRATION_TIMEOUT};
use miggate::control::client::ApiError;
use miggate::control::types::{MigrationView, Phase};
use serde_json::{json, Value};
use tokio::process::Command;

/// Precopy cannot converge at this cap (see migrate_postcopy.rs), so the
/// command switches to postcopy after 2 passes.
const BANDWIDTH: &str = "1M";
const DOWNTIME_MS: &str = "20";
const RAM_MIB: u32 = 64;
/// Postcopy held back on the source until the cut, so that it is still
/// under way when the path goes (miggate leaves this parameter alone).
const SLOW_POSTCOPY: u64 = 64 << 10;

type Setup = CounterPair;

async fn setup(qemu: QemuVersion) -> Setup {
    counter_pair(qemu, RAM_MIB, "miggate-recover-").await
}

impl CounterPair {
    fn command(&self, args: &[&str]) -> Command {
        self.migrate(args)
    }

    /// The daemon's view of `id` once `done` holds (no event to await:
    /// its API, until a deadline).
    async fn view_when(&self, id: &str, done: impl Fn(&MigrationView) -> bool) -> MigrationView {
        let client = self.daemon.client().unwrap();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let v = client.migration(id).await.unwrap();
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{v:?}\ndaemon log:\n{}",
                self.daemon.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs the command to its end; returns its JSON lines and exit code.
async fn run(cmd: Command) -> (Vec<Value>, Option<i32>) {
    run_migrate(cmd, |_, _, _| {}).await
}

fn notes(lines: &[Value]) -> Vec<&str> {
    messages(lines, "note")
}

/// Waits for the QEMU event `name` (RESUME: the target runs the guest,
/// its device state loaded).
async fn wait_event(q: &mut Qemu, name: &str) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, q.qmp.next_event())
            .await
            .unwrap_or_else(|_| panic!("no {name} event\n{}", q.stderr_text()))
            .unwrap();
        if ev.name == name {
            return;
        }
    }
}

/// Polls until the source has sent `n` bytes of RAM in postcopy (QEMU has
/// no event for it).
async fn wait_postcopy_bytes(src: &mut Qemu, n: u64) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let info = src.query_migrate().await.unwrap();
        let sent = info.raw["ram"]["postcopy-bytes"].as_u64().unwrap_or(0);
        if sent >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {sent} bytes in postcopy: {}",
            info.raw
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(q: &mut Qemu) -> Option<String> {
    q.query_migrate().await.unwrap().status
}

/// Polls `q`'s migration status until it is `want` (its MIGRATION events
/// may have been read already by a wait above).
async fn wait_status(q: &mut Qemu, want: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let now = status_of(q).await;
        if now.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "migration {now:?}, not {want}\n{}",
            q.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cut_then_recover(qemu: QemuVersion) {
    let mut t = setup(qemu).await;
    let t0 = Instant::now();
    t.src
        .set_parameters(json!({ "max-postcopy-bandwidth": SLOW_POSTCOPY }))
        .await
        .unwrap();
    // The path between the in-process source gateway and the daemon's
    // listener, which the test cuts.
    let path = CutPath::to(&t.daemon.gw.addr).await;
    t.dst.forget_old_events().await.unwrap();
    let first = tokio::spawn(run(t.command(&[
        "--target-qmp",
        &format!("unix:{}", s(&t.tq)),
        "--max-bandwidth",
        BANDWIDTH,
        "--downtime-limit",
        DOWNTIME_MS,
        "--postcopy",
        "--postcopy-preempt",
        "--connect",
        &path.addr,
    ])));
    // The target runs the guest (device state loaded: a target cut while
    // loading it fails for good), and pages are flowing.
    wait_event(&mut t.dst, "RESUME").await;
    wait_postcopy_bytes(&mut t.src, 64 << 10).await;
    assert_eq!(path.cut(), 2, "main and preempt channels were relayed");

    let (lines, code) = first.await.unwrap();
    assert_eq!(code, Some(1), "daemon log:\n{}", t.daemon.log_text());
    let last = lines.last().unwrap();
    let sentence = last["error"].as_str().unwrap();
    assert!(
        sentence.starts_with("migration paused in postcopy: "),
        "{sentence}"
    );
    assert!(
        !sentence.contains("still running on the source"),
        "{sentence}"
    );
    let id = last["migration_id"].as_str().unwrap().to_string();
    let recover_cmd = notes(&lines)
        .iter()
        .find_map(|n| n.strip_prefix("to recover the migration, run: "))
        .unwrap_or_else(|| panic!("no recover command: {lines:#?}"))
        .to_string();
    assert!(
        recover_cmd.starts_with(&format!(
            "miggate migrate --recover {id} --source-qmp unix:{} --target {}",
            s(&t.sq),
            t.daemon.target()
        )),
        "{recover_cmd}"
    );
    assert!(
        recover_cmd.ends_with(&format!("--connect {}", path.addr)),
        "{recover_cmd}"
    );
    assert_eq!(
        status_of(&mut t.src).await.as_deref(),
        Some("postcopy-paused")
    );
    wait_status(&mut t.dst, "postcopy-paused").await;
    // The daemon holds the registration paused, with why, not failed.
    let paused = t
        .view_when(&id, |v| v.state != Phase::Failed && v.reason.is_some())
        .await;
    assert_eq!(paused.state, Phase::Paused, "{paused:?}");
    assert!(paused.recover_by.is_some(), "{paused:?}");
    assert!(
        paused
            .reason
            .as_deref()
            .unwrap()
            .contains(&format!("--recover {id}")),
        "{paused:?}"
    );

    // Recovery, exactly as the first command said (its own arguments),
    // postcopy at full speed now.
    t.src
        .set_parameters(json!({ "max-postcopy-bandwidth": 0 }))
        .await
        .unwrap();
    let recover = || {
        let mut c = Command::new(BIN);
        c.args(recover_cmd.split(' ').skip(1))
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let (lines, code) = run(recover()).await;
    eprintln!(
        "FIGURE migrate_recover {qemu}: cut and recovered in {:?}",
        t0.elapsed()
    );
    assert_eq!(
        code,
        Some(0),
        "daemon log:\n{}\nsource QEMU:\n{}\ntarget QEMU:\n{}",
        t.daemon.log_text(),
        t.src.stderr_text(),
        t.dst.stderr_text()
    );
    let last = lines.last().unwrap();
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["migration_id"], id.as_str(), "{last}");
    // Said as a resumption, not as a stream whose UUID was checked.
    let steps: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "step")
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        steps.iter().any(|m| m.contains("admitted the recovery")),
        "{steps:?}"
    );
    assert!(
        !steps.iter().any(|m| m.contains("checked in the stream")),
        "{steps:?}"
    );
    t.dst.assert_running_and_counting().await;
    assert_eq!(status_of(&mut t.src).await.as_deref(), Some("completed"));
    let done = t.view_when(&id, |v| v.state.is_final()).await;
    assert_eq!(done.state, Phase::Completed, "{done:?}");
    assert_eq!(done.recoveries, 1, "{done:?}");
    assert_eq!(done.recover_by, None, "{done:?}");
    // main + preempt, then the resumed main + its preempt.
    assert_eq!(done.channels_seen, 4, "{done:?}");
    assert!(done.refusals.is_empty(), "{done:?}");

    // A completed migration is not recovered again, and its tickets are
    // spent: a second --recover is refused by the daemon, in words.
    let client = t.daemon.client().unwrap();
    match client.recover(&id).await {
        Err(ApiError::Http { status, message }) => {
            assert_eq!(status, 409, "{message}");
            assert!(message.contains("is completed and not paused"), "{message}");
        }
        other => panic!("recover of a completed migration: {other:?}"),
    }
    let (lines, code) = run(recover()).await;
    assert_eq!(code, Some(1));
    let sentence = lines.last().unwrap()["error"].as_str().unwrap();
    assert!(
        sentence.starts_with("migration not recovered: the source QEMU's migration is completed, not postcopy-paused"),
        "{sentence}"
    );
    match client.recover(&uuid::Uuid::new_v4().to_string()).await {
        Err(ApiError::Http { status, .. }) => assert_eq!(status, 404),
        other => panic!("recover of an unknown migration: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_postcopy_preempt_cut_is_recovered_with_migrate_recover() {
    cut_then_recover(QemuVersion::System).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_postcopy_preempt_cut_is_recovered_with_migrate_recover_qemu10() {
    cut_then_recover(QemuVersion::V10_0).await;
}

/// A local client that makes a standalone source gateway present its
/// ticket with the start of a main channel (QEVM header, then a section
/// start: no configuration, no UUID), as a second migration would.
/// Returns the gateway's record of it.
async fn present_ticket(gw: &mut common::gateway::Gateway) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    c.write_all(b"QEVM\0\0\0\x03\x01").await.unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    gw.wait_outcome(EVENT_TIMEOUT).await.unwrap()
}

/// The one-shot logic through a recovery, with tickets the test holds:
/// registration and recovery through the API, standalone source gateways
/// (`--ticket-file`, then `--resume-token-file` for the recovery). While
/// paused the first ticket admits nothing; a recovery replaces it (a replay
/// is refused, and shown in the API); a second recovery of the same pause
/// is refused; the recovery's ticket resumes the migration, which
/// completes; then neither ticket starts a second migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_tickets_are_one_shot() {
    use miggate::control::types::{Allow, Forward, IncomingRequest, QmpForward};
    let mut t = setup(QemuVersion::System).await;
    let client = t.daemon.client().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let uuid = t.src.qmp.query_uuid().await.unwrap();
    let caps = [("postcopy-ram", true), ("postcopy-preempt", true)];
    let reg = client
        .register(&IncomingRequest {
            vm_uuid: Some(uuid),
            allow: Allow::Identity(common::scenario::SOURCE_DN.into()),
            forward: Forward::Qmp(QmpForward {
                qmp: format!("unix:{}", s(&t.tq)),
                capabilities: caps.iter().map(|(c, on)| (c.to_string(), *on)).collect(),
                parameters: Default::default(),
            }),
            channels: 1,
            expires_in: 300,
            listeners: None,
            disks: Vec::new(),
            nbd_forward: None,
        })
        .await
        .unwrap();
    let id = reg.id.clone();
    let first = secret_file("first", reg.ticket.expose());
    let path = CutPath::to(&t.daemon.gw.addr).await;
    let pki = t.pki.clone();
    let sgw = common::scenario::source_gateway(&pki, &path.addr, &["--ticket-file", &first]).await;

    let mut src_caps: Vec<Value> = caps
        .iter()
        .map(|(c, on)| json!({"capability": c, "state": on}))
        .collect();
    for cap in ["return-path", "validate-uuid"] {
        src_caps.push(json!({"capability": cap, "state": true}));
    }
    t.src
        .cmd(
            "migrate-set-capabilities",
            json!({ "capabilities": src_caps }),
        )
        .await
        .unwrap();
    // Precopy held back too (as --max-bandwidth/--downtime-limit above),
    // so that it is still under way when postcopy is asked for.
    t.src
        .set_parameters(json!({
            "max-bandwidth": 1u64 << 20,
            "downtime-limit": 20,
            "max-postcopy-bandwidth": SLOW_POSTCOPY,
        }))
        .await
        .unwrap();
    t.dst.forget_old_events().await.unwrap();
    t.src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    wait_status(&mut t.src, "active").await;
    t.src
        .cmd("migrate-start-postcopy", json!({}))
        .await
        .unwrap();
    wait_event(&mut t.dst, "RESUME").await;
    wait_postcopy_bytes(&mut t.src, 64 << 10).await;
    assert_eq!(path.cut(), 2, "main and preempt channels were relayed");
    wait_status(&mut t.src, "postcopy-paused").await;
    wait_status(&mut t.dst, "postcopy-paused").await;
    let v = t.view_when(&id, |v| v.state == Phase::Paused).await;
    assert!(v.refusals.is_empty(), "{v:?}");

    // Paused: the first ticket admits nothing.
    let mut replay =
        common::scenario::source_gateway(&pki, &t.daemon.gw.addr, &["--ticket-file", &first]).await;
    let r = present_ticket(&mut replay).await;
    assert_eq!(r["outcome"], "refused", "{r}");
    let v = t.view_when(&id, |v| !v.refusals.is_empty()).await;
    assert!(v.refusals[0].contains("is paused in postcopy"), "{v:?}");
    assert_eq!(v.state, Phase::Paused);

    let rec = client.recover(&id).await.unwrap();
    assert_ne!(rec.ticket, reg.ticket);
    assert_eq!(t.view_when(&id, |_| true).await.state, Phase::Recovering);
    match client.recover(&id).await {
        Err(ApiError::Http { status, message }) => {
            assert_eq!(status, 409, "{message}");
            assert!(message.contains("is already being recovered"), "{message}");
        }
        other => panic!("second recover: {other:?}"),
    }
    // The first ticket is replaced now.
    let r = present_ticket(&mut replay).await;
    assert_eq!(r["outcome"], "refused", "{r}");
    let v = t.view_when(&id, |v| v.refusals.len() == 2).await;
    assert!(
        v.refusals[1].contains("was replaced by its recovery's"),
        "{v:?}"
    );
    assert_eq!(v.state, Phase::Recovering, "a replay burns no recovery");

    // The recovery, through a new gateway holding the new ticket and token.
    let sock = dir.path().join("resume.sock");
    let second = secret_file("second", rec.ticket.expose());
    let token = secret_file("token", rec.binding_token.expose());
    let pid = t.src.pid().unwrap().to_string();
    let sock_arg = format!("unix:{}", s(&sock));
    let _rgw = common::gateway::miggate()
        .gateway(&[
            "source",
            "--listen",
            &sock_arg,
            "--source-pid",
            &pid,
            "--x509-dir",
            s(&pki),
            "--connect",
            &path.addr,
            "--ticket-file",
            &second,
            "--resume-token-file",
            &token,
        ])
        .await
        .unwrap();
    t.src
        .set_parameters(json!({ "max-postcopy-bandwidth": 0 }))
        .await
        .unwrap();
    t.src
        .cmd("migrate", json!({ "uri": sock_arg, "resume": true }))
        .await
        .unwrap();
    let sv = t.src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    let dv = t.dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(
        (sv.status.as_deref(), dv.status.as_deref()),
        (Some("completed"), Some("completed")),
        "daemon log:\n{}",
        t.daemon.log_text()
    );
    t.dst.assert_running_and_counting().await;
    let v = t.view_when(&id, |v| v.state.is_final()).await;
    assert_eq!(
        (v.state, v.recoveries, v.channels_seen),
        (Phase::Completed, 1, 4),
        "{v:?}"
    );

    // Neither ticket starts a second migration.
    let mut again =
        common::scenario::source_gateway(&pki, &t.daemon.gw.addr, &["--ticket-file", &second])
            .await;
    let r = present_ticket(&mut again).await;
    assert_eq!(r["outcome"], "refused", "{r}");
    let r = present_ticket(&mut replay).await;
    assert_eq!(r["outcome"], "refused", "{r}");
    let v = t.view_when(&id, |v| v.refusals.len() == 4).await;
    assert!(
        v.refusals[2].contains("ticket already used: migration")
            && v.refusals[2].contains("(completed)"),
        "{v:?}"
    );
    assert!(v.refusals[3].contains("replaced"), "{v:?}");
    assert_eq!(v.state, Phase::Completed);
}
