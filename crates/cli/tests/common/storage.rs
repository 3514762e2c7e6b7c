//! Storage migration in the lab: raw disk images, a virtio disk on each
//! QEMU, the target QEMU's NBD server, the source's mirror job, and the
//! QMP sequence libvirt drives around the RAM migration
//! (`virsh migrate --copy-storage-all`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qemu::{Qemu, QemuOpts};

/// The disk's node name on both QEMUs, and the export's name.
pub const NODE: &str = "disk0";
/// The virtio-blk device's id; `qemu-io -d` reaches the disk through its
/// backend, so that a write goes through the mirror like a guest's.
pub const DEVICE: &str = "vd0";
pub const JOB: &str = "mirror-disk0";
pub const NBD_NODE: &str = "nbd-disk0";
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// A raw image of `mib` MiB of random bytes (the lab's seeded generator).
pub fn random_disk(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, miggate_lab::guest::random_ram(seed, mib << 20)).unwrap();
    path
}

/// A raw image of `mib` MiB of zeroes (sparse).
pub fn empty_disk(dir: &Path, name: &str, mib: usize) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len((mib as u64) << 20).unwrap();
    path
}

/// `opts` with a virtio disk backed by `image`.
pub fn with_disk(mut opts: QemuOpts, image: &Path) -> QemuOpts {
    opts.extra_args.extend(
        [
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=file-{NODE}",
                image.display()
            ),
            "-blockdev",
            &format!("driver=raw,file=file-{NODE},node-name={NODE}"),
            "-device",
            &format!("virtio-blk-pci,drive={NODE},id={DEVICE}"),
        ]
        .map(str::to_owned),
    );
    opts
}

async fn ok(q: &mut Qemu, cmd: &str, args: Value) -> Value {
    q.cmd(cmd, args.clone())
        .await
        .unwrap_or_else(|e| panic!("{cmd} {args}: {e}\nstderr:\n{}", q.stderr_text()))
}

/// The target QEMU: its NBD server on `socket`, exporting the disk
/// (writable) under [`NODE`].
pub async fn serve_disk(dst: &mut Qemu, socket: &Path) {
    let addr = json!({"type": "unix", "data": {"path": socket}});
    ok(dst, "nbd-server-start", json!({ "addr": addr })).await;
    let export =
        json!({"type": "nbd", "id": NODE, "node-name": NODE, "name": NODE, "writable": true});
    ok(dst, "block-export-add", export).await;
}

/// The source QEMU: an NBD node on `socket` (the source gateway's NBD
/// listener) for export `export`, then a full mirror of the disk into it.
/// Returns QEMU's error if either is refused (a refused NBD channel fails
/// the `blockdev-add`, with the server's message).
pub async fn start_mirror(src: &mut Qemu, socket: &Path, export: &str) -> Result<(), String> {
    start_mirror_at(src, socket, export, None).await
}

/// [`start_mirror`] copying at most `speed` bytes per second (`None`: as
/// fast as it can), e.g. to still be copying when something happens.
pub async fn start_mirror_at(
    src: &mut Qemu,
    socket: &Path,
    export: &str,
    speed: Option<u64>,
) -> Result<(), String> {
    let node = json!({
        "driver": "nbd", "node-name": NBD_NODE, "export": export,
        "server": {"type": "unix", "path": socket},
    });
    src.cmd("blockdev-add", node)
        .await
        .map_err(|e| e.to_string())?;
    let mut mirror = json!({"job-id": JOB, "device": NODE, "target": NBD_NODE, "sync": "full"});
    if let Some(speed) = speed {
        mirror["speed"] = json!(speed);
        // In small bursts: the whole 16 MiB buffer at once, then a pause
        // of 16 MiB at `speed`, would leave the job asleep for seconds.
        mirror["buf-size"] = json!(1 << 20);
    }
    src.cmd("blockdev-mirror", mirror)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Opens export `export` on `socket` with HMP `drive_add` and returns
/// what HMP printed: unlike QMP, it shows an error's hints, where QEMU
/// puts the message of an NBD server's error reply ("server reported:").
pub async fn hmp_open_nbd(q: &mut Qemu, socket: &Path, export: &str) -> String {
    let line = format!(
        "drive_add 0 if=none,id=hmp-probe,file=nbd+unix:///{export}?socket={}",
        socket.display()
    );
    let out = ok(q, "human-monitor-command", json!({ "command-line": line })).await;
    out.as_str().unwrap_or_default().to_owned()
}

/// The mirror job as `query-block-jobs` shows it (`None`: gone).
pub async fn job(src: &mut Qemu) -> Option<Value> {
    let jobs = ok(src, "query-block-jobs", json!({})).await;
    jobs.as_array()?
        .iter()
        .find(|j| j["device"] == JOB)
        .cloned()
}

/// `query-block-jobs`, or QEMU's error (e.g. it is gone).
pub async fn try_job(src: &mut Qemu) -> Result<Option<Value>, String> {
    let jobs = src
        .cmd("query-block-jobs", json!({}))
        .await
        .map_err(|e| e.to_string())?;
    Ok(jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["device"] == JOB).cloned()))
}

