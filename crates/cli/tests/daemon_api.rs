//! `miggate daemon`: the real binary with a config in a tempdir, its
//! control API on a unix socket, its metrics, and real QEMU migrations
//! through `miggate source --ticket-file`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::gateway::{miggate, Gateway};
use common::nobody::connect_as_nobody;
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use common::scenario::*;
use miggate::admit::ticket::Ticket;
use miggate::control::types::{
    Allow, Forward, IncomingRequest, IncomingResponse, ListenerRef, MigrationView, Phase,
    QmpForward,
};
use miggate::control::{ApiAddr, ApiClient, ApiError};
use miggate_lab::{split_host_port, DaemonOpts};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

const VM_A: Uuid = Uuid::from_u128(0xda3e_0000_0000_4000_8000_0000_0000_000a);
const VM_B: Uuid = Uuid::from_u128(0xda3e_0000_0000_4000_8000_0000_0000_000b);
/// A registration whose stream must never reach a QEMU: nothing listens
/// on the discard port.
const NOWHERE: &str = "tcp:127.0.0.1:9";
/// How long a test polls the API for a state before giving up.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Low enough that a running guest dirtying 576 KiB continuously never
/// converges: the migration stays active until it is cancelled.
const CRAWL_BANDWIDTH: u64 = 1 << 20;

/// A running `miggate daemon` with its config, API socket and metrics.
struct Daemon {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    gw: Gateway,
    metrics: String,
    api: ApiClient,
}

impl Daemon {
    async fn start(pki: &Path) -> Daemon {
        Self::start_with(pki, "").await
    }

