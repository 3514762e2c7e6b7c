//! A long byte-exact stream through a source and a target gateway, no
//! QEMU: a generator in front of the source gateway, a sink behind the
//! target gateway, real TLS 1.3 on loopback between them. Both ends send
//! (the generator the migration stream, the sink a return stream as big
//! as asked) and hash with SHA-256 what they send and what they receive;
//! both gateways rekey their sending direction (`--rekey-after-mib`) and
//! count their key updates in their outcome records.
//!
//! The target gateway admits the channel only after reading a real QEMU
//! 7.2 main-channel prefix carrying the expected VM UUID
//! ([`miggate_lab::fixtures::QEMU72_MAIN_UUID`]), and the source's DN.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::scenario::{pki, pki_dir, source_gateway, target_gateway, SOURCE_DN};

/// The VM UUID the fixture's configuration section carries.
pub const FIXTURE_UUID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
/// One write or read: big enough that syscalls cost little.
const BLOCK: usize = 1 << 20;
/// The data's source: random bytes (nothing compresses), 8 MiB.
const PATTERN: usize = 8 << 20;

#[derive(Debug, Clone, Copy)]
pub struct LongStream {
    /// Bytes the generator sends after the QEMU prefix (source -> target).
    pub forward: u64,
    /// Bytes the sink sends back (target -> source).
    pub back: u64,
    /// Both gateways' `--rekey-after-mib`.
    pub rekey_after_mib: u64,
}

/// One direction: what its sender sent and hashed, what its receiver got.
#[derive(Debug, Clone)]
pub struct Direction {
    pub sent: u64,
    pub received: u64,
    pub sent_sha256: String,
    pub received_sha256: String,
}

impl Direction {
    pub fn intact(&self) -> bool {
        self.sent == self.received && self.sent_sha256 == self.received_sha256
    }
}

#[derive(Debug, Clone)]
pub struct Figures {
    pub forward: Direction,
    pub back: Direction,
    /// From the generator's connect to the last EOF.
    pub seconds: f64,
    /// Key updates each gateway sent (source: source -> target; target:
    /// target -> source), from their outcome records.
    pub source_key_updates: u64,
    pub target_key_updates: u64,
    pub source_record: Value,
    pub target_record: Value,
}

impl Figures {
    pub fn gib(bytes: u64) -> f64 {
        bytes as f64 / (1u64 << 30) as f64
    }

    pub fn summary(&self) -> String {
        format!(
            "forward {:.2} GiB, back {:.2} GiB in {:.1} s ({:.2} GiB/s forward, {:.2} GiB/s both ways); \
             key updates source->target {}, target->source {}; \
             forward sha256 sent {} received {}; back sha256 sent {} received {}",
            Self::gib(self.forward.received),
            Self::gib(self.back.received),
            self.seconds,
            Self::gib(self.forward.received) / self.seconds,
            Self::gib(self.forward.received + self.back.received) / self.seconds,
            self.source_key_updates,
            self.target_key_updates,
            self.forward.sent_sha256,
            self.forward.received_sha256,
            self.back.sent_sha256,
            self.back.received_sha256,
        )
    }
}

/// Blocks of data that differ from each other: a slice of the random
/// pattern that moves with the block's index, stamped with the index and
/// the stream's seed, so that a lost, repeated or reordered block changes
/// the hash.
struct Blocks {
    pattern: Vec<u8>,
    seed: u64,
}

impl Blocks {
    fn new(seed: u64) -> Blocks {
        Blocks {
            pattern: miggate_lab::guest::random_ram(seed, PATTERN),
            seed,
        }
    }

