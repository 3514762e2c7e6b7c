//! `miggate migrate --postcopy` end to end: a running guest that dirties
//! memory faster than a capped link never converges in precopy; after
//! `--postcopy-after-passes` passes the command switches to postcopy and
//! the guest arrives through a real daemon, still counting.

mod common;

use std::process::Stdio;
use std::time::Instant;

use common::gateway::BIN;
use common::managed_run::{counter_pair, messages, run_migrate, s, CounterPair};
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts, QemuVersion};
use common::scenario::{pki, pki_dir};
use miggate::control::types::Phase;
use serde_json::Value;
use tokio::process::Command;

/// Precopy cannot converge: the counter guest keeps 144 pages (576 KiB)
/// dirty, and 1 MiB/s for 20 ms lets at most ~20 KiB go in the final
/// pause. The first pass (64 MiB, mostly zero pages) takes a second or
/// two at that rate; postcopy then runs at QEMU's unlimited default.
const BANDWIDTH: &str = "1M";
const DOWNTIME_MS: &str = "20";
const RAM_MIB: u32 = 64;

/// A running counter guest on `qemu`, a daemon in front of its target.
type Setup = CounterPair;

async fn setup(qemu: QemuVersion) -> Setup {
    counter_pair(qemu, RAM_MIB, "miggate-postcopy-").await
}

impl CounterPair {
    /// `miggate migrate --json` of the counter guest, capped, plus `extra`.
    fn command(&self, extra: &[&str]) -> Command {
        let tq = format!("unix:{}", s(&self.tq));
        let mut c = self.migrate(&[
            "--max-bandwidth",
            BANDWIDTH,
            "--downtime-limit",
            DOWNTIME_MS,
            "--target-qmp",
            &tq,
        ]);
        c.args(extra);
        c
    }
}

