//! Storage migration through the gateways: the source QEMU's mirror job
//! writes into the target QEMU's NBD server over an NBD channel of the
//! gateway pair, in libvirt's order, and the disk arrives byte for byte.

mod common;

use std::path::{Path, PathBuf};

use common::gateway::{pki_issue, Gateway};
use common::qemu::{Guest, Qemu, QemuExt, QemuOpts};
use common::scenario::{
    pki, pki_dir, source_gateway, target_gateway, Versions, EVENT_TIMEOUT, SOURCE_DN,
};
use common::storage::{self, NODE};
use tempfile::TempDir;

const DISK_MIB: usize = 256;
const RAM_MIB: u32 = 64;

/// How a [`Lab`] is built.
struct Setup<'a> {
    disk_mib: usize,
    /// What the target gateway forwards (`--nbd-export`).
    exports: &'a [&'a str],
    /// NBD channels go to this socket instead of the target QEMU's NBD
    /// server (to see whether anything reached it).
    sentinel: Option<&'a Path>,
    versions: Versions,
    guest: Guest,
    /// The source gateway's client certificate carries this DN, which the
    /// target gateway does not allow; `None`: [`SOURCE_DN`], which it does.
    foreign_dn: Option<&'a str>,
    /// The source gateway listens on unix sockets only, for the source
    /// QEMU's pid (`--source-pid`).
    only_source_qemu: bool,
    /// The target gateway authorizes by this ACL file
    /// (`--authz-list-file`) instead of `--authz-identity` [`SOURCE_DN`].
    acl: Option<&'a Path>,
}

impl Setup<'_> {
    fn new(disk_mib: usize) -> Setup<'static> {
        Setup {
            disk_mib,
            exports: &[NODE],
            sentinel: None,
            versions: Versions::Q72,
            guest: Guest::PausedRandomRam { seed: 12 },
            foreign_dn: None,
            only_source_qemu: false,
            acl: None,
        }
    }
}

/// Two QEMUs with a disk each (the source's random, the target's empty),
/// the target's NBD server started, and a gateway pair between them:
/// `--listen-nbd` on the source, `--forward-nbd` with `exports` on the
/// target.
struct Lab {
    _pki: TempDir,
    dir: TempDir,
    src: Qemu,
    dst: Qemu,
    src_img: PathBuf,
    dst_img: PathBuf,
    sgw: Gateway,
    tgw: Gateway,
}

impl Lab {
    async fn new(setup: Setup<'_>) -> Lab {
        let pki = pki();
        let dir = tempfile::Builder::new()
            .prefix("miggate-storage-")
            .tempdir()
            .unwrap();
        let mib = setup.disk_mib;
        let src_img = storage::random_disk(dir.path(), "src.img", mib, 0x5107);
        let dst_img = storage::empty_disk(dir.path(), "dst.img", mib);
        let opts = QemuOpts::new(setup.guest, RAM_MIB);
        let mut dst_opts = opts.as_incoming();
        if setup.guest == Guest::RunningCounter {
            // libvirt's way: the target stays paused after the RAM
            // migration, until the disks are in sync and released.
            dst_opts.extra_args.push("-S".into());
        }
        let (mut src_opts, mut dst_opts) = (
            storage::with_disk(opts, &src_img),
            storage::with_disk(dst_opts, &dst_img),
        );
        setup.versions.apply(&mut src_opts, &mut dst_opts);
        let (mut src, mut dst) = Qemu::pair(src_opts, dst_opts).await.unwrap();
        src.set_unlimited_bandwidth().await.unwrap();
        let port = dst.migrate_incoming_any_port().await.unwrap();
        let nbd = dir.path().join("target-nbd.sock");
        storage::serve_disk(&mut dst, &nbd).await;
        let forward_nbd = format!("unix:{}", setup.sentinel.unwrap_or(&nbd).display());
        let authz = match setup.acl {
            Some(acl) => ["--authz-list-file", acl.to_str().unwrap()],
            None => ["--authz-identity", SOURCE_DN],
        };
        let mut args = vec![authz[0], authz[1], "--forward-nbd", &forward_nbd];
        for e in setup.exports {
            args.extend(["--nbd-export", e]);
        }
        let tgw = target_gateway(&pki_dir(&pki), port, &args).await;
        let listen_nbd = format!("unix:{}", Self::nbd_path(dir.path()).display());
        let x509 = match setup.foreign_dn {
            Some(dn) => pki_issue(&pki_dir(&pki), &dir.path().join("foreign"), dn),
            None => pki_dir(&pki),
        };
        let sgw = if setup.only_source_qemu {
            let listen = format!("unix:{}", dir.path().join("source.sock").display());
            let pid = src.pid().unwrap().to_string();
            let x509 = x509.to_str().unwrap();
            common::gateway::miggate()
                .gateway(&[
                    "source",
                    "--listen",
                    &listen,
                    "--connect",
                    &tgw.addr,
                    "--x509-dir",
                    x509,
                    "--listen-nbd",
                    &listen_nbd,
                    "--source-pid",
                    &pid,
                ])
                .await
                .unwrap()
        } else {
            source_gateway(&x509, &tgw.addr, &["--listen-nbd", &listen_nbd]).await
        };
        Lab {
            _pki: pki,
            dir,
            src,
            dst,
            src_img,
            dst_img,
            sgw,
            tgw,
        }
    }