    /// With `extra` appended to the configuration file.
    async fn start_with(pki: &Path, extra: &str) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("miggate-daemon-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let opts = DaemonOpts {
            // Inside the runtime directory: the test checks its mode.
            api_socket: "run/api.sock".into(),
            metrics: true,
            target_extra: format!("stall_timeout = 10\n{extra}"),
            log_file: None,
        };
        let miggate_lab::Daemon {
            gw,
            api: socket,
            config,
            metrics,
        } = miggate().daemon(&dir, pki, &opts).await.unwrap();
        let metrics = metrics.unwrap();
        let api = ApiClient::new(ApiAddr::Unix(socket.clone())).unwrap();
        Daemon {
            _dir: tmp,
            dir,
            config,
            socket,
            gw,
            metrics,
            api,
        }
    }

    async fn register(&self, req: &IncomingRequest) -> IncomingResponse {
        let r = self
            .api
            .register(req)
            .await
            .unwrap_or_else(|e| panic!("register: {e}\nlog:\n{}", self.gw.log_text()));
        assert_eq!(r.listen, vec![self.gw.addr.clone()]);
        r
    }

    /// A file holding the ticket, as `miggate source --ticket-file` reads it.
    fn ticket_file(&self, name: &str, ticket: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, format!("{ticket}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// A source gateway presenting `ticket` to this daemon.
    async fn source(&self, pki: &Path, name: &str, ticket: &str) -> Gateway {
        let f = self.ticket_file(name, ticket);
        source_gateway(pki, &self.gw.addr, &["--ticket-file", f.to_str().unwrap()]).await
    }

    /// Polls the API until the migration satisfies `pred` (the API has no
    /// long-poll; the registry changes state as channels end).
    async fn wait_view(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(&MigrationView) -> bool,
    ) -> MigrationView {
        let deadline = tokio::time::Instant::now() + STATE_TIMEOUT;
        loop {
            let v = self.api.migration(id).await.unwrap();
            if pred(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "migration {id} never became {what}: {v:?}\nlog:\n{}",
                self.gw.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_state(&self, id: &str, state: Phase) -> MigrationView {
        self.wait_view(id, state.as_str(), |v| v.state == state)
            .await
    }

    /// The value of one metrics sample line, e.g. `miggate_x{a="b"}`.
    async fn metric(&self, series: &str) -> f64 {
        let (status, body) = http(
            tokio::net::TcpStream::connect(&self.metrics).await.unwrap(),
            "GET",
            "/metrics",
            None,
        )
        .await;
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    }
}

/// One raw HTTP/1.1 exchange (for requests the typed client cannot send).
async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn request(vm: Option<Uuid>, forward: Forward) -> IncomingRequest {
    IncomingRequest {
        vm_uuid: vm,
        allow: Allow::Identity(SOURCE_DN.into()),
        forward,
        channels: 1,
        expires_in: 300,
        listeners: None,
        disks: Vec::new(),
        nbd_forward: None,
    }
}

fn endpoint(port: u16) -> Forward {
    Forward::Endpoint(format!("tcp:127.0.0.1:{port}"))
}

/// A source VM with `uuid`, return-path (a refusal makes its migration
/// fail) and validate-uuid (the stream carries its UUID).
async fn source_vm(guest: Guest, uuid: Uuid) -> Qemu {
    let mut opts = QemuOpts::new(guest, 64);
    opts.uuid = Some(uuid);
    let mut q = Qemu::spawn(opts).await.unwrap();
    q.set_capabilities(&[("return-path", true), ("validate-uuid", true)])
        .await
        .unwrap();
    q.set_unlimited_bandwidth().await.unwrap();
    q
}

async fn query_uuid(q: &mut Qemu) -> String {
    q.cmd("query-uuid", Value::Null).await.unwrap()["UUID"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn api_refuses_bad_requests_with_reasons_and_other_users() {
    let pki_tmp = pki();
    let d = Daemon::start(&pki_dir(&pki_tmp)).await;

    let raw = |method: &'static str, path: &'static str, body: Option<&'static str>| {
        let sock = d.socket.clone();
        async move {
            let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            http(s, method, path, body).await
        }
    };
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "POST",
            "/v1/incoming",
            Some("{\"allow\":"),
            400,
            "invalid request body: EOF",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(r#"{"allow":{"identity":"CN=a"},"forward":"tcp:127.0.0.1:1","bogus":1}"#),
            400,
            "unknown field `bogus`",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(
                r#"{"vm_uuid":"not-a-uuid","allow":{"identity":"CN=a"},"forward":"tcp:127.0.0.1:1"}"#,
            ),
            400,
            "UUID parsing failed",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(r#"{"allow":{"identity":"CN=a"},"forward":"127.0.0.1:1"}"#),
            400,
            "needs the tcp: or unix: prefix",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(r#"{"allow":{"identity":"CN=a"},"forward":{"qmp":"tcp:127.0.0.1:1"}}"#),
            400,
            "is not unix:PATH",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(
                r#"{"allow":{"acl_file":"/nonexistent-miggate/acl.json"},"forward":"tcp:127.0.0.1:1"}"#,
            ),
            400,
            "allow.acl_file: ",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(r#"{"allow":{"identity":"CN=a"},"forward":"tcp:127.0.0.1:1","channels":65}"#),
            400,
            "channels must be from 1 to 64",
        ),
        (
            "POST",
            "/v1/incoming",
            Some(r#"{"allow":{"identity":"CN=a"},"forward":"tcp:127.0.0.1:1","expires_in":0}"#),
            400,
            "expires_in must be from 1",
        ),
        (
            "GET",
            "/v1/migrations/42",
            None,
            400,
            "is not a migration id",
        ),
        (
            "GET",
            "/v1/migrations/6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
            None,
            404,
            "no migration 6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
        ),
        (
            "DELETE",
            "/v1/migrations/6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
            None,
            404,
            "no migration",
        ),
        (
            "PUT",
            "/v1/migrations",
            None,
            405,
            "does not take that method",
        ),
        ("GET", "/v2/nothing", None, 404, "no such endpoint"),
    ];
    for (method, path, body, status, reason) in cases {
        let (got, text) = raw(method, path, *body).await;
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        let error = v["error"].as_str().unwrap_or_default();
        assert_eq!(got, *status, "{method} {path} {body:?}: {text}");
        assert!(
            error.contains(reason),
            "{method} {path} {body:?}: {error:?} lacks {reason:?}"
        );
    }

    // The typed client carries the daemon's sentence and status.
    let e = d
        .api
        .migration(&Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::Http { status: 404, ref message } if message.starts_with("no migration")),
        "{e}"
    );

    // A registration that is fine is listed; its ticket is not.
    let r = d
        .register(&request(Some(VM_A), Forward::Endpoint(NOWHERE.into())))
        .await;
    assert_eq!(r.ticket.expose().len(), 64);
    Ticket::parse(r.ticket.expose()).unwrap();
    let (status, list) = raw("GET", "/v1/migrations", None).await;
    assert_eq!(status, 200);
    assert!(
        list.contains(&r.id) && !list.contains(r.ticket.expose()),
        "{list}"
    );
    let v = d.api.migration(&r.id).await.unwrap();
    assert_eq!((v.state, v.vm_uuid), (Phase::Registered, Some(VM_A)));
    assert_eq!(v.allow, format!("identity {SOURCE_DN}"));

    // A reload may not move a listener; the sentence says so.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace("127.0.0.1:0\"\nx509", "127.0.0.1:1\"\nx509"),
    )
    .unwrap();
    let e = d.api.reload().await.unwrap_err();
    assert!(
        matches!(e, ApiError::Http { status: 422, ref message } if message.contains("target[0].listen") && message.contains("cannot change on reload")),
        "{e}"
    );
    std::fs::write(&d.config, &text).unwrap();
    d.api.reload().await.unwrap();

    // The socket is the owner's alone: mode 0600, and another user cannot
    // connect even where the directories let them reach it.
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    for dir in [d.dir.as_path(), d.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let err = connect_as_nobody(&d.socket);
    assert!(
        err.contains("Permission denied"),
        "user nobody connected to the API socket: {err}"
    );
}

#[tokio::test]
async fn daemon_config_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = \"/nonexistent-miggate-pki\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::gateway::BIN)
        .args(["daemon", "--check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}: target[0].x509_dir: /nonexistent-miggate-pki",
            config.display()
        )),
        "{err}"
    );
}

/// Register with a QMP forward (the daemon issues migrate-incoming), migrate
/// a running guest with the ticket, and see the ticket spent.
#[tokio::test]
async fn registered_migration_completes_and_its_ticket_is_spent() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let mut d = Daemon::start(&pki).await;
    let mut src = source_vm(Guest::RunningCounter, VM_A).await;
    let qmp2 = d.dir.join("dst-qmp.sock");
    let mut dst_opts = QemuOpts::new(Guest::RunningCounter, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    dst_opts.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp2.display()),
    ];
    let mut dst = Qemu::spawn(dst_opts).await.unwrap();
    src.assert_running_and_counting().await;

    let forward = Forward::Qmp(QmpForward {
        qmp: format!("unix:{}", qmp2.display()),
        capabilities: BTreeMap::from([("return-path".to_string(), true)]),
        parameters: serde_json::Map::new(),
    });
    let r = d.register(&request(Some(VM_A), forward)).await;
    // The daemon's migrate-incoming: the target QEMU listens where the
    // registration forwards.
    let info = dst.query_migrate().await.unwrap();
    let forward = d.api.migration(&r.id).await.unwrap().forward;
    assert_eq!(
        Some(forward.as_str()),
        info.raw["socket-address"][0]["path"]
            .as_str()
            .map(|p| format!("unix:{p}"))
            .as_deref(),
        "{:?}",
        info.raw
    );

    let sgw = d.source(&pki, "ticket", r.ticket.expose()).await;
    let uri = format!("tcp:{}", sgw.addr);
    migrate_and_expect_completed(&mut src, &mut dst, &uri).await;
    dst.assert_running_and_counting().await;
    assert_eq!(query_uuid(&mut dst).await, VM_A.to_string());

    let v = d.wait_state(&r.id, Phase::Completed).await;
    assert_eq!(v.peer_dn.as_deref(), Some(SOURCE_DN), "{v:?}");
    assert_eq!((v.channels_seen, v.channels_open), (1, 0), "{v:?}");
    assert!(v.bytes_sent > 1 << 20 && v.bytes_recv > 0, "{v:?}");
    assert!(v.started_at.is_some() && v.ended_at.is_some(), "{v:?}");
    assert!(v.forward.starts_with("unix:"), "{v:?}");

    // The same ticket again (a copy of the VM, as a replaying attacker
    // would bring): refused, and the API shows who tried.
    drop(src);
    let mut copy = source_vm(Guest::RunningCounter, VM_A).await;
    let desc = migrate_and_expect_failure(&mut copy, &uri).await;
    let rec =
        d.gw.wait_event(
            |v| v["target"] == "miggate::outcome" && v["outcome"] == "refused",
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("ticket already used"),
        "{rec} / {desc}"
    );
    let v = d.api.migration(&r.id).await.unwrap();
    assert_eq!(v.state, Phase::Completed);
    assert!(
        v.refusals.iter().any(|r| r.contains("ticket already used")),
        "{v:?}"
    );

    assert_eq!(
        d.metric("miggate_connections_total{outcome=\"completed\"}")
            .await,
        1.0
    );
    assert_eq!(
        d.metric("miggate_refusals_total{reason=\"ticket\"}").await,
        1.0
    );
    assert!(
        d.metric("miggate_bytes_total{direction=\"source_to_target\"}")
            .await
            > 1e6
    );
    assert_eq!(d.metric("miggate_admission_seconds_count").await, 1.0);
    assert_eq!(d.metric("miggate_active_migrations").await, 0.0);
    assert_eq!(
        d.metric("miggate_migrations{state=\"completed\"}").await,
        1.0
    );
}

/// An expired ticket, a ticket for another VM, and an unknown ticket are
/// refused with their reason; nothing reaches a QEMU.
#[tokio::test]
async fn expired_wrong_vm_and_unknown_tickets_are_refused() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let mut d = Daemon::start(&pki).await;
    let mut src = source_vm(Guest::RunningCounter, VM_A).await;
    src.assert_running_and_counting().await;

    let mut expiring = request(Some(VM_A), Forward::Endpoint(NOWHERE.into()));
    expiring.expires_in = 1;
    let expired = d.register(&expiring).await;
    let other_vm = d
        .register(&request(Some(VM_B), Forward::Endpoint(NOWHERE.into())))
        .await;
    d.wait_state(&expired.id, Phase::Expired).await;

    // The daemon's record says why; the source is told which check failed.
    let cases = [
        (
            "expired",
            expired.ticket.expose().to_string(),
            "expired at",
            "ticket expired",
        ),
        (
            "other-vm",
            other_vm.ticket.expose().to_string(),
            "VM UUID mismatch",
            "wrong VM",
        ),
        (
            "unknown",
            Ticket::generate().expose().to_string(),
            "unknown ticket",
            "unknown ticket",
        ),
    ];
    for (name, ticket, reason, told) in cases {
        let mut sgw = d.source(&pki, name, &ticket).await;
        migrate_and_expect_failure(&mut src, &format!("tcp:{}", sgw.addr)).await;
        let rec = d.gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "refused", "{name}: {rec}");
        assert_eq!(rec["bytes_sent"], 0, "{name}: {rec}");
        assert!(
            rec["reason"].as_str().unwrap().contains(reason),
            "{name}: {rec}"
        );
        let srec = sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(srec["reason"], format!("target refused: {told}"), "{name}");
        sgw.stop().await;
    }
    let v = d.api.migration(&expired.id).await.unwrap();
    assert_eq!(v.state, Phase::Expired);
    assert!(v.refusals.iter().any(|r| r.contains("expired at")), "{v:?}");
    let v = d.api.migration(&other_vm.id).await.unwrap();
    assert_eq!(
        v.state,
        Phase::Failed,
        "a ticket shown with the wrong VM is burnt: {v:?}"
    );
    assert!(
        v.reason
            .as_deref()
            .unwrap_or_default()
            .contains("VM UUID mismatch"),
        "{v:?}"
    );

    assert_eq!(
        d.metric("miggate_connections_total{outcome=\"refused\"}")
            .await,
        3.0
    );
    assert_eq!(
        d.metric("miggate_refusals_total{reason=\"ticket\"}").await,
        2.0
    );
    assert_eq!(
        d.metric("miggate_refusals_total{reason=\"uuid\"}").await,
        1.0
    );
    assert_eq!(
        d.metric("miggate_connections_total{outcome=\"completed\"}")
            .await,
        0.0
    );
}

/// Seed 003's race: two migrations for one daemon listener, started at
/// once. Each lands in its own VM (UUID and RAM checked), never crossed.
#[tokio::test]
async fn two_migrations_racing_for_one_listener_land_in_their_own_vms() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let d = Daemon::start(&pki).await;
    let spawn_dst = |uuid| {
        let mut o = QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming();
        o.uuid = Some(uuid);
        Qemu::spawn(o)
    };
    let (src_a, src_b, dst_a, dst_b) = tokio::join!(
        source_vm(Guest::PausedRandomRam { seed: 0xa }, VM_A),
        source_vm(Guest::PausedRandomRam { seed: 0xb }, VM_B),
        spawn_dst(VM_A),
        spawn_dst(VM_B),
    );
    let (mut src_a, mut src_b, mut dst_a, mut dst_b) =
        (src_a, src_b, dst_a.unwrap(), dst_b.unwrap());
    let (port_a, port_b) = (
        dst_a.migrate_incoming_any_port().await.unwrap(),
        dst_b.migrate_incoming_any_port().await.unwrap(),
    );
    let (hash_a, hash_b) = (
        src_a.ram_sha256().await.unwrap(),
        src_b.ram_sha256().await.unwrap(),
    );
    assert_ne!(hash_a, hash_b);

    let reg_a = d.register(&request(Some(VM_A), endpoint(port_a))).await;
    let reg_b = d.register(&request(Some(VM_B), endpoint(port_b))).await;
    let sgw_a = d.source(&pki, "ticket-a", reg_a.ticket.expose()).await;
    let sgw_b = d.source(&pki, "ticket-b", reg_b.ticket.expose()).await;
    let (uri_a, uri_b) = (format!("tcp:{}", sgw_a.addr), format!("tcp:{}", sgw_b.addr));
    tokio::join!(
        migrate_and_expect_completed(&mut src_a, &mut dst_a, &uri_a),
        migrate_and_expect_completed(&mut src_b, &mut dst_b, &uri_b),
    );

    assert_eq!(query_uuid(&mut dst_a).await, VM_A.to_string());
    assert_eq!(query_uuid(&mut dst_b).await, VM_B.to_string());
    assert_eq!(
        dst_a.ram_sha256().await.unwrap(),
        hash_a,
        "VM A's RAM did not arrive in VM A"
    );
    assert_eq!(
        dst_b.ram_sha256().await.unwrap(),
        hash_b,
        "VM B's RAM did not arrive in VM B"
    );
    for (reg, vm) in [(&reg_a, VM_A), (&reg_b, VM_B)] {
        let v = d.wait_state(&reg.id, Phase::Completed).await;
        assert_eq!(v.vm_uuid, Some(vm));
        assert!(v.refusals.is_empty(), "{v:?}");
    }
}

