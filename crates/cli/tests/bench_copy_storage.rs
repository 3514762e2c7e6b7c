//! Smoke run of `miggate bench --copy-storage` at its smallest (32 MiB
//! disk, one round, no warm-up; seconds): a guest migrates with its disk
//! through plain NBD, QEMU's native TLS (NBD and RAM) and miggate, and
//! every row has figures and says its target disk was identical (the
//! bench hashes the target's image after each run and fails the row on a
//! mismatch). No timing assertions; README's figures come from full runs.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_miggate");

/// The cells of the row of `name` in the storage table.
fn row<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let table = out
        .split_once("Storage migration (--copy-storage)")
        .unwrap_or_else(|| panic!("no storage table in:\n{out}"))
        .1;
    let line = table
        .lines()
        .take_while(|l| !l.is_empty())
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{out}"));
    line.split_whitespace().skip(1).collect()
}

#[test]
fn copy_storage_bench_moves_identical_disks_through_every_transport() {
    common::qemu::qemu_binary().unwrap();
    let run = Command::new(BIN)
        .args([
            "bench",
            "--copy-storage",
            "--disk-mib",
            "32",
            "--rounds",
            "1",
            "--no-warmup",
        ])
        .output()
        .expect("run miggate bench --copy-storage");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate bench --copy-storage failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for t in ["plain", "qemu-tls", "miggate"] {
        let cells = row(&out, t);
        for c in [cells[0], cells[2]] {
            assert!(
                c.parse::<f64>().is_ok_and(|v| v > 0.0),
                "{t}: {cells:?} is not a row of figures\n{out}"
            );
        }
        assert_eq!(cells.last(), Some(&"1/1"), "{t}: disk not identical\n{out}");
    }
}