    fn nbd_path(dir: &Path) -> PathBuf {
        dir.join("source-nbd.sock")
    }

    fn source_nbd(&self) -> PathBuf {
        Self::nbd_path(self.dir.path())
    }

    fn ram_uri(&self) -> String {
        if self.sgw.addr.starts_with("unix:") {
            self.sgw.addr.clone()
        } else {
            format!("tcp:{}", self.sgw.addr)
        }
    }

    /// The records of a gateway for NBD channels.
    fn nbd_records(gw: &Gateway) -> Vec<serde_json::Value> {
        gw.outcomes()
            .into_iter()
            .filter(|r| r["channel"].as_str().is_some_and(|c| c.starts_with("nbd:")))
            .collect()
    }

    /// Both images, after both QEMUs flushed them: equal.
    async fn assert_images_equal(&mut self) -> String {
        storage::flush(&mut self.src).await;
        storage::flush(&mut self.dst).await;
        let (src_hash, dst_hash) = (
            storage::image_sha256(&self.src_img),
            storage::image_sha256(&self.dst_img),
        );
        assert_eq!(dst_hash, src_hash, "the target's disk is not the source's");
        src_hash
    }

    /// Each gateway's one NBD record (after the main channel's and the
    /// NBD channel's outcomes): completed, with at least the disk's bytes.
    async fn assert_nbd_completed(&mut self, disk_mib: usize) {
        let mut sent = Vec::new();
        for gw in [&mut self.sgw, &mut self.tgw] {
            let _ = common::scenario::outcomes(gw, 2).await;
            let nbd = Lab::nbd_records(gw);
            assert_eq!(nbd.len(), 1, "{}", gw.log_text());
            assert_eq!(nbd[0]["channel"], "nbd:disk0");
            assert_eq!(nbd[0]["outcome"], "completed", "{}", gw.log_text());
            assert!(
                nbd[0]["bytes_sent"].as_u64().unwrap() > (disk_mib as u64) << 20,
                "{}",
                nbd[0]
            );
            println!(
                "NBD channel: {} bytes in {} ms ({})",
                nbd[0]["bytes_sent"], nbd[0]["duration_ms"], nbd[0]["role"]
            );
            sent.push(nbd[0]["bytes_sent"].clone());
        }
        // The target counts the opening it replayed to the NBD server as
        // the source counted it.
        assert_eq!(sent[0], sent[1], "bytes_sent, source and target");
    }
}