/// DELETE while the migration runs: every channel is cut, both QEMUs see
/// the migration fail, the source VM keeps running.
#[tokio::test]
async fn cancel_mid_migration_fails_both_ends_and_the_source_keeps_running() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let d = Daemon::start(&pki).await;
    let mut src = source_vm(Guest::RunningCounter, VM_A).await;
    src.set_parameters(json!({ "max-bandwidth": CRAWL_BANDWIDTH }))
        .await
        .unwrap();
    let mut dst_opts = QemuOpts::new(Guest::RunningCounter, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    let mut dst = Qemu::spawn(dst_opts).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    src.assert_running_and_counting().await;

    let r = d.register(&request(Some(VM_A), endpoint(port))).await;
    let sgw = d.source(&pki, "ticket", r.ticket.expose()).await;
    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    d.wait_view(&r.id, "active with bytes flowing", |v| {
        v.state == Phase::Active && v.bytes_sent > 0
    })
    .await;
    assert_eq!(d.metric("miggate_active_migrations").await, 1.0);

    let v = d.api.cancel(&r.id).await.unwrap();
    assert_eq!(v.state, Phase::Cancelled, "{v:?}");
    let (s, t) = tokio::join!(
        src.wait_migration_end(MIGRATION_TIMEOUT),
        dst.wait_migration_end(MIGRATION_TIMEOUT)
    );
    let (s, t) = (s.unwrap(), t.unwrap());
    assert_eq!(s.status.as_deref(), Some("failed"), "source: {:?}", s.raw);
    assert_eq!(
        t.status.as_deref(),
        Some("failed"),
        "destination: {:?}",
        t.error_desc
    );
    src.assert_running_and_counting().await;

    let v = d
        .wait_view(&r.id, "cancelled with no channel open", |v| {
            v.channels_open == 0
        })
        .await;
    assert_eq!(v.state, Phase::Cancelled);
    assert_eq!(v.reason.as_deref(), Some("cancelled by the operator"));
    let again = d.api.cancel(&r.id).await.unwrap_err();
    assert_eq!(again.status(), Some(409), "{again}");
    assert_eq!(
        d.metric("miggate_connections_total{outcome=\"failed\"}")
            .await,
        1.0
    );
    assert_eq!(
        d.metric("miggate_migrations{state=\"cancelled\"}").await,
        1.0
    );
}

