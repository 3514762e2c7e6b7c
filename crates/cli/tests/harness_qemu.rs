//! Proves the QEMU test harness and the QMP client against real QEMU,
//! without any gateway in the path.

mod common;

use std::time::{Duration, Instant};

use common::guest;
use common::qemu::{accel, zero_sha256, Guest, NativeTls, Qemu, QemuExt, QemuOpts, TlsEndpoint};
use miggate::qmp::{Qmp, QmpError};
use serde_json::json;

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn direct_migration_of_paused_random_ram() {
    let t0 = Instant::now();
    let seed = 0x5eed_0001;
    let opts = QemuOpts::new(Guest::PausedRandomRam { seed }, 128);
    let (mut src, mut dst) = Qemu::pair(opts.clone(), opts.as_incoming()).await.unwrap();
    let spawned = t0.elapsed();

    // -S: "prelaunch" (never started), not "paused".
    assert_eq!(src.query_status().await.unwrap(), "prelaunch");
    assert_eq!(dst.query_status().await.unwrap(), "inmigrate");
    let src_hash = src.ram_sha256().await.unwrap();

    src.set_unlimited_bandwidth().await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    let t = Instant::now();
    src.migrate(&format!("tcp:127.0.0.1:{port}")).await.unwrap();
    let (s, d) = tokio::join!(
        src.wait_migration_end(MIGRATION_TIMEOUT),
        dst.wait_migration_end(MIGRATION_TIMEOUT)
    );
    let (s, d) = (s.unwrap(), d.unwrap());
    let took = t.elapsed();
    assert_eq!(s.status.as_deref(), Some("completed"), "source: {s:?}");
    assert_eq!(d.status.as_deref(), Some("completed"), "destination: {d:?}");
    let ram = s.ram.as_ref().expect("ram stats");
    let duration = src.migration_duration().expect("migration duration");
    eprintln!(
        "direct migration of 128 MiB random RAM: {duration:?} (migrate to terminal event; \
         observed by the test after {took:?}; QEMU total-time {:?} ms), {} bytes; spawn {spawned:?}",
        s.total_time, ram.transferred
    );
    assert!(duration <= took, "{duration:?} > {took:?}");
    assert!(ram.transferred >= 128 << 20, "all of RAM crossed: {ram:?}");

    // The destination stays paused: the source was not running.
    // The run state migrates: a never-started guest stays "prelaunch".
    assert_eq!(dst.query_status().await.unwrap(), "prelaunch");
    assert_eq!(src.query_status().await.unwrap(), "postmigrate");
    let dst_hash = dst.ram_sha256().await.unwrap();
    assert_eq!(src_hash, dst_hash, "RAM differs after migration");
    assert_ne!(dst_hash, zero_sha256(128 << 20), "RAM is all zeros");
    let dst_dump = dst.ram_dump().await.unwrap();

    // Outside the legacy window 0xA0000..0x100000 the dump is exactly the
    // seeded file: the random bytes really are guest RAM.
    let expected = std::fs::read(guest::random_ram_file(seed, 128 << 20).unwrap()).unwrap();
    assert!(dst_dump[..0xA_0000] == expected[..0xA_0000]);
    assert!(dst_dump[0x10_0000..] == expected[0x10_0000..]);
    eprintln!("test (a) total {:?}", t0.elapsed());
}