/// libvirt's sequence through the gateways on `versions`: NBD server and
/// export on the target, mirror until ready, writes after that, RAM
/// migration up to pre-switchover, mirror cancelled (in sync) there,
/// switch-over. The target's image is the source's, byte for byte,
/// writes included; the RAM arrived; the NBD channel's records say
/// completed on both sides.
async fn disk_and_ram_arrive_intact(versions: Versions, disk_mib: usize) {
    let mut lab = Lab::new(Setup {
        versions,
        ..Setup::new(disk_mib)
    })
    .await;
    let before = storage::image_sha256(&lab.src_img);
    let nbd = lab.source_nbd();
    let t0 = std::time::Instant::now();
    storage::start_mirror(&mut lab.src, &nbd, NODE)
        .await
        .unwrap();
    storage::wait_ready(&mut lab.src).await;
    println!(
        "{versions:?}: {disk_mib} MiB mirrored (ready) in {:?}",
        t0.elapsed()
    );
    // Written after the bulk copy: only the mirror's dirty tracking can
    // bring these to the target.
    storage::write_through_device(&mut lab.src, 0x5a, 1 << 20, 1 << 20).await;
    let last = (disk_mib as u64 - 1) << 20;
    storage::write_through_device(&mut lab.src, 0xa5, last, 4096).await;
    let uri = lab.ram_uri();
    let ram = lab.src.ram_sha256().await.unwrap();
    storage::migrate_until_switchover(&mut lab.src, &uri).await;
    storage::switch_over(&mut lab.src, &mut lab.dst).await;
    storage::stop_serving(&mut lab.dst).await;
    let hash = lab.assert_images_equal().await;
    assert_ne!(hash, before, "the writes changed the source disk");
    assert_eq!(lab.dst.ram_sha256().await.unwrap(), ram, "RAM");
    lab.assert_nbd_completed(disk_mib).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_ram_arrive_intact_through_the_gateways() {
    disk_and_ram_arrive_intact(Versions::Q72, DISK_MIB).await;
}

/// QEMU 10.0's NBD client asks for NBD_OPT_EXTENDED_HEADERS first: the
/// source gateway declines it, and the client falls back to structured
/// replies, which the 10.0 server gets replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_ram_arrive_intact_qemu_10() {
    disk_and_ram_arrive_intact(Versions::Q10, 64).await;
}

/// A 7.2 NBD client into a 10.0 NBD server (machine pc-i440fx-7.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_and_ram_arrive_intact_qemu_72_to_10() {
    disk_and_ram_arrive_intact(Versions::Q72ToQ10, 64).await;
}
/// A unix listener standing in for the target QEMU's NBD server: it
/// says whether anything connected.
struct Sentinel(std::os::unix::net::UnixListener, PathBuf);

impl Sentinel {
    fn new(dir: &Path) -> Sentinel {
        let path = dir.join("sentinel.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        Sentinel(l, path)
    }

    fn assert_untouched(&self) {
        match self.0.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("something connected to the NBD server: {other:?}"),
        }
    }
}