/// The API over TCP with mutual TLS: its own PKI and admin ACL, separate
/// from the migration ones.
#[tokio::test]
async fn remote_api_needs_an_admin_certificate_the_admin_acl_allows() {
    const ADMIN_DN: &str = "O=miggate tests,CN=admin.test";
    let pki_tmp = pki();
    let admin = pki_tmp.path().join("admin-pki");
    common::gateway::pki_init(&admin, &["--client-dn", ADMIN_DN]);
    let other = common::gateway::pki_issue(
        &admin,
        &pki_tmp.path().join("other"),
        "O=miggate tests,CN=intern.test",
    );
    let extra = format!(
        "\n[api.tls]\nlisten = \"127.0.0.1:0\"\nx509_dir = \"{}\"\nauthz_identity = \"{ADMIN_DN}\"\n",
        admin.display()
    );
    let mut d = Daemon::start_with(&pki_dir(&pki_tmp), &extra).await;
    let ev =
        d.gw.wait_event(
            |v| v["message"] == "API listening with mutual TLS",
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    let url = format!(
        "https://localhost:{}",
        split_host_port(ev["listen"].as_str().unwrap()).unwrap().1
    );
    let client = |dir: &Path| {
        let addr: ApiAddr = url.parse().unwrap();
        let addr = match addr.with_x509_dir(dir) {
            ApiAddr::Tls {
                addr,
                server_name,
                x509_dir,
            } => ApiAddr::Tls {
                addr: addr.replace("localhost", "127.0.0.1"),
                server_name,
                x509_dir,
            },
            unix => unix,
        };
        ApiClient::new(addr).unwrap()
    };

    let r = client(&admin)
        .register(&request(Some(VM_A), Forward::Endpoint(NOWHERE.into())))
        .await
        .unwrap();
    let listed = client(&admin).migrations().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, r.id);

    // Same CA, another DN: the admin ACL says no, with the reason.
    let e = client(&other).migrations().await.unwrap_err();
    assert!(
        matches!(e, ApiError::Http { status: 403, ref message } if message.contains("intern.test")),
        "{e}"
    );
    // The migration PKI is another CA: neither end trusts the other.
    let e = client(&pki_dir(&pki_tmp)).migrations().await.unwrap_err();
    assert!(
        matches!(e, ApiError::Tls { .. } | ApiError::Protocol { .. }),
        "{e}"
    );
    let log =
        d.gw.wait_event(|v| v["message"] == "API connection refused", EVENT_TIMEOUT)
            .await
            .unwrap();
    assert!(log["reason"].as_str().unwrap().contains("CA"), "{log}");
}

