//! Guest payloads of the lab VMs: seeded pseudo-random RAM contents (so
//! nothing compresses or is skipped as a zero page) and a boot sector that
//! keeps dirtying memory.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::LabError;

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

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The RAM contents of a `PausedRandomRam { seed }` guest of `len` bytes
/// (a whole number of MiB), generated on all cores.
pub fn random_ram(seed: u64, len: usize) -> Vec<u8> {
    assert_eq!(len % RAM_CHUNK, 0, "RAM size must be whole MiB");
    let mut v = vec![0u8; len];
    let per_thread = len.div_ceil(threads()).next_multiple_of(RAM_CHUNK);
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

/// Where RAM files are cached unless told otherwise:
/// `$XDG_CACHE_HOME/miggate`, else `~/.cache/miggate`, else the temp dir.
pub fn default_cache_dir() -> PathBuf {
    let non_empty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
    if let Some(x) = non_empty("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("miggate");
    }
    if let Some(h) = non_empty("HOME") {
        return PathBuf::from(h).join(".cache").join("miggate");
    }
    std::env::temp_dir().join("miggate-cache")
}

/// A file holding `random_ram(seed, len)` in `cache_dir`, generated once
/// and shared (a guest maps it private, so it is never modified). Written
/// chunk by chunk on all cores without holding it in memory, to a unique
/// name then renamed, so a concurrent user never sees a partial file.
pub fn random_ram_file(seed: u64, len: usize, cache_dir: &Path) -> Result<PathBuf, LabError> {
    if len % RAM_CHUNK != 0 || len == 0 {
        return Err(LabError::Unexpected {
            what: format!("guest RAM of {len} bytes: must be a positive whole number of MiB"),
            stderr: String::new(),
        });
    }
    let io = |what: &str, e| LabError::io(format!("{what} {}", cache_dir.display()), e);
    std::fs::create_dir_all(cache_dir).map_err(|e| io("creating", e))?;
    let path = cache_dir.join(format!("seed-{seed:016x}-{}M.img", len / RAM_CHUNK));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == len as u64) {
        return Ok(path);
    }
    let tmp = tempfile::NamedTempFile::new_in(cache_dir).map_err(|e| io("temp file in", e))?;
    let file = tmp.as_file();
    let chunks = len / RAM_CHUNK;
    let n = threads().min(chunks);
    let written: io::Result<()> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .map(|t| {
                s.spawn(move || -> io::Result<()> {
                    let mut buf = vec![0u8; RAM_CHUNK];
                    for i in (t..chunks).step_by(n) {
                        fill_chunk(seed, i as u64, &mut buf);
                        file.write_all_at(&buf, (i * RAM_CHUNK) as u64)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("RAM writer thread panicked"))
    });
    written.map_err(|e| io("writing guest RAM in", e))?;
    tmp.persist(&path)
        .map_err(|e| io("saving guest RAM in", e.error))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_matches_memory_image() {
        let dir = tempfile::tempdir().unwrap();
        let len = 3 * RAM_CHUNK;
        let path = random_ram_file(7, len, dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), random_ram(7, len));
        // Cached: the same path, not regenerated.
        assert_eq!(random_ram_file(7, len, dir.path()).unwrap(), path);
        assert_ne!(random_ram(7, RAM_CHUNK), random_ram(8, RAM_CHUNK));
    }

    #[test]
    fn boot_sector_is_bootable() {
        let s = boot_sector();
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }
}