/// An export the target gateway does not forward, asked for by QEMU 7.2
/// and by 10.0: the source QEMU's `blockdev-add` fails ("Denied by
/// server for option 7 (go)": the gateway's reason travels as the NBD
/// error's message, which QEMU keeps as a hint that QMP drops and HMP
/// shows), nothing connected to the NBD server, the source disk is
/// unchanged, the reason is in both gateways' records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_not_forwarded_is_refused_before_the_nbd_server() {
    for versions in [Versions::Q72, Versions::Q10] {
        let spare = tempfile::tempdir().unwrap();
        let sentinel = Sentinel::new(spare.path());
        let mut lab = Lab::new(Setup {
            exports: &["other-disk"],
            sentinel: Some(&sentinel.1),
            versions,
            ..Setup::new(16)
        })
        .await;
        let src_before = storage::image_sha256(&lab.src_img);
        let nbd = lab.source_nbd();
        let err = storage::start_mirror(&mut lab.src, &nbd, NODE)
            .await
            .unwrap_err();
        println!("{versions:?}: QEMU says: {err}");
        assert!(err.contains("Denied by server for option 7 (go)"), "{err}");
        let rec = lab.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "refused", "{rec}");
        assert!(
            rec["reason"].as_str().unwrap().contains("--nbd-export"),
            "{rec}"
        );
        // The source is told which export, not what the target forwards.
        let rec = lab.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        assert_eq!(rec["outcome"], "refused", "{rec}");
        assert_eq!(
            rec["reason"], "target refused: NBD export \"disk0\" is not one this gateway forwards",
            "{rec}"
        );
        assert!(storage::job(&mut lab.src).await.is_none());
        assert_eq!(lab.src.query_status().await.unwrap(), "prelaunch");
        // The same refusal through HMP, which prints the hint.
        let hmp = storage::hmp_open_nbd(&mut lab.src, &nbd, NODE).await;
        assert!(
            hmp.contains(
                "server reported: miggate: target refused: NBD export \"disk0\" is not one this gateway forwards"
            ),
            "{hmp}"
        );
        for gw in [&mut lab.tgw, &mut lab.sgw] {
            let rec = gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
            assert_eq!(rec["outcome"], "refused", "{rec}");
        }
        sentinel.assert_untouched();
        storage::flush(&mut lab.src).await;
        assert_eq!(storage::image_sha256(&lab.src_img), src_before);
    }
}

/// A source gateway whose certificate's DN the target does not allow:
/// its NBD channel is refused by the target gateway before the NBD
/// server (nothing connects to it), QEMU's `blockdev-add` fails, the
/// source disk is unchanged, and the target's record names the DN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_dn_is_refused_before_the_nbd_server() {
    const FOREIGN: &str = "O=miggate tests,CN=intruder.test";
    let spare = tempfile::tempdir().unwrap();
    let sentinel = Sentinel::new(spare.path());
    let mut lab = Lab::new(Setup {
        sentinel: Some(&sentinel.1),
        foreign_dn: Some(FOREIGN),
        ..Setup::new(16)
    })
    .await;
    let src_before = storage::image_sha256(&lab.src_img);
    let nbd = lab.source_nbd();
    let err = storage::start_mirror(&mut lab.src, &nbd, NODE)
        .await
        .unwrap_err();
    println!("QEMU says: {err}");
    // The gateway's reason goes back as the NBD error's message, which
    // QEMU keeps as a hint: QMP does not show it.
    assert!(err.contains("Denied by server"), "{err}");
    let rec = lab.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    assert_eq!(rec["peer.dn"], FOREIGN, "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains(FOREIGN), "{rec}");
    let rec = lab.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    assert_eq!(rec["channel"], "nbd:disk0", "{rec}");
    assert!(storage::job(&mut lab.src).await.is_none());
    assert_eq!(lab.src.query_status().await.unwrap(), "prelaunch");
    // What QEMU got as the reason: which check failed, nothing more.
    let hmp = storage::hmp_open_nbd(&mut lab.src, &nbd, NODE).await;
    assert!(
        hmp.contains("server reported: miggate: target refused: certificate DN not authorized"),
        "{hmp}"
    );
    let rec = lab.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    sentinel.assert_untouched();
    storage::flush(&mut lab.src).await;
    assert_eq!(storage::image_sha256(&lab.src_img), src_before);
}