#[tokio::test]
async fn running_counter_guest_migrates_live_and_keeps_counting() {
    let t0 = Instant::now();
    let opts = QemuOpts::new(Guest::RunningCounter, 64);
    let (mut src, mut dst) = Qemu::pair(opts.clone(), opts.as_incoming()).await.unwrap();
    src.assert_running_and_counting().await;
    let before = src.guest_counter().await.unwrap();

    let port = dst.migrate_incoming_any_port().await.unwrap();
    let t = Instant::now();
    src.migrate(&format!("tcp:127.0.0.1:{port}")).await.unwrap();
    let (s, d) = tokio::join!(
        src.wait_migration_end(MIGRATION_TIMEOUT),
        dst.wait_migration_end(MIGRATION_TIMEOUT)
    );
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(s.status.as_deref(), Some("completed"), "source: {s:?}");
    assert_eq!(d.status.as_deref(), Some("completed"), "destination: {d:?}");
    let ram = s.ram.as_ref().expect("ram stats");
    eprintln!(
        "live migration of the counter guest (64 MiB, {}): {:?}, downtime {:?} ms, \
         dirty-sync-count {}, {} bytes",
        accel().unwrap(),
        t.elapsed(),
        s.downtime,
        ram.dirty_sync_count,
        ram.transferred
    );

    assert_eq!(src.query_status().await.unwrap(), "postmigrate");
    dst.assert_running_and_counting().await;
    // The destination continues from where the source was, not from zero.
    let after = dst.guest_counter().await.unwrap();
    assert!(
        after.wrapping_sub(before) < 1 << 31,
        "counter went back: {before:#x} -> {after:#x}"
    );
    eprintln!("test (b) total {:?}", t0.elapsed());
}

#[tokio::test]
async fn qmp_errors_and_events() {
    let t0 = Instant::now();
    let mut vm = Qemu::spawn(QemuOpts::default()).await.unwrap();
    let (major, minor, _) = vm.qmp.qemu_version().expect("version in greeting");
    assert!(major >= 7, "QEMU {major}.{minor}");

    match vm.qmp.execute("no-such-command", None).await {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert_eq!(desc, "The command no-such-command has not been found");
        }
        other => panic!("expected QmpError::Command, got {other:?}"),
    }
    let err = vm
        .qmp
        .execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "bogus", "state": true}]})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("QEMU refused migrate-set-capabilities: "),
        "{err}"
    );
    assert!(err.to_string().contains("bogus"), "{err}");

    // Still usable after errors, and events arriving around a command are
    // queued rather than lost: `stop` emits STOP before its response.
    assert_eq!(vm.query_status().await.unwrap(), "prelaunch");
    vm.cmd("cont", json!(null)).await.unwrap();
    vm.cmd("stop", json!(null)).await.unwrap();
    let mut names = Vec::new();
    while names.len() < 2 {
        let ev = vm
            .qmp
            .next_event_within(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("RESUME and STOP events");
        assert!(ev.timestamp.seconds > 0);
        names.push(ev.name);
    }
    assert_eq!(names, ["RESUME", "STOP"]);

    // A QEMU that goes away surfaces as Closed, not as a hang.
    vm.cmd("quit", json!(null)).await.unwrap();
    match vm.qmp.query_status().await {
        Err(QmpError::Closed) => {}
        other => panic!("expected QmpError::Closed after quit, got {other:?}"),
    }
    assert!(Qmp::connect_unix(vm.dir().join("qmp.sock")).await.is_err());
    eprintln!("test (c) total {:?}", t0.elapsed());
}

/// A throwaway PKI in QEMU's layout, made with rcgen. QEMU checks key usage
/// (digitalSignature + keyEncipherment), basic constraints and the
/// server/client purposes, so all are set.
fn native_pki(dir: &std::path::Path, client_org: &str, client_cn: &str) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair, KeyUsagePurpose as Ku,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "miggate test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = |eku: Eku, dn: &[(DnType, &str)], sans: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        // rcgen pre-fills CN; start empty so RDNs are encoded in our order.
        p.distinguished_name = DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment];
        p.extended_key_usages = vec![eku];
        (p.signed_by(&key, &ca, &ca_key).unwrap(), key)
    };
    let (sp, sk) = leaf(
        Eku::ServerAuth,
        &[(DnType::CommonName, "localhost")],
        vec!["localhost".into()],
    );
    let (cc, ck) = leaf(
        Eku::ClientAuth,
        &[
            (DnType::OrganizationName, client_org),
            (DnType::CommonName, client_cn),
        ],
        vec![],
    );
    std::fs::create_dir_all(dir).unwrap();
    for (name, pem) in [
        ("ca-cert.pem", ca.pem()),
        ("server-cert.pem", sp.pem()),
        ("server-key.pem", sk.serialize_pem()),
        ("client-cert.pem", cc.pem()),
        ("client-key.pem", ck.serialize_pem()),
    ] {
        // Keys 0600 from creation, as `miggate pki` writes them (miggate
        // would refuse a key others can read; QEMU runs as us here).
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mode = if name.ends_with("-key.pem") {
            0o600
        } else {
            0o644
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dir.join(name))
            .unwrap()
            .write_all(pem.as_bytes())
            .unwrap();
    }
}