    fn fill(&self, index: u64, buf: &mut [u8]) {
        let span = (PATTERN - BLOCK) as u64;
        let off = (index.wrapping_mul(0x9E37_79B9) % span) as usize;
        buf.copy_from_slice(&self.pattern[off..off + buf.len()]);
        buf[..8].copy_from_slice(&index.to_le_bytes());
        buf[8..16].copy_from_slice(&self.seed.to_le_bytes());
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `prefix` then `len` bytes of `blocks` into `w`, then half-closes;
/// returns what it sent and its hash.
fn generate(
    mut w: TcpStream,
    prefix: &[u8],
    len: u64,
    seed: u64,
) -> std::io::Result<(u64, String)> {
    let blocks = Blocks::new(seed);
    let mut h = Sha256::new();
    w.write_all(prefix)?;
    h.update(prefix);
    let mut buf = vec![0u8; BLOCK];
    let (mut left, mut index) = (len, 0u64);
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        blocks.fill(index, &mut buf);
        w.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
        index += 1;
    }
    w.shutdown(Shutdown::Write)?;
    Ok((prefix.len() as u64 + len, hex(h.finalize())))
}

/// Reads `r` to EOF; returns what it got and its hash.
fn drain(mut r: TcpStream) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf)? {
            0 => return Ok((total, hex(h.finalize()))),
            n => {
                h.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
}

type Half = JoinHandle<std::io::Result<(u64, String)>>;

fn join(h: Half, what: &str) -> (u64, String) {
    h.join()
        .unwrap_or_else(|_| panic!("{what} panicked"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Runs one long stream through a fresh pair of gateways; panics if
/// anything fails. The caller checks the figures.
pub async fn run(ls: LongStream, timeout: Duration) -> Figures {
    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let rekey = ls.rekey_after_mib.to_string();
    let mut tgw = target_gateway(
        &pki,
        sink_port,
        &[
            "--authz-identity",
            SOURCE_DN,
            "--expect-uuid",
            FIXTURE_UUID,
            "--rekey-after-mib",
            &rekey,
        ],
    )
    .await;
    let mut sgw = source_gateway(&pki, &tgw.addr, &["--rekey-after-mib", &rekey]).await;

    // The sink: reads the forward stream, sends the return stream.
    let back_len = ls.back;
    let sink_side: JoinHandle<(Half, Half)> = std::thread::spawn(move || {
        let (s, _) = sink.accept().unwrap();
        let r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || drain(r));
        let writer = std::thread::spawn(move || generate(s, &[], back_len, 0xBAC4));
        (reader, writer)
    });

    let t0 = Instant::now();
    let gen = TcpStream::connect(("127.0.0.1", sgw.port())).unwrap();
    let back_reader = {
        let r = gen.try_clone().unwrap();
        std::thread::spawn(move || drain(r))
    };
    let fwd_len = ls.forward;
    let fwd_writer = std::thread::spawn(move || {
        generate(
            gen,
            miggate_lab::fixtures::QEMU72_MAIN_UUID,
            fwd_len,
            0xF04D,
        )
    });

    // Blocking joins off the runtime, so the gateways' logs keep draining.
    let ends = tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(move || {
            let fwd_sent = join(fwd_writer, "the generator");
            let back_got = join(back_reader, "the generator's reader");
            let (sink_reader, sink_writer) = sink_side.join().expect("the sink");
            let fwd_got = join(sink_reader, "the sink's reader");
            let back_sent = join(sink_writer, "the sink's writer");
            (fwd_sent, fwd_got, back_sent, back_got, t0.elapsed())
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the long stream did not end within {timeout:?}\nsource gateway:\n{}\ntarget gateway:\n{}",
            sgw.log_text(),
            tgw.log_text()
        )
    })
    .unwrap();
    let (fwd_sent, fwd_got, back_sent, back_got, elapsed) = ends;

    let source_record = sgw.wait_outcome(Duration::from_secs(30)).await.unwrap();
    let target_record = tgw.wait_outcome(Duration::from_secs(30)).await.unwrap();
    let updates = |r: &Value| {
        r["key_updates"]
            .as_u64()
            .unwrap_or_else(|| panic!("no key_updates in the record {r}"))
    };
    Figures {
        forward: Direction {
            sent: fwd_sent.0,
            received: fwd_got.0,
            sent_sha256: fwd_sent.1,
            received_sha256: fwd_got.1,
        },
        back: Direction {
            sent: back_sent.0,
            received: back_got.0,
            sent_sha256: back_sent.1,
            received_sha256: back_got.1,
        },
        seconds: elapsed.as_secs_f64(),
        source_key_updates: updates(&source_record),
        target_key_updates: updates(&target_record),
        source_record,
        target_record,
    }
}

/// The long migration's `max-bandwidth`: see `native_tls_migration`.
const MAX_BANDWIDTH: u64 = 512 << 20;

/// A boot sector that dirties 64 MiB over and over, so that QEMU keeps
/// doing precopy passes of 64 MiB for as long as its downtime limit is
/// tiny. Like the lab's counter guest it counts at 0x500
/// (`COUNTER_ADDR`); it enables A20, enters unreal mode (FS with a 4 GiB
/// limit) and writes the count into every 4 KiB page of 1..65 MiB.
/// Each write follows an `invlpg`: under TCG a page written once stays
/// writable in the TLB, and QEMU's dirty sync does not flush it, so
/// without the flush only the first pass would see the pages dirty. (The
/// counter guest's 576 KiB below 1 MiB are too few: a pass takes
/// milliseconds, and one sync that finds the vCPU descheduled, nothing
/// dirty, completes the migration.) Assembled with `as --32` (`.code16`):
///
/// ```text
///   cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00
///   in al,0x92; or al,2; out 0x92,al           ; A20 on
///   lgdt [gdtr]; mov eax,cr0; or al,1; mov cr0,eax
///   mov bx,8; mov fs,bx; and al,0xfe; mov cr0,eax  ; unreal FS
/// outer: inc dword [0x500]; mov eax,[0x500]; mov edi,0x100000
/// fill:  invlpg [fs:edi]; mov [fs:edi],eax; add edi,0x1000
///        cmp edi,0x4100000; jb fill; jmp outer
/// gdt:   dq 0, 0x00cf92000000ffff ; gdtr: dw 15, dd gdt
/// ```
const DIRTYING_BOOT: [u8; 110] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xe4, 0x92, //
    0x0c, 0x02, 0xe6, 0x92, 0x66, 0x0f, 0x01, 0x16, 0x68, 0x7c, 0x0f, 0x20, //
    0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0, 0xbb, 0x08, 0x00, 0x8e, 0xe3, 0x24, //
    0xfe, 0x0f, 0x22, 0xc0, 0x66, 0xff, 0x06, 0x00, 0x05, 0x66, 0xa1, 0x00, //
    0x05, 0x66, 0xbf, 0x00, 0x00, 0x10, 0x00, 0x64, 0x67, 0x0f, 0x01, 0x3f, //
    0x64, 0x67, 0x66, 0x89, 0x07, 0x66, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, //
    0x66, 0x81, 0xff, 0x00, 0x00, 0x10, 0x04, 0x72, 0xe6, 0xeb, 0xd5, 0x8d, //
    0xb4, 0x00, 0x00, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0x0f, 0x00, 0x58, 0x7c, //
    0x00, 0x00,
];

/// A 1.44 MB floppy image booting [`DIRTYING_BOOT`].
fn write_dirtying_floppy(path: &std::path::Path) -> std::io::Result<()> {
    let mut img = vec![0u8; 1_474_560];
    img[..DIRTYING_BOOT.len()].copy_from_slice(&DIRTYING_BOOT);
    img[510] = 0x55;
    img[511] = 0xAA;
    std::fs::write(path, img)
}

/// What a long migration into QEMU's native TLS showed.
#[derive(Debug, Clone)]
pub struct NativeFigures {
    /// `ram.transferred` of the source's last query-migrate.
    pub transferred: u64,
    /// Precopy passes (`ram.dirty-sync-count`).
    pub passes: u64,
    pub seconds: f64,
    /// Key updates the source gateway sent into QEMU's GnuTLS.
    pub key_updates: u64,
    pub record: Value,
}

impl NativeFigures {
    pub fn summary(&self) -> String {
        format!(
            "{:.2} GiB migrated into QEMU's native TLS in {:.1} s ({:.2} GiB/s), {} passes, {} key updates into GnuTLS",
            Figures::gib(self.transferred),
            self.seconds,
            Figures::gib(self.transferred) / self.seconds,
            self.passes,
            self.key_updates,
        )
    }
}

/// A running guest (`mib` MiB, [`DIRTYING_BOOT`]) migrates through a
/// source gateway that rekeys every `rekey_after_mib` MiB into a target
/// QEMU with its own TLS (tls-creds, tls-authz on the source's DN). A
/// downtime limit of 1 ms (at 512 MiB/s at most) keeps QEMU doing passes of the
/// guest's 64 MiB until the source reports `at_least` bytes transferred; a 2 s limit then lets it converge. The
/// guest must arrive running, and QEMU's GnuTLS must have taken every key
/// update without failing the session.
pub async fn native_tls_migration(
    mib: u32,
    at_least: u64,
    rekey_after_mib: u64,
    timeout: Duration,
) -> NativeFigures {
    use super::qemu::{Guest, NativeTls, Qemu, QemuExt, QemuOpts, TlsEndpoint};
    use serde_json::json;

    let pki_tmp = pki();
    let pki = pki_dir(&pki_tmp);
    let dir = tempfile::tempdir().unwrap();
    let floppy = dir.path().join("dirty.img");
    write_dirtying_floppy(&floppy).unwrap();
    let mut opts = QemuOpts::new(Guest::RunningCounter, mib);
    // TCG: under a nested KVM every first write to a page after a dirty
    // sync is a slow exit, and the guest would dirty far fewer pages per
    // second than the migration sends; TCG tracks them in software.
    opts.accel = Some(miggate_lab::Accel::Tcg);
    // Boots DIRTYING_BOOT from a floppy (read-only: both QEMUs open it)
    // instead of the counter guest's disk.
    opts.extra_args = [
        "-drive",
        &format!("file={},format=raw,if=floppy,readonly=on", floppy.display()),
        "-boot",
        "a",
    ]
    .map(String::from)
    .to_vec();
    let mut dst_opts = opts.as_incoming();
    dst_opts.tls = Some(NativeTls {
        dir: pki.clone(),
        endpoint: TlsEndpoint::Server,
        authz_identity: Some(SOURCE_DN.to_string()),
        priority: None,
    });
    let (mut src, mut dst) = Qemu::pair(opts, dst_opts).await.unwrap();
    src.set_unlimited_bandwidth().await.unwrap();
    dst.set_native_tls_parameters(None).await.unwrap();
    let port = dst.migrate_incoming_any_port().await.unwrap();
    src.assert_running_and_counting().await;
    // Keep streaming: QEMU converges once the dirty pages fit in
    // bandwidth x downtime-limit, here 512 KiB at most, far below the 64 MiB the
    // guest dirties between two passes.
    src.set_parameters(json!({ "downtime-limit": 1, "max-bandwidth": MAX_BANDWIDTH }))
        .await
        .unwrap();
    let rekey = rekey_after_mib.to_string();
    let mut sgw = source_gateway(
        &pki,
        &format!("127.0.0.1:{port}"),
        &["--rekey-after-mib", &rekey],
    )
    .await;

    let t0 = Instant::now();
    src.migrate(&format!("tcp:{}", sgw.addr)).await.unwrap();
    let deadline = t0 + timeout;
    let mut last_print = t0;
    loop {
        let info = src.query_migrate().await.unwrap();
        assert!(
            !info.is_terminal(),
            "the migration ended before {at_least} bytes: {}\nsource stderr:\n{}\ndestination stderr:\n{}\nsource gateway:\n{}",
            info.raw,
            src.stderr_text(),
            dst.stderr_text(),
            sgw.log_text()
        );
        if info.raw["ram"]["transferred"].as_u64().unwrap_or(0) >= at_least {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not {at_least} bytes within {timeout:?}: {}",
            info.raw
        );
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "{:.0} s: {:.2} GiB, {} passes",
                t0.elapsed().as_secs_f64(),
                Figures::gib(info.raw["ram"]["transferred"].as_u64().unwrap_or(0)),
                info.raw["ram"]["dirty-sync-count"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Now converge: 64 MiB fit in 2 s at 32 MiB/s or more.
    src.set_parameters(json!({ "downtime-limit": 2000 }))
        .await
        .unwrap();
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(60);
    let s = src.wait_migration_end(left).await.unwrap();
    let seconds = t0.elapsed().as_secs_f64();
    assert_eq!(
        s.status.as_deref(),
        Some("completed"),
        "source: {:?}\nsource stderr:\n{}\ndestination stderr:\n{}\nsource gateway:\n{}",
        s.error_desc,
        src.stderr_text(),
        dst.stderr_text(),
        sgw.log_text()
    );
    let d = dst
        .wait_migration_end(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        d.status.as_deref(),
        Some("completed"),
        "destination: {:?}\n{}",
        d.error_desc,
        dst.stderr_text()
    );
    dst.wait_status("running", Duration::from_secs(30))
        .await
        .unwrap();
    dst.assert_running_and_counting().await;
    let record = sgw.wait_outcome(Duration::from_secs(30)).await.unwrap();
    assert_eq!(record["outcome"], "completed", "{record}");
    NativeFigures {
        transferred: s.raw["ram"]["transferred"].as_u64().unwrap_or(0),
        passes: s.raw["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        seconds,
        key_updates: record["key_updates"].as_u64().unwrap_or(0),
        record,
    }
}