/// A hostile NBD client on the source gateway's NBD socket: it names the
/// allowed export (admitted: the real NBD server answers its INFO), then
/// asks to GO to another one. The target gateway cuts the channel with
/// the reason; the GO never reached the NBD server (the bytes forwarded
/// stop before it, and no reply to it came back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_export_after_the_admitted_one_cuts_the_channel() {
    use storage::raw;
    let mut lab = Lab::new(Setup::new(16)).await;
    let mut c = tokio::net::UnixStream::connect(lab.source_nbd())
        .await
        .unwrap();
    assert_eq!(raw::greeting(&mut c).await, 3, "FIXED_NEWSTYLE|NO_ZEROES");
    let opening = [
        3u32.to_be_bytes().to_vec(),
        raw::naming(raw::OPT_INFO, NODE),
    ]
    .concat();
    raw::send(&mut c, &opening).await;
    // The real server's answer: at least one NBD_REP_INFO, then ACK.
    let mut infos = 0;
    loop {
        let (opt, reply, _) = raw::reply(&mut c).await.unwrap();
        assert_eq!(opt, raw::OPT_INFO);
        if reply == raw::REP_ACK {
            break;
        }
        assert_eq!(reply, 3, "NBD_REP_INFO");
        infos += 1;
    }
    assert!(infos >= 1, "the server described the export");
    raw::send(&mut c, &raw::naming(raw::OPT_GO, "other-disk")).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(EVENT_TIMEOUT, async {
        use tokio::io::AsyncReadExt;
        c.read_to_end(&mut rest).await
    })
    .await
    .expect("the channel was not cut");
    // Cut: end of stream (or a reset), and no reply to the GO.
    assert!(rest.is_empty(), "a reply came back: {rest:02x?} ({read:?})");

    let rec = lab.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    println!("target gateway: {rec}");
    assert_eq!(rec["channel"], "nbd:disk0", "{rec}");
    assert_eq!(rec["outcome"], "failed", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"other-disk\"") && reason.contains("\"disk0\" was admitted"),
        "{rec}"
    );
    // Forwarded to the NBD server: the opening, nothing of the GO.
    assert_eq!(rec["bytes_sent"], opening.len(), "{rec}");
    let rec = lab.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    println!("source gateway: {rec}");
    assert_eq!(rec["channel"], "nbd:disk0", "{rec}");
    // The export is still served, to nobody.
    storage::stop_serving(&mut lab.dst).await;
}

/// The source gateway's local-peer rule holds on `--listen-nbd`: with
/// `--source-pid` of the source QEMU, a connection from this test
/// process is closed before a byte is sent (no greeting, no channel to
/// the target), while the QEMU's own mirror goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_source_qemu_may_use_the_nbd_socket() {
    let mut lab = Lab::new(Setup {
        only_source_qemu: true,
        ..Setup::new(16)
    })
    .await;
    let mut c = tokio::net::UnixStream::connect(lab.source_nbd())
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, async {
        use tokio::io::AsyncReadExt;
        c.read_to_end(&mut got).await
    })
    .await
    .expect("the connection was not closed");
    assert!(got.is_empty(), "the gateway sent {got:02x?}");
    let rec = lab.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "refused", "{rec}");
    let me = std::process::id();
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("local peer pid {me} ")),
        "{rec}"
    );

    let nbd = lab.source_nbd();
    storage::start_mirror(&mut lab.src, &nbd, NODE)
        .await
        .unwrap();
    storage::wait_ready(&mut lab.src).await;
    storage::finish(&mut lab.src, &mut lab.dst).await;
    lab.assert_images_equal().await;
    // The refused connection never reached the target gateway: its only
    // NBD record is the QEMU's.
    let rec = lab.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    assert_eq!(rec["outcome"], "completed", "{rec}");
    assert_eq!(
        Lab::nbd_records(&lab.tgw).len(),
        1,
        "{}",
        lab.tgw.log_text()
    );
}

/// A running guest whose disk is written while its RAM migrates: writes
/// through the disk's device, one after another, from the mirror being
/// ready until the migration pauses before switch-over
/// (`pause-before-switchover`, as libvirt uses it: the VM stopped, its
/// disks still active). There the mirror is cancelled in sync and its
/// node removed, then the migration continues. The target's image is
/// the source's (the last write checked by itself), the RAM is the
/// source's, and the target runs once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_written_during_the_migration_arrives_consistent() {
    disk_written_during_the_migration(Versions::Q72).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_written_during_the_migration_arrives_consistent_qemu_10() {
    disk_written_during_the_migration(Versions::Q10).await;
}