/// QEMU's own TLS on both ends with authz-simple on the destination: the
/// client DN in GnuTLS order is admitted, any other identity is refused.
#[tokio::test]
async fn native_tls_migration_with_authz() {
    let t0 = Instant::now();
    let pki = tempfile::tempdir().unwrap();
    native_pki(pki.path(), "miggate tests", "source.test");
    let tls = |endpoint, authz_identity: Option<&str>| NativeTls {
        dir: pki.path().to_path_buf(),
        endpoint,
        authz_identity: authz_identity.map(str::to_owned),
        priority: None,
    };

    for (identity, admitted) in [
        ("O=miggate tests,CN=source.test", true),
        ("CN=source.test,O=miggate tests", false),
    ] {
        let mut opts = QemuOpts::new(Guest::PausedRandomRam { seed: 7 }, 64);
        opts.tls = Some(tls(TlsEndpoint::Client, None));
        let mut dst_opts = opts.as_incoming();
        dst_opts.tls = Some(tls(TlsEndpoint::Server, Some(identity)));
        let (mut src, mut dst) = Qemu::pair(opts, dst_opts).await.unwrap();
        src.set_native_tls_parameters(Some("localhost"))
            .await
            .unwrap();
        dst.set_native_tls_parameters(None).await.unwrap();
        let port = dst.migrate_incoming_any_port().await.unwrap();
        src.migrate(&format!("tcp:127.0.0.1:{port}")).await.unwrap();
        let s = src.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
        if admitted {
            assert_eq!(s.status.as_deref(), Some("completed"), "source: {s:?}");
            let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
            assert_eq!(d.status.as_deref(), Some("completed"), "destination: {d:?}");
            assert_eq!(
                src.ram_sha256().await.unwrap(),
                dst.ram_sha256().await.unwrap()
            );
        } else {
            assert_eq!(s.status.as_deref(), Some("failed"), "source: {s:?}");
            // The destination neither exits nor fails: it keeps listening,
            // with no migration status at all.
            let d = dst.query_migrate().await.unwrap();
            assert_eq!(d.status, None, "destination: {:?}", d.raw);
            assert!(dst.stderr_text().contains("is denied"));
            eprintln!(
                "refused identity: source error-desc {:?}; destination stderr: {}",
                s.error_desc,
                dst.stderr_text().trim()
            );
        }
    }
    eprintln!("test (d) total {:?}", t0.elapsed());
}

/// A destination fed garbage exits (QEMU 7.2 quits when an incoming
/// migration fails to load); `wait_migration_end` reports that as `failed`
/// with QEMU's stderr instead of hanging or panicking.
#[tokio::test]
async fn destination_that_exits_reports_failed() {
    use tokio::io::AsyncWriteExt;
    let t0 = Instant::now();
    let mut dst = Qemu::spawn(QemuOpts::new(Guest::RunningCounter, 64).as_incoming())
        .await
        .unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"this is not a QEMU migration stream\n")
        .await
        .unwrap();
    drop(conn);
    let d = dst.wait_migration_end(MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(d.status.as_deref(), Some("failed"), "{d:?}");
    let desc = d.error_desc.unwrap_or_default();
    eprintln!("destination fed garbage: {desc}");
    assert!(desc.contains("QEMU exited"), "{desc}");
    eprintln!("test (e) total {:?}", t0.elapsed());
}
