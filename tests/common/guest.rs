//! Guest payloads of the test VMs: seeded pseudo-random RAM contents and a
//! boot sector that keeps dirtying memory.
#![allow(dead_code)] // each integration test binary uses a different subset

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Guest-physical address of the 32-bit counter the boot sector increments.
pub const COUNTER_ADDR: u64 = 0x500;
/// The boot sector writes the counter into every 4 KiB page of
/// `DIRTY_START..DIRTY_END` on every iteration, so those pages stay dirty
/// for the whole migration.
pub const DIRTY_START: u64 = 0x1_0000;
pub const DIRTY_END: u64 = 0xA_0000;

/// The boot sector loaded by SeaBIOS at 0000:7C00, 16-bit real mode.
/// Verified with `as --32` (`.code16`) + `objdump -d -mi8086`: the bytes
/// below are exactly what GNU as emits for the commented instructions.
const BOOT_CODE: [u8; 41] = [
    0xFA, //                      00 cli                 ; no interrupts: nothing to service
    0x31, 0xC0, //                01 xor ax, ax
    0x8E, 0xD8, //                03 mov ds, ax          ; DS = 0: [0x500] is physical 0x500
    0x8E, 0xD0, //                05 mov ss, ax
    0xBC, 0x00, 0x7C, //          07 mov sp, 0x7c00      ; a sane stack, below the code
    // outer:
    0x66, 0xFF, 0x06, 0x00, 0x05, // 0a inc dword [0x500] ; the counter
    0x66, 0xA1, 0x00, 0x05, //    0f mov eax, [0x500]
    0xBA, 0x00, 0x10, //          13 mov dx, 0x1000      ; segment of DIRTY_START
    // fill:
    0x8E, 0xC2, //                16 mov es, dx
    0x26, 0x66, 0xA3, 0x00, 0x00, // 18 mov [es:0], eax  ; dirty one page
    0x81, 0xC2, 0x00,
    0x01, //    1d add dx, 0x100       ; next 4 KiB page (segment units of 16)
    0x81, 0xFA, 0x00, 0xA0, //    21 cmp dx, 0xa000      ; DIRTY_END >> 4
    0x72, 0xEF, //                25 jb fill             ; -17: back to 0x16
    0xEB, 0xE1, //                27 jmp outer           ; -31: back to 0x0a
];

/// 512-byte MBR: `BOOT_CODE`, zero padding, boot signature 0x55 0xAA.
pub fn boot_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..BOOT_CODE.len()].copy_from_slice(&BOOT_CODE);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// A raw disk image holding `boot_sector()`, padded to 1 MiB so that the
/// IDE geometry guess has whole cylinders to work with.
pub fn write_boot_disk(path: &Path) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(&boot_sector())?;
    f.set_len(1 << 20)
}

/// Guest RAM contents are generated per MiB, each MiB from its own
/// xorshift64* stream seeded by (seed, MiB index): fast even in a debug
/// build, parallel, and stable across crate versions (unlike `rand`'s
/// `SmallRng`).
pub const RAM_CHUNK: usize = 1 << 20;

fn fill_chunk(seed: u64, index: u64, buf: &mut [u8]) {
    // splitmix64 of (seed, index): xorshift must not start at 0, and nearby
    // seeds or chunks must not give related streams.
    let mut z = seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut x = (z ^ (z >> 31)) | 1;
    for word in buf.chunks_exact_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
}

/// The RAM contents of a `PausedRandomRam { seed }` guest of `len` bytes
/// (a whole number of MiB), generated on all cores.
pub fn random_ram(seed: u64, len: usize) -> Vec<u8> {
    assert_eq!(len % RAM_CHUNK, 0, "RAM size must be whole MiB");
    let mut v = vec![0u8; len];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = len.div_ceil(threads).next_multiple_of(RAM_CHUNK);
    std::thread::scope(|s| {
        for (t, part) in v.chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                let first = (t * per_thread / RAM_CHUNK) as u64;
                for (i, chunk) in part.chunks_mut(RAM_CHUNK).enumerate() {
                    fill_chunk(seed, first + i as u64, chunk);
                }
            });
        }
    });
    v
}

/// A file holding `random_ram(seed, len)`, generated once and cached under
/// cargo's target/tmp (tests share it; the guest maps it private, so it is
/// never modified). Written to a unique name then renamed, so concurrent
/// tests never see a partial file.
pub fn random_ram_file(seed: u64, len: usize) -> io::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("miggate-guest-ram");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("seed-{seed:016x}-{}M.img", len / RAM_CHUNK));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == len as u64) {
        return Ok(path);
    }
    let tmp = tempfile::NamedTempFile::new_in(&dir)?;
    std::fs::write(tmp.path(), random_ram(seed, len))?;
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(path)
}