/// SIGHUP re-reads the file: a broken one is refused with its reason and
/// changes nothing (a source without a ticket is still refused); a fixed
/// one is in force at once (its new static route admits a migration).
#[tokio::test]
async fn sighup_reload_keeps_the_previous_configuration_on_error() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let mut d = Daemon::start(&pki).await;
    let mut src = source_vm(Guest::PausedRandomRam { seed: 3 }, VM_A).await;
    let mut dst_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    let mut dst = Qemu::spawn(dst_opts).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    let pid = d.gw.pid().unwrap().to_string();
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let route = format!("forward = \"tcp:127.0.0.1:{port}\"\n");
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{good}{route}")).unwrap();
    hup();
    let ev =
        d.gw.wait_event(
            |v| v["level"] == "ERROR" || v["message"] == "configuration reloaded",
            EVENT_TIMEOUT,
        )
        .await
        .unwrap();
    let reason = ev["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("target[0].forward: a static route needs"),
        "{ev}"
    );

    // Still serving, with the old configuration: registered migrations only.
    d.api.migrations().await.unwrap();
    let sgw = source_gateway(&pki, &d.gw.addr, &[]).await;
    let uri = format!("tcp:{}", sgw.addr);
    migrate_and_expect_failure(&mut src, &uri).await;
    let rec = d.gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("admits registered migrations only"),
        "{rec}"
    );

    std::fs::write(
        &d.config,
        format!("{good}{route}authz_identity = \"{SOURCE_DN}\"\n"),
    )
    .unwrap();
    hup();
    d.gw.wait_event(|v| v["message"] == "configuration reloaded", EVENT_TIMEOUT)
        .await
        .unwrap();
    // In force: the new static route admits the same source, no ticket.
    let hash = src.ram_sha256().await.unwrap();
    migrate_and_expect_completed(&mut src, &mut dst, &uri).await;
    assert_eq!(dst.ram_sha256().await.unwrap(), hash);
    let rec = d.gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "completed", "{rec}");
    assert_eq!(rec["peer.dn"], SOURCE_DN, "{rec}");
}

