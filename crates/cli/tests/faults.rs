//! Faults during a real migration through miggate, one test per
//! (victim, point): SIGKILL of the source gateway, the target gateway, the
//! daemon, the target QEMU and the source QEMU during the handshake /
//! admission, mid-stream and at the switch-over; and the path between the
//! gateways cut (network namespaces joined by a veth pair). After each:
//! the source QEMU's migration failed with a reason and its VM runs on,
//! the target QEMU loaded nothing, the daemon's registration and metrics
//! say failed, every surviving gateway is idle again, and the same
//! migration, retried after restarting what was killed, completes with the
//! RAM and UUID intact. How the points are reached: `common::faults`.

mod common;

use common::faults::{case, Point, Victim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_during_handshake() {
    case(Victim::SourceGateway, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_mid_stream() {
    case(Victim::SourceGateway, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_at_switchover() {
    case(Victim::SourceGateway, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_gateway_killed_during_handshake() {
    case(Victim::TargetGateway, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_gateway_killed_mid_stream() {
    case(Victim::TargetGateway, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_gateway_killed_at_switchover() {
    case(Victim::TargetGateway, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_during_handshake() {
    case(Victim::Daemon, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_stream() {
    case(Victim::Daemon, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_at_switchover() {
    case(Victim::Daemon, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_qemu_killed_during_handshake() {
    case(Victim::SourceQemu, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_qemu_killed_mid_stream() {
    case(Victim::SourceQemu, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_qemu_killed_at_switchover() {
    case(Victim::SourceQemu, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_during_handshake() {
    case(Victim::TargetQemu, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_mid_stream() {
    case(Victim::TargetQemu, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_at_switchover() {
    case(Victim::TargetQemu, Point::Switchover).await;
}
/// The path between the gateways cut mid-stream (link down, peer address
/// blackholed: no reset, no ICMP): the stall timeout cuts both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_between_gateways_cut_mid_stream() {
    case(Victim::Path, Point::MidStream).await;
}

/// Postcopy is not in the matrix above; this case shows what a kill does
/// there, and what it costs.
mod postcopy_faults {
    use super::common;
    use common::faults::{signal, sockets, wait_idle};
    use common::gateway::{miggate, Gateway};
    use common::postcopy::*;
    use common::qemu::{Guest, Qemu, QemuOpts};
    use common::scenario::*;
    use serde_json::{json, Value};

    /// A QEMU 7.2 pair for a slow postcopy of a 128 MiB guest of random
    /// RAM (`seed`) with a UUID of its own.
    async fn postcopy_pair(seed: u64) -> (Qemu, Qemu, u16, uuid::Uuid) {
        let uuid = uuid::Uuid::new_v4();
        let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed }, 128);
        opts.uuid = Some(uuid);
        let caps = [
            ("validate-uuid", true),
            ("postcopy-ram", true),
            ("return-path", true),
        ];
        let (mut src, dst, port) = qemu_pair_with(&opts, Versions::Q72, &caps, None).await;
        slow_postcopy(&mut src).await;
        (src, dst, port, uuid)
    }

    /// `miggate target` on `addr` checking the source's DN and `uuid`,
    /// forwarding to the target QEMU's `port`, with `--state-dir` if given.
    fn target_args(
        addr: &str,
        pki: &std::path::Path,
        port: u16,
        uuid: uuid::Uuid,
        state: Option<&std::path::Path>,
    ) -> Vec<String> {
        let mut v: Vec<String> = [
            "target",
            "--listen",
            addr,
            "--x509-dir",
            pki.to_str().unwrap(),
            "--forward",
            &format!("tcp:127.0.0.1:{port}"),
            "--authz-identity",
            SOURCE_DN,
            "--expect-uuid",
            &uuid.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(dir) = state {
            v.extend(["--state-dir".to_string(), dir.to_str().unwrap().to_string()]);
        }
        v
    }

    async fn start(args: &[String]) -> Gateway {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        miggate().gateway(&args).await.unwrap()
    }

    /// Migrates through `sgw` into postcopy, SIGKILLs the target gateway
    /// once postcopy pages flow, waits until both QEMUs pause, and returns
    /// the source gateway's record of the cut main channel (failed).
    async fn kill_target_gateway_in_postcopy(
        src: &mut Qemu,
        dst: &mut Qemu,
        tgw: Gateway,
        sgw: &mut Gateway,
    ) -> Value {
        src.forget_old_events().await.unwrap();
        src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
        wait_migration_status(src, "active").await;
        src.cmd("migrate-start-postcopy", json!({})).await.unwrap();
        wait_migration_status(src, "postcopy-active").await;
        wait_migration_status(dst, "postcopy-active").await;
        wait_target_runs_the_vm(dst).await;
        wait_postcopy_bytes(src, 4 << 20).await;
        signal(tgw.pid().unwrap(), "KILL");
        tgw.stop().await;
        wait_migration_status(src, "postcopy-paused").await;
        wait_migration_status(dst, "postcopy-paused").await;
        let rec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "failed", "{rec}");
        rec
    }

    /// The target gateway killed mid-postcopy (the VM runs on the target,
    /// most pages still on the source): both QEMUs pause, the guest split
    /// across them but nothing lost, and the source gateway lets go of the
    /// channel. A target gateway restarted on the same address with the
    /// same `--state-dir` takes the cut main channel's binding back from
    /// disk, admits the source QEMU's resumed main channel (its source
    /// gateway still holds the token), and the migration completes with
    /// the RAM intact. Without a state directory the binding dies with the
    /// process and the recovery is refused (the next test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn target_gateway_killed_in_postcopy_recovers_with_its_state_dir() {
        let pki = pki();
        let pki = pki_dir(&pki);
        let state = tempfile::tempdir().unwrap();
        let state_dir = state.path().join("state");
        let (mut src, mut dst, port, uuid) = postcopy_pair(0x9c2).await;
        let src_hash = src.ram_sha256().await.unwrap();
        let tgw = start(&target_args(
            "127.0.0.1:0",
            &pki,
            port,
            uuid,
            Some(&state_dir),
        ))
        .await;
        let tgw_addr = tgw.addr.clone();
        let mut sgw = source_gateway(&pki, &tgw_addr, &["--stall-timeout", "3"]).await;
        let idle = sockets(sgw.pid().unwrap());
        let rec = kill_target_gateway_in_postcopy(&mut src, &mut dst, tgw, &mut sgw).await;
        // An EOF without close_notify, or a reset when the killed process
        // had unread bytes: the kernel's choice.
        let reason = rec["reason"].as_str().unwrap();
        assert!(
            reason == "target->source: the target's TLS stream was cut without close_notify"
                || reason == "target->source: Connection reset by peer (os error 104)",
            "{rec}"
        );
        wait_idle("source gateway", sgw.pid().unwrap(), idle, || {
            sgw.log_text()
        })
        .await;
        let saved = std::fs::read_to_string(state_dir.join("bindings.json")).unwrap();
        assert!(saved.contains(SOURCE_DN), "{saved}");

        // The operator's recovery, through a target gateway restarted on
        // the same address with the same state directory.
        let mut tgw2 = start(&target_args(&tgw_addr, &pki, port, uuid, Some(&state_dir))).await;
        let (forward, resume) = (format!("tcp:127.0.0.1:{port}"), format!("tcp:{}", sgw.addr));
        recover_and_complete(&mut src, &mut dst, &forward, &resume, &src_hash, || {
            tgw2.log_text()
        })
        .await;
        let rec = tgw2.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(
            (&rec["outcome"], &rec["channel"]),
            (&json!("completed"), &json!("main-resumed")),
            "{rec}"
        );
        // Spent: the state file no longer holds the resumed binding.
        let saved = std::fs::read_to_string(state_dir.join("bindings.json")).unwrap();
        assert!(!saved.contains(SOURCE_DN), "{saved}");
        println!("FAULT postcopy: target gateway killed; recovered through a restarted one with its --state-dir");
    }

    /// The same kill without `--state-dir`: the restarted gateway has no
    /// binding to resume, refuses the recovery, and the target QEMU gets
    /// nothing (still paused, still listening).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn target_gateway_killed_in_postcopy_without_state_refuses_the_recovery() {
        let pki = pki();
        let pki = pki_dir(&pki);
        let (mut src, mut dst, port, uuid) = postcopy_pair(0x9c3).await;
        let tgw = checking_target_gateway(&pki, port, uuid).await;
        let tgw_addr = tgw.addr.clone();
        let mut sgw = source_gateway(&pki, &tgw_addr, &["--stall-timeout", "3"]).await;
        kill_target_gateway_in_postcopy(&mut src, &mut dst, tgw, &mut sgw).await;

        let mut tgw2 = start(&target_args(&tgw_addr, &pki, port, uuid, None)).await;
        let forward = format!("tcp:127.0.0.1:{port}");
        dst.cmd("migrate-recover", json!({ "uri": forward }))
            .await
            .unwrap();
        src.cmd(
            "migrate",
            json!({ "uri": format!("tcp:{}", sgw.addr), "resume": true }),
        )
        .await
        .unwrap();
        let rec = tgw2.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(
            (&rec["outcome"], &rec["channel"], &rec["bytes_sent"]),
            (&json!("refused"), &json!("main-resumed"), &json!(0)),
            "{rec}"
        );
        assert!(
            rec["reason"]
                .as_str()
                .unwrap()
                .starts_with("no paused main channel has this binding token"),
            "{rec}"
        );
        let d = dst.query_migrate().await.unwrap();
        assert_eq!(d.status.as_deref(), Some("postcopy-paused"), "{:?}", d.raw);
    }
}

/// Not a fault: a healthy pause longer than the stall timeout.
mod limits {
    use super::common;
    use common::faults::STALL_SECS;
    use common::qemu::{Guest, QemuExt, QemuOpts};
    use common::scenario::*;
    use serde_json::json;

    /// A migration held at `pre-switchover` (as libvirt holds one while
    /// it completes its NBD storage jobs) sends nothing either way: the
    /// gateways cannot tell that silence from a dead path, so the source
    /// gateway cuts it at the stall timeout, and `migrate-continue` then
    /// fails it (the VM runs on). `--stall-timeout` must exceed the
    /// longest such pause (default 30 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_at_switchover_longer_than_the_stall_timeout_is_cut() {
        let pki = pki();
        let pki = pki_dir(&pki);
        let opts = QemuOpts::new(Guest::RunningCounter, 64);
        let (mut src, mut dst, port) = qemu_pair(&opts).await;
        capabilities(&mut src, &mut dst, &[("return-path", true)]).await;
        src.set_capabilities(&[("pause-before-switchover", true)])
            .await
            .unwrap();
        let stall = STALL_SECS.to_string();
        let args = ["--authz-identity", SOURCE_DN, "--stall-timeout", &stall];
        let mut tgw = target_gateway(&pki, port, &args).await;
        let mut sgw = source_gateway(&pki, &tgw.addr, &["--stall-timeout", &stall]).await;
        src.assert_running_and_counting().await;
        src.forget_old_events().await.unwrap();
        src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
        common::postcopy::wait_migration_status(&mut src, "pre-switchover").await;

        // Held there: the cut comes by itself, from whichever gateway's
        // stall timeout fires first; the other sees the cut.
        let (s, t) = (
            sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap(),
            tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap(),
        );
        assert_eq!(
            (&s["outcome"], &t["outcome"]),
            (&json!("failed"), &json!("failed"))
        );
        let stalled = format!("peer sent nothing for {STALL_SECS} s: channel cut");
        assert!(
            s["reason"] == stalled.as_str() || t["reason"] == stalled.as_str(),
            "{s}\n{t}"
        );
        src.cmd("migrate-continue", json!({ "state": "pre-switchover" }))
            .await
            .unwrap();
        let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
        assert_eq!(s.status.as_deref(), Some("failed"), "{:?}", s.raw);
        src.assert_running_and_counting().await;
    }
}