async fn disk_written_during_the_migration(versions: Versions) {
    const MIB: usize = 32;
    const CHUNK: u64 = 64 << 10;
    let mut lab = Lab::new(Setup {
        guest: Guest::RunningCounter,
        versions,
        ..Setup::new(MIB)
    })
    .await;
    lab.src.assert_running_and_counting().await;
    let nbd = lab.source_nbd();
    storage::start_mirror(&mut lab.src, &nbd, NODE)
        .await
        .unwrap();
    storage::wait_ready(&mut lab.src).await;
    // Slow enough for the writes to overlap the RAM migration.
    lab.src
        .set_parameters(serde_json::json!({ "max-bandwidth": 4u64 << 20 }))
        .await
        .unwrap();
    lab.src
        .set_capabilities(&[("pause-before-switchover", true)])
        .await
        .unwrap();
    lab.src.forget_old_events().await.unwrap();
    let uri = lab.ram_uri();
    lab.src.migrate(&uri).await.unwrap();
    let mut writes: Vec<(u64, u8)> = Vec::new();
    let deadline = std::time::Instant::now() + common::scenario::MIGRATION_TIMEOUT;
    loop {
        let info = lab.src.query_migrate().await.unwrap();
        match info.status.as_deref() {
            Some("setup" | "active") => {}
            Some("pre-switchover") => break,
            other => panic!("migration {other:?}: {}", info.raw),
        }
        assert!(std::time::Instant::now() < deadline, "{}", info.raw);
        let n = writes.len() as u64;
        // Distinct offsets and patterns, the last wins where they wrap.
        let offset = (1 << 20) + (n * CHUNK) % ((MIB as u64 - 2) << 20);
        let pattern = (n % 255) as u8 + 1;
        storage::write_through_device(&mut lab.src, pattern, offset, CHUNK).await;
        writes.push((offset, pattern));
    }
    println!("{versions:?}: {} writes during the migration", writes.len());
    assert!(!writes.is_empty(), "no write during the migration");
    assert_eq!(lab.src.query_status().await.unwrap(), "finish-migrate");
    // libvirt's order at pre-switchover: the mirror ends in sync first.
    storage::switch_over(&mut lab.src, &mut lab.dst).await;
    storage::stop_serving(&mut lab.dst).await;

    // Both stopped now: the same RAM.
    let ram = storage::ram_hash(&mut lab.src).await;
    assert_eq!(storage::ram_hash(&mut lab.dst).await, ram, "RAM");
    lab.assert_images_equal().await;
    let (offset, pattern) = *writes.last().unwrap();
    let late = storage::image_bytes(&lab.dst_img, offset, CHUNK as usize);
    assert!(
        late.iter().all(|b| *b == pattern),
        "the last write ({pattern:#x} at {offset}) is not on the target"
    );
    lab.dst.cmd("cont", serde_json::json!({})).await.unwrap();
    lab.dst.assert_running_and_counting().await;
    lab.assert_nbd_completed(MIB).await;
}

/// The copy cancelled before it is ready (`block-job-cancel` while the
/// mirror, slowed by its `speed`, is still copying): the job ends
/// cancelled, and once its NBD node is removed both gateways' NBD records
/// end; the source VM keeps running, its disk unchanged, and no client
/// is left on the target's NBD server (its export comes off without
/// force).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cancelled_midway_ends_cleanly_on_both_sides() {
    const MIB: usize = 64;
    let mut lab = Lab::new(Setup {
        guest: Guest::RunningCounter,
        ..Setup::new(MIB)
    })
    .await;
    let before = storage::image_sha256(&lab.src_img);
    let nbd = lab.source_nbd();
    storage::start_mirror_at(&mut lab.src, &nbd, NODE, Some(4 << 20))
        .await
        .unwrap();
    // Some of the disk crossed the gateways, not all.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    let job = loop {
        let j = storage::job(&mut lab.src).await.expect("mirror job gone");
        if j["offset"].as_u64().unwrap_or(0) > 0 {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {j}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(job["ready"], false, "{job}");
    lab.src.forget_old_events().await.unwrap();
    storage::release_source(&mut lab.src).await;
    let cancelled = lab
        .src
        .qmp
        .queued_events()
        .any(|e| e.name == "BLOCK_JOB_CANCELLED" && e.data["device"] == "mirror-disk0");
    assert!(cancelled, "the job did not end cancelled");

    let mut ends = Vec::new();
    for gw in [&mut lab.sgw, &mut lab.tgw] {
        let rec = gw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
        println!("{rec}");
        assert_eq!(rec["channel"], "nbd:disk0", "{rec}");
        let sent = rec["bytes_sent"].as_u64().unwrap();
        assert!(sent > 0 && sent < (MIB as u64) << 20, "{rec}");
        ends.push(rec["outcome"].as_str().unwrap().to_owned());
    }
    // QEMU's client disconnects as at the end of a copy (NBD_CMD_DISC,
    // then close): nothing tells a cancelled copy from a finished one.
    assert_eq!(ends, ["completed", "completed"]);
    storage::stop_serving(&mut lab.dst).await;
    lab.src.assert_running_and_counting().await;
    storage::flush(&mut lab.src).await;
    assert_eq!(storage::image_sha256(&lab.src_img), before, "source disk");
}