/// The 64-byte multifd init packet a source QEMU sends first on a multifd
/// channel (src/wire/qemu.rs has the layout).
fn multifd_init_packet(vm: Uuid, channel: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(vm.as_bytes());
    p.push(channel);
    p.resize(64, 0);
    p
}

/// A multifd-looking channel with the ticket arrives alone and waits for a
/// main channel that never comes: it is cut within the stall timeout, its
/// slot is given back, and the real migration (1 main + 1 multifd) then
/// completes with the same ticket.
#[tokio::test]
async fn a_stray_multifd_channel_does_not_wedge_its_registration() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let d = Daemon::start(&pki).await;
    let caps = [("multifd", true)];
    let params = json!({ "multifd-channels": 1 });
    let mut src = source_vm(Guest::PausedRandomRam { seed: 2 }, VM_A).await;
    src.set_capabilities(&caps).await.unwrap();
    src.set_parameters(params.clone()).await.unwrap();
    let mut dst_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    let mut dst = Qemu::spawn(dst_opts).await.unwrap();
    dst.set_capabilities(&caps).await.unwrap();
    dst.set_parameters(params).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();

    let mut req = request(Some(VM_A), endpoint(port));
    req.channels = 2;
    let r = d.register(&req).await;

    // The stray: a miggate source's hello with the ticket, then a multifd
    // init packet of the right VM and nothing else. Sent by hand: a miggate
    // source gateway itself holds a multifd channel until its main channel
    // is connected (tests/interop_native_tls.rs), so this one would never
    // reach the target.
    let config =
        miggate::creds::tls::client_config(&pki, &[miggate::creds::tls::ALPN_MIGGATE]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let sock = tokio::net::TcpStream::connect(&d.gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stray = connector.connect(name, sock).await.unwrap();
    let hello = miggate::wire::frames::Hello {
        ticket: Some(miggate::wire::frames::Secret::new(r.ticket.expose())),
        ..Default::default()
    };
    let mut first = miggate::wire::frames::encode_hello(&hello);
    first.extend_from_slice(&multifd_init_packet(VM_A, 0));
    stray.write_all(&first).await.unwrap();
    d.wait_view(&r.id, "holding the stray multifd channel", |v| {
        v.state == Phase::Active && v.channels_open == 1
    })
    .await;
    // Cut within the stall timeout (10 s here), its slot released: the
    // registration waits for its source again.
    let v = d
        .wait_view(&r.id, "registered again after the stray was cut", |v| {
            v.state == Phase::Registered && !v.refusals.is_empty()
        })
        .await;
    assert_eq!((v.channels_seen, v.channels_open), (0, 0), "{v:?}");
    assert!(
        v.refusals[0].contains("no main channel of its migration was admitted within 10 s"),
        "{v:?}"
    );
    let mut rest = Vec::new();
    let _ = stray.read_to_end(&mut rest).await;

    let hash = src.ram_sha256().await.unwrap();
    let sgw = d.source(&pki, "ticket", r.ticket.expose()).await;
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(dst.ram_sha256().await.unwrap(), hash);
    let v = d.wait_state(&r.id, Phase::Completed).await;
    assert_eq!((v.channels_seen, v.channels_open), (2, 0), "{v:?}");
}

/// Two listeners with two CAs share the daemon's registry. A registration
/// is bound to the first listener unless it names others: a source holding
/// a certificate from the other listener's CA, with the allowed DN string
/// and the ticket, is refused there; on the right listener it completes.
#[tokio::test]
async fn a_ticket_is_only_good_on_the_listener_it_was_registered_for() {
    let pki_tmp = pki();
    let pki_a = pki_dir(&pki_tmp);
    let pki_b = pki_tmp.path().join("pki-b");
    common::gateway::pki_init(&pki_b, &["--client-dn", SOURCE_DN]);
    // localhost: a second "127.0.0.1:0" would be refused as a duplicate.
    let extra = format!(
        "\n[[target]]\nlisten = \"localhost:0\"\nx509_dir = \"{}\"\nstall_timeout = 10\n",
        pki_b.display()
    );
    let mut d = Daemon::start_with(&pki_a, &extra).await;
    let mut src = source_vm(Guest::PausedRandomRam { seed: 4 }, VM_A).await;
    let mut dst_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    let mut dst = Qemu::spawn(dst_opts).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();

    // Listener B's address: from the log, and from a registration bound
    // to it; an unknown listener is a bad request.
    let listening: Vec<String> =
        d.gw.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "listening")
            .map(|v| v["listen"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(listening.len(), 2, "{listening:?}");
    let addr_b = listening[1].clone();
    let mut on_b = request(Some(VM_A), Forward::Endpoint(NOWHERE.into()));
    on_b.listeners = Some(vec![ListenerRef::Index(1)]);
    assert_eq!(
        d.api.register(&on_b).await.unwrap().listen,
        vec![addr_b.clone()]
    );
    on_b.listeners = Some(vec![ListenerRef::Address("127.0.0.1:1".into())]);
    let e = d.api.register(&on_b).await.unwrap_err();
    assert!(
        matches!(e, ApiError::Http { status: 400, ref message } if message.contains("is not a listener of this daemon")),
        "{e}"
    );

    // Default: listener A only (`register` checks the answer's `listen`).
    let r = d.register(&request(Some(VM_A), endpoint(port))).await;
    let f = d.ticket_file("ticket-b", r.ticket.expose());
    let rogue = source_gateway(&pki_b, &addr_b, &["--ticket-file", f.to_str().unwrap()]).await;
    migrate_and_expect_failure(&mut src, &format!("tcp:{}", rogue.addr)).await;
    let rec = d.gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    assert_eq!(rec["bytes_sent"], 0, "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("is not registered on this listener"),
        "{rec}"
    );
    let v = d.api.migration(&r.id).await.unwrap();
    assert_eq!(v.state, Phase::Registered, "not burnt: {v:?}");
    assert_eq!(v.refusals.len(), 1, "{v:?}");
    rogue.stop().await;

    let hash = src.ram_sha256().await.unwrap();
    let sgw = d.source(&pki_a, "ticket-a", r.ticket.expose()).await;
    migrate_and_expect_completed(&mut src, &mut dst, &format!("tcp:{}", sgw.addr)).await;
    assert_eq!(dst.ram_sha256().await.unwrap(), hash);
    let v = d.wait_state(&r.id, Phase::Completed).await;
    assert_eq!(v.peer_dn.as_deref(), Some(SOURCE_DN));
}

/// The target QEMU's incoming socket (QMP forward: QEMU creates it in the
/// daemon's runtime directory, with QEMU's umask) cannot be reached by
/// another user, whatever its own mode: the runtime directory is the
/// daemon's alone. An existing runtime directory more open than that
/// stops the daemon before it serves anything.
#[tokio::test]
async fn another_user_cannot_reach_the_target_qemus_incoming_socket() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let d = Daemon::start(&pki).await;
    let qmp2 = d.dir.join("dst-qmp.sock");
    let mut dst_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    dst_opts.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp2.display()),
    ];
    let _dst = Qemu::spawn(dst_opts).await.unwrap();
    let forward = Forward::Qmp(QmpForward {
        qmp: format!("unix:{}", qmp2.display()),
        capabilities: BTreeMap::new(),
        parameters: serde_json::Map::new(),
    });
    let r = d.register(&request(Some(VM_A), forward)).await;
    let v = d.api.migration(&r.id).await.unwrap();
    let sock = PathBuf::from(v.forward.strip_prefix("unix:").unwrap());
    let runtime = d.dir.join("run");
    assert_eq!(sock.parent(), Some(runtime.as_path()), "{v:?}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());

    // As QEMU with a permissive umask would leave it, below a directory
    // everyone may enter: only the runtime directory stands in the way.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = connect_as_nobody(&sock);
    assert!(err.contains("Permission denied"), "{err}");
    let mode = std::fs::metadata(&runtime).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        d.api.migration(&r.id).await.unwrap().state,
        Phase::Registered
    );

    // A runtime directory left open by someone else: refused at start.
    let tmp = tempfile::tempdir().unwrap();
    let open_dir = tmp.path().join("run");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = tmp.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nruntime_dir = \"{run}\"\n[api]\nsocket = \"{run}/api.sock\"\n\
             [[target]]\nlisten = \"127.0.0.1:0\"\nx509_dir = \"{pki}\"\n",
            run = open_dir.display(),
            pki = pki.display()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(common::gateway::BIN)
        .args(["daemon", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(EVENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the daemon started with a runtime directory open to everyone")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "the runtime directory {} has mode 0755, more open than 0700",
            open_dir.display()
        )),
        "{err}"
    );
    assert!(!open_dir.join("api.sock").exists());
}