fn kill(sig: &str, pid: u32) {
    assert!(std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// The case: the capped running guest completes with `--postcopy`
/// through the daemon and keeps counting on the target; the summary says
/// it switched after the passes asked for.
/// With `preempt`, also `--postcopy-preempt`: the preempt channel joins
/// the main channel through both gateways and the registration.
async fn running_guest_completes_in_postcopy(qemu: QemuVersion, preempt: bool) {
    let mut t = setup(qemu).await;
    let t0 = Instant::now();
    let args: &[&str] = if preempt {
        &["--postcopy", "--postcopy-preempt"]
    } else {
        &["--postcopy"]
    };
    let (lines, code) = run_migrate(t.command(args), |_, _, _| {}).await;
    eprintln!(
        "FIGURE migrate_postcopy {qemu} {RAM_MIB} MiB running guest at {BANDWIDTH}/s: {:?}",
        t0.elapsed()
    );
    assert_eq!(code, Some(0), "daemon log:\n{}", t.daemon.log_text());
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "result");
    assert_eq!(last["ok"], true, "{last}");
    // Switched after exactly the default 2 passes, not by luck earlier.
    let after = last["postcopy"]["after_passes"].as_u64().unwrap();
    assert!(after >= 2, "{last}");
    assert!(last["postcopy"]["requested_pages"].is_u64(), "{last}");
    assert!(last["passes"].as_u64().unwrap() > after, "{last}");
    let steps = messages(&lines, "step");
    assert!(
        steps
            .iter()
            .any(|m| m.contains("on: postcopy after 2 passes") && m.contains("postcopy-ram")),
        "{steps:?}"
    );
    assert!(
        steps
            .iter()
            .any(|m| m.starts_with(&format!("precopy has not converged after {after} passes"))),
        "{steps:?}"
    );
    // Precopy really did not converge before: every progress object until
    // the switch is in precopy, and passes went beyond the threshold.
    let first_post = lines
        .iter()
        .position(|l| l["type"] == "progress" && l["status"] != "active" && l["status"] != "setup");
    let precopy_passes = lines[..first_post.unwrap_or(lines.len())]
        .iter()
        .filter(|l| l["type"] == "progress")
        .filter_map(|l| l["pass"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(precopy_passes > 2, "{lines:#?}");

    // The daemon set postcopy-ram on the target, and the target is the VM now.
    let caps = t
        .dst
        .cmd("query-migrate-capabilities", Value::Null)
        .await
        .unwrap();
    let on = |name: &str| {
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == name && c["state"] == true)
    };
    assert!(on("postcopy-ram"), "{caps}");
    assert_eq!(on("postcopy-preempt"), preempt, "{caps}");
    t.dst.assert_running_and_counting().await;
    assert_eq!(t.src.query_status().await.unwrap(), "postmigrate");
    let info = t.src.query_migrate().await.unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"), "{:?}", info.raw);
    assert!(
        info.ram.unwrap().postcopy_bytes.unwrap_or(0) > 0,
        "{:?}",
        info.raw
    );
    let id = last["migration_id"].as_str().unwrap();
    let view = t.daemon.client().unwrap().migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Completed, "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_running_guest_completes_through_daemon() {
    running_guest_completes_in_postcopy(QemuVersion::System, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_running_guest_completes_through_daemon_qemu10() {
    running_guest_completes_in_postcopy(QemuVersion::V10_0, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_running_guest_completes_through_daemon() {
    running_guest_completes_in_postcopy(QemuVersion::System, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_preempt_running_guest_completes_through_daemon_qemu10() {
    running_guest_completes_in_postcopy(QemuVersion::V10_0, true).await;
}

/// The counterfactual: without `--postcopy` the same guest and cap go
/// pass after pass without converging (SIGINT after the 4th begins, which
/// cancels it and leaves the guest on the source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_postcopy_the_same_guest_does_not_converge() {
    let mut t = setup(QemuVersion::System).await;
    let mut signalled = false;
    let (lines, code) = run_migrate(t.command(&[]), |v, _, pid| {
        if !signalled && v["type"] == "progress" && v["pass"].as_u64() >= Some(4) {
            assert_eq!(v["status"], "active", "{v}");
            signalled = true;
            kill("-INT", pid);
        }
    })
    .await;
    assert!(signalled, "ended before pass 4: {lines:#?}");
    assert_eq!(code, Some(130));
    let sentence = lines.last().unwrap()["error"].as_str().unwrap();
    assert!(
        sentence.ends_with("the VM is still running on the source."),
        "{sentence}"
    );
    assert!(
        !lines.iter().any(|l| l["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("postcopy"))),
        "{lines:#?}"
    );
    t.src.assert_running_and_counting().await;
}

/// Slows postcopy down on the source (miggate leaves
/// max-postcopy-bandwidth alone) so that a test can act while in it.
async fn slow_postcopy(src: &mut Qemu) {
    src.set_parameters(serde_json::json!({"max-postcopy-bandwidth": 128 << 10}))
        .await
        .unwrap();
}

/// In postcopy neither SIGINT nor the daemon's DELETE cancels (nor claims
/// the source keeps the VM): the signal is reported, the DELETE refused
/// with why (409), and the migration completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_postcopy_sigint_and_delete_do_not_cancel_and_it_completes() {
    let mut t = setup(QemuVersion::System).await;
    slow_postcopy(&mut t.src).await;
    let client = t.daemon.client().unwrap();
    let mut refused = None;
    let (lines, code) = run_migrate(t.command(&["--postcopy"]), |v, _, pid| {
        if refused.is_none() && v["type"] == "progress" && v["status"] == "postcopy-active" {
            // The closure is synchronous: the API call blocks this worker.
            let answer = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let all = client.migrations().await.unwrap();
                    client.cancel(&all[0].id).await
                })
            });
            refused = Some(answer);
            kill("-INT", pid);
        }
    })
    .await;
    let refused = refused.unwrap_or_else(|| panic!("never saw postcopy-active: {lines:#?}"));
    match refused {
        Err(miggate::control::client::ApiError::Http { status, message }) => {
            assert_eq!(status, 409, "{message}");
            assert!(
                message.contains("is in postcopy (target QEMU postcopy-active)"),
                "{message}"
            );
        }
        other => panic!("DELETE in postcopy: {other:?}"),
    }
    assert_eq!(code, Some(0), "daemon log:\n{}", t.daemon.log_text());
    let notes = messages(&lines, "note");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("SIGINT: a migration in postcopy cannot be cancelled")),
        "{notes:?}"
    );
    // Slow background copy: the guest touched pages before they came, and
    // the target's requests went back through both gateways.
    let pages = lines.last().unwrap()["postcopy"]["requested_pages"].as_u64();
    assert!(pages > Some(0), "{:?}", lines.last());
    t.dst.assert_running_and_counting().await;
    assert_eq!(t.src.query_status().await.unwrap(), "postmigrate");
    let id = lines.last().unwrap()["migration_id"].as_str().unwrap();
    let view = client.migration(id).await.unwrap();
    assert_eq!(view.state, Phase::Completed, "{view:?}");
}

/// A second SIGINT in postcopy pauses the migration: the sentence says the
/// guest is split over the hosts and recoverable, never that the source
/// keeps running; the source QEMU is postcopy-paused, the daemon's
/// registration paused, and the command says how to recover it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigint_in_postcopy_pauses_and_says_where_the_guest_is() {
    let mut t = setup(QemuVersion::System).await;
    slow_postcopy(&mut t.src).await;
    let mut signals = 0;
    let (lines, code) = run_migrate(t.command(&["--postcopy"]), |v, seen, pid| {
        let noted = |m: &Value| {
            m["type"] == "note"
                && m["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("cannot be cancelled"))
        };
        if signals == 0 && v["type"] == "progress" && v["status"] == "postcopy-active" {
            signals = 1;
            kill("-INT", pid);
        } else if signals == 1 && (noted(v) || seen.iter().any(&noted)) {
            signals = 2;
            kill("-INT", pid);
        }
    })
    .await;
    assert_eq!(signals, 2, "{lines:#?}");
    assert_eq!(code, Some(130));
    let last = lines.last().unwrap();
    let sentence = last["error"].as_str().unwrap();
    assert!(
        sentence.starts_with(
            "migration paused in postcopy: interrupted by SIGINT: the source QEMU paused the migration (migrate-pause); \
             the source QEMU is postcopy-paused: "
        ),
        "{sentence}"
    );
    assert!(sentence.contains("not lost"), "{sentence}");
    assert!(
        !sentence.contains("still running on the source"),
        "{sentence}"
    );
    let info = t.src.query_migrate().await.unwrap();
    assert_eq!(
        info.status.as_deref(),
        Some("postcopy-paused"),
        "{:?}",
        info.raw
    );
    // The daemon asks the target QEMU once the channels have ended, and
    // books what it says (no event to await: its API, until a deadline).
    let id = last["migration_id"].as_str().unwrap();
    let client = t.daemon.client().unwrap();
    let deadline = Instant::now() + common::scenario::EVENT_TIMEOUT;
    let view = loop {
        let v = client.migration(id).await.unwrap();
        if v.reason.is_some() || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // Paused, not failed: it waits for `miggate migrate --recover`, which
    // the command named (see migrate_recover.rs).
    assert_eq!(view.state, Phase::Paused, "{view:?}");
    assert!(
        view.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("target QEMU: postcopy-paused")),
        "{view:?}"
    );
    assert!(
        messages(&lines, "note")
            .iter()
            .any(|n| n.starts_with(&format!(
                "to recover the migration, run: miggate migrate --recover {id} "
            ))),
        "{lines:#?}"
    );
}

/// What QEMU cannot do is refused before anything changes, in words:
/// `--postcopy --multifd` on QEMU 7.2 (which would accept the pair and
/// break at the switch) stops at the source's check, the daemon is never
/// asked; `--postcopy-preempt` without `--postcopy` is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_with_multifd_on_qemu_7_2_is_refused_before_registering() {
    let pki_t = pki();
    let pki = pki_dir(&pki_t);
    let dir = tempfile::Builder::new()
        .prefix("miggate-postcopy-")
        .tempdir()
        .unwrap();
    let opts = QemuOpts::new(Guest::Empty, RAM_MIB);
    let (mut src, _dst, sq, tq) = Qemu::pair_with_qmp(&opts, dir.path()).await.unwrap();
    let daemon = common::daemon::start(dir.path(), &pki).await;
    let args = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("migrate")
            .args([
                "--json",
                "--source-qmp",
                s(&sq),
                "--target",
                &daemon.target(),
                "--target-qmp",
                s(&tq),
                "--x509-dir",
                s(&pki),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let (lines, code) = run_migrate(args(&["--postcopy", "--multifd", "2"]), |_, _, _| {}).await;
    assert_eq!(code, Some(1));
    let sentence = lines.last().unwrap()["error"].as_str().unwrap();
    assert!(
        sentence.starts_with(
            "migration not started: source postcopy-ram with multifd needs QEMU 10.1 or later on both ends, not QEMU 7.2."
        ),
        "{sentence}"
    );
    assert!(daemon
        .client()
        .unwrap()
        .migrations()
        .await
        .unwrap()
        .is_empty());
    let info = src.query_migrate().await.unwrap();
    assert_eq!(info.status, None, "{:?}", info.raw);

    let out = args(&["--postcopy-preempt"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--postcopy"), "{err}");
}