/// The ACL file: `policy` for the lab's source DN.
fn acl(policy: &str) -> String {
    serde_json::json!({
        "rules": [{ "match": SOURCE_DN, "policy": policy }],
        "policy": "deny"
    })
    .to_string()
}

/// An ACL change that no longer allows the source, in the middle of a
/// copy: the target gateway cuts the live NBD channel (revoked, with the
/// reason), the source QEMU's mirror job fails, its VM keeps running and
/// its disk is unchanged, and no client is left on the NBD server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_change_cuts_a_copy_midway() {
    const MIB: usize = 64;
    let spare = tempfile::tempdir().unwrap();
    let acl_path = spare.path().join("acl.json");
    std::fs::write(&acl_path, acl("allow")).unwrap();
    let mut lab = Lab::new(Setup {
        guest: Guest::RunningCounter,
        acl: Some(&acl_path),
        ..Setup::new(MIB)
    })
    .await;
    let before = storage::image_sha256(&lab.src_img);
    let nbd = lab.source_nbd();
    storage::start_mirror_at(&mut lab.src, &nbd, NODE, Some(4 << 20))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while storage::job(&mut lab.src).await.expect("mirror job gone")["offset"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Replaced the way editors do: a sibling renamed over it.
    let tmp = acl_path.with_extension("tmp");
    std::fs::write(&tmp, acl("deny")).unwrap();
    std::fs::rename(&tmp, &acl_path).unwrap();

    let rec = lab.tgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    println!("target gateway: {rec}");
    assert_eq!(rec["channel"], "nbd:disk0", "{rec}");
    assert_eq!(rec["outcome"], "failed", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("revoked: peer {SOURCE_DN} not allowed by ACL")),
        "{rec}"
    );
    let last = storage::wait_gone(&mut lab.src).await;
    println!("mirror job before it ended: {last:?}");
    let failed = lab
        .src
        .qmp
        .queued_events()
        .find(|e| e.name == "BLOCK_JOB_COMPLETED" && e.data["device"] == "mirror-disk0");
    let failed = failed.expect("no BLOCK_JOB_COMPLETED");
    println!("QEMU: {}", failed.data);
    assert!(failed.data["error"].is_string(), "{}", failed.data);
    lab.src
        .cmd(
            "blockdev-del",
            serde_json::json!({ "node-name": "nbd-disk0" }),
        )
        .await
        .unwrap();
    let rec = lab.sgw.wait_outcome(EVENT_TIMEOUT).await.unwrap();
    println!("source gateway: {rec}");
    assert_eq!(rec["channel"], "nbd:disk0", "{rec}");
    storage::stop_serving(&mut lab.dst).await;
    lab.src.assert_running_and_counting().await;
    storage::flush(&mut lab.src).await;
    assert_eq!(storage::image_sha256(&lab.src_img), before, "source disk");
}