/// A source gateway killed mid-stream ends its TLS stream without
/// close_notify: the daemon records the channel and the migration as
/// failed, with the reason, never as completed.
#[tokio::test]
async fn source_gateway_killed_mid_stream_fails_the_registered_migration() {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let mut d = Daemon::start(&pki).await;
    let mut src = source_vm(Guest::PausedRandomRam { seed: 0xc07 }, VM_A).await;
    // 64 MiB of random RAM at 2 MiB/s: mid-stream for half a minute.
    src.set_parameters(json!({ "max-bandwidth": 2 << 20 }))
        .await
        .unwrap();
    let mut dst_opts = QemuOpts::new(Guest::PausedRandomRam { seed: 0 }, 64).as_incoming();
    dst_opts.uuid = Some(VM_A);
    let mut dst = Qemu::spawn(dst_opts).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    let r = d.register(&request(Some(VM_A), endpoint(port))).await;
    let sgw = d.source(&pki, "ticket", r.ticket.expose()).await;
    let before = src.query_status().await.unwrap();
    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    d.wait_view(&r.id, "mid-stream", |v| v.bytes_sent > 2 << 20)
        .await;
    sgw.stop().await;

    let v = d.wait_view(&r.id, "ended", |v| v.state.is_final()).await;
    assert_eq!(v.state, Phase::Failed, "{v:?}");
    assert_eq!(
        v.reason.as_deref(),
        Some("source->target: the source's TLS stream was cut without close_notify"),
        "{v:?}"
    );
    let rec = d.gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "failed", "{rec}");
    let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(s.status.as_deref(), Some("failed"), "{:?}", s.raw);
    assert_eq!(src.query_status().await.unwrap(), before);
    assert_eq!(d.metric("miggate_migrations{state=\"failed\"}").await, 1.0);
}