/// Waits until the mirror has copied the disk and follows its writes.
pub async fn wait_ready(src: &mut Qemu) {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let j = job(src)
            .await
            .expect("the mirror job vanished before it was ready");
        if j["ready"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "mirror never ready: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the job is gone; returns its last state seen.
pub async fn wait_gone(src: &mut Qemu) -> Option<Value> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    let mut last = None;
    while let Some(j) = job(src).await {
        assert!(Instant::now() < deadline, "mirror job never ended: {j}");
        last = Some(j);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// The end of a copy that never reached switch-over (or whose mirror
/// has nothing left to copy): the ready mirror is cancelled (it finishes
/// in sync, without pivoting: the source keeps its own disk), the NBD
/// node removed (its connection closes), the target's export and server
/// stopped.
pub async fn finish(src: &mut Qemu, dst: &mut Qemu) {
    release_source(src).await;
    stop_serving(dst).await;
}

/// Migrates `src`'s RAM to `uri` up to `pre-switchover`
/// (`pause-before-switchover`, as libvirt runs a storage migration): the
/// VM is stopped there, its disks still active, so the mirror can end in
/// sync ([`switch_over`]). Past switch-over the source's disks are
/// inactive, and a mirror with data left to copy aborts the source QEMU
/// (7.2 and 10.0 alike: `bdrv_co_write_req_prepare: Assertion
/// '!(bs->open_flags & BDRV_O_INACTIVE)' failed`).
pub async fn migrate_until_switchover(src: &mut Qemu, uri: &str) {
    src.set_capabilities(&[("pause-before-switchover", true)])
        .await
        .unwrap();
    src.forget_old_events().await.unwrap();
    src.migrate(uri).await.unwrap();
    wait_switchover(src).await;
}

/// Waits until the migration pauses before switch-over.
pub async fn wait_switchover(src: &mut Qemu) {
    let deadline = Instant::now() + super::scenario::MIGRATION_TIMEOUT;
    loop {
        let info = src.query_migrate().await.unwrap();
        match info.status.as_deref() {
            Some("pre-switchover") => return,
            Some("setup" | "active") => {}
            other => panic!("migration {other:?} before switch-over: {}", info.raw),
        }
        assert!(Instant::now() < deadline, "{}", info.raw);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// At `pre-switchover`: the mirror ends in sync and its node goes
/// ([`release_source`]), then the migration completes on both sides.
pub async fn switch_over(src: &mut Qemu, dst: &mut Qemu) {
    release_source(src).await;
    ok(
        src,
        "migrate-continue",
        json!({ "state": "pre-switchover" }),
    )
    .await;
    for (q, side) in [(src, "source"), (dst, "target")] {
        let end = q
            .wait_migration_end(super::scenario::MIGRATION_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(
            end.status.as_deref(),
            Some("completed"),
            "{side}: {:?}\n{}",
            end.raw,
            q.stderr_text()
        );
    }
}

/// The source's half of [`finish`]: the job cancelled (in sync if it was
/// ready), then its NBD node removed, which closes the NBD connection.
pub async fn release_source(src: &mut Qemu) {
    ok(src, "block-job-cancel", json!({ "device": JOB })).await;
    wait_gone(src).await;
    ok(src, "blockdev-del", json!({ "node-name": NBD_NODE })).await;
}

/// The target's half of [`finish`]: export removed (once no client uses
/// it), NBD server stopped.
pub async fn stop_serving(dst: &mut Qemu) {
    release_export(dst).await;
    ok(dst, "nbd-server-stop", json!({})).await;
}

/// Removes the target's export once its NBD client is gone. The client's
/// close crosses both gateways after `blockdev-del` returned, so the
/// server may still count the connection for a moment ("export 'disk0'
/// still in use"; libvirt only ever calls `nbd-server-stop`, which drops
/// clients): the default ("safe") removal is retried until it succeeds.
pub async fn release_export(dst: &mut Qemu) {
    let deadline = Instant::now() + super::scenario::EVENT_TIMEOUT;
    loop {
        match dst.cmd("block-export-del", json!({ "id": NODE })).await {
            Ok(_) => break,
            Err(e) if e.to_string().contains("still in use") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("block-export-del: {e}"),
        }
    }
    // Removal is asynchronous (BLOCK_EXPORT_DELETED): wait until gone.
    while !exports(dst).await.is_empty() {
        assert!(Instant::now() < deadline, "export never deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The target's exports (`query-block-exports`).
pub async fn exports(dst: &mut Qemu) -> Vec<Value> {
    let v = ok(dst, "query-block-exports", json!({})).await;
    v.as_array().cloned().unwrap_or_default()
}

/// A write through the disk's device, as the guest's would go (through
/// the mirror): `len` bytes of `pattern` at `offset`.
pub async fn write_through_device(q: &mut Qemu, pattern: u8, offset: u64, len: u64) {
    let line =
        format!("qemu-io -d {DEVICE}/virtio-backend \"write -P {pattern:#x} {offset} {len}\"");
    let out = ok(q, "human-monitor-command", json!({ "command-line": line })).await;
    assert!(
        !out.as_str().unwrap_or_default().contains("rror"),
        "qemu-io: {out}"
    );
}

/// Flushes the disk to its image file (before the file is hashed).
pub async fn flush(q: &mut Qemu) {
    let line = format!("qemu-io -d {DEVICE}/virtio-backend \"flush\"");
    ok(q, "human-monitor-command", json!({ "command-line": line })).await;
}

/// SHA-256 of an image file.
pub fn image_sha256(path: &Path) -> String {
    miggate_lab::qemu::sha256_hex(&std::fs::read(path).unwrap())
}

/// `len` bytes of an image file at `offset`.
pub fn image_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// A hand-written NBD client (fixed newstyle, as in the protocol's
/// proto.md), to send what QEMU's client never would.
pub mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const REP_ACK: u32 = 1;

    /// An option frame.
    pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// `INFO` or `GO` for `export`, asking for no particular information.
    pub fn naming(opt: u32, export: &str) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(opt, &d)
    }

    /// Reads the server's greeting; returns its handshake flags.
    pub async fn greeting(s: &mut UnixStream) -> u16 {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(g[..8], NBDMAGIC.to_be_bytes(), "not an NBD greeting");
        assert_eq!(g[8..16], IHAVEOPT.to_be_bytes(), "not a newstyle greeting");
        u16::from_be_bytes([g[16], g[17]])
    }

    /// One option reply: (option, reply type, data).
    pub async fn reply(s: &mut UnixStream) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await?;
        assert_eq!(h[..8], REPLY_MAGIC.to_be_bytes(), "not an option reply");
        let word = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
        let mut data = vec![0u8; word(16) as usize];
        s.read_exact(&mut data).await?;
        Ok((word(8), word(12), data))
    }

    pub async fn send(s: &mut UnixStream, bytes: &[u8]) {
        s.write_all(bytes).await.unwrap();
    }
}

/// SHA-256 of a running guest's RAM dump without the legacy window
/// 0xA0000..0x100000, where two bytes of SeaBIOS's shadow read
/// differently on a target that never ran, in a direct QEMU-to-QEMU
/// migration too (see `faults::ram_hash`); every other byte must match.
pub async fn ram_hash(q: &mut Qemu) -> String {
    let mut ram = q.ram_dump().await.unwrap();
    ram[0xA_0000..0x10_0000].fill(0);
    super::qemu::sha256_hex(&ram)
}
