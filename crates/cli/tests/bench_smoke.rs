//! CI smoke run of `miggate bench --quick`: the benchmark must keep
//! running end to end, with a figure for every transport. `scripts/test.sh`
//! installs every peer (QEMU, stunnel4, socat), so a transport the bench
//! skips as "not installed" fails this test with the install hint instead
//! of passing unmeasured. No timing assertions: CI machines are too noisy
//! for that; the README's table comes from full runs. Also the smallest
//! runs of `bench` and `demo` with `--qemu 10.0` (seconds each): they must
//! run on that QEMU and say so. And `bench --evacuate 4`, the code path
//! of the host evacuation (`--evacuate 32` in README's figures).

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_miggate");

const TRANSPORTS: [&str; 9] = [
    "plain",
    "plain-multifd",
    "qemu-tls",
    "qemu-tls-multifd",
    "stunnel",
    "socat",
    "miggate",
    "miggate-multifd",
    "miggate-flood",
];
const RELAY_PATHS: [&str; 4] = ["raw loopback", "miggate", "stunnel", "socat"];

/// The row of `name` in the table whose header starts with `header`: the
/// text after the name.
fn row<'a>(out: &'a str, header: &str, name: &str) -> &'a str {
    let table = out
        .split_once(header)
        .unwrap_or_else(|| panic!("no table {header:?} in:\n{out}"))
        .1;
    table
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with("  "))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no row for {name:?} under {header:?} in:\n{out}"))
}

fn assert_figure(cell: &str, name: &str, out: &str) {
    assert!(
        !cell.starts_with("skipped"),
        "{name} was not measured ({cell}): scripts/setup.sh installs every peer \
         (apt-get install --no-install-recommends qemu-system-x86 stunnel4 socat)\n{out}"
    );
    let first = cell.split_whitespace().next().unwrap_or("");
    assert!(
        first.parse::<f64>().is_ok(),
        "{name}: {cell:?} is not a figure\n{out}"
    );
}

#[test]
fn quick_bench_measures_every_transport() {
    // Fails with the install hint when QEMU is missing, like every QEMU test.
    common::qemu::qemu_binary().unwrap();
    let run = Command::new(BIN)
        .args(["bench", "--quick"])
        .output()
        .expect("run miggate bench");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate bench --quick failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for t in TRANSPORTS {
        assert_figure(row(&out, "Migration:", t), t, &out);
    }
    for p in RELAY_PATHS {
        assert_figure(row(&out, "Relay only", p), p, &out);
    }
    assert!(out.contains("p50 ") && out.contains("p99 "), "{out}");
    assert!(out.contains("per open channel"), "{out}");
    assert!(out.contains("per handshake stalled"), "{out}");
}

/// `--qemu 10.0`, smallest case (16 MiB, one round, plain and miggate, no
/// relay-only or handshake part): the header names QEMU 10.0 as measured.
#[test]
fn bench_on_qemu10_names_it_in_the_header() {
    // Fails with the setup hint when QEMU 10.0 is missing.
    common::qemu::QemuVersion::V10_0.command().unwrap();
    let run = Command::new(BIN)
        .args([
            "bench",
            "--qemu",
            "10.0",
            "--ram-mib",
            "16",
            "--rounds",
            "1",
            "--no-warmup",
            "--transports",
            "plain,miggate",
            "--relay-mib",
            "0",
            "--handshakes",
            "0",
        ])
        .output()
        .expect("run miggate bench");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate bench --qemu 10.0 failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.contains(", QEMU emulator version 10.0."),
        "the header should name QEMU 10.0: {header}"
    );
    for t in ["plain", "miggate"] {
        assert_figure(row(&out, "Migration:", t), t, &out);
    }
}

/// `miggate demo --qemu 10.0`: the running guest migrates between two
/// QEMU 10.0 and the demo names the version QEMU announced.
#[test]
fn demo_on_qemu10_migrates_on_it() {
    common::qemu::QemuVersion::V10_0.command().unwrap();
    let run = Command::new(BIN)
        .args(["demo", "--qemu", "10.0"])
        .output()
        .expect("run miggate demo");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate demo --qemu 10.0 failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("[2/5] QEMU 10.0."), "{out}");
    assert!(
        out.contains("[5/5] the guest runs on the destination"),
        "{out}"
    );
}

/// `--evacuate 4`: four paused guests (each its own RAM seed and UUID)
/// migrate at once through one gateway pair (the target forwarding by
/// VM UUID) and through one
/// daemon holding four tickets, after one alone. The bench checks every
/// arrival itself (both QEMUs completed, the target's UUID and RAM hash
/// its source's, the daemon's record) and prints "failed: ..." instead
/// of a row otherwise.
#[test]
fn bench_evacuate_lands_every_vm_in_its_own_target() {
    common::qemu::qemu_binary().unwrap();
    let run = Command::new(BIN)
        .args(["bench", "--evacuate", "4"])
        .output()
        .expect("run miggate bench --evacuate");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate bench --evacuate 4 failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for name in ["one gateway pair", "daemon, 4 tickets"] {
        let cell = row(&out, "Evacuation:", name);
        let cols: Vec<&str> = cell.split_whitespace().collect();
        assert_eq!(cols.first(), Some(&"4"), "{name}: {cell:?}\n{out}");
        // wall s, aggregate MiB/s, alone s, alone MiB/s, x alone: figures.
        for c in &cols[1..6.min(cols.len())] {
            assert!(
                c.parse::<f64>().is_ok_and(|v| v > 0.0),
                "{name}: {cell:?} is not a row of figures\n{out}"
            );
        }
        assert!(cols.len() >= 6, "{name}: {cell:?}\n{out}");
    }
}

/// `--pin --running`, smallest case (64 MiB, one round, plain, QEMU's
/// TLS and miggate): each side's CPU per GiB is a figure (the bench itself
/// fails a round whose processes ran outside their CPUs), the running
/// guest's downtime comes from QEMU, the targets line compares miggate with
/// plain and QEMU's TLS, and the switch-over exchange has a row per path.
#[test]
fn pinned_bench_shows_each_side_and_the_downtime() {
    common::qemu::qemu_binary().unwrap();
    let run = Command::new(BIN)
        .args([
            "bench",
            "--pin",
            "--running",
            "--ram-mib",
            "64",
            "--rounds",
            "1",
            "--no-warmup",
            "--transports",
            "plain,qemu-tls,miggate",
            "--relay-mib",
            "0",
            "--handshakes",
            "0",
            "--switchover",
            "5",
        ])
        .output()
        .expect("run miggate bench --pin --running");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate bench --pin --running failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("Pinned (--pin): source side on CPU "), "{out}");
    for t in ["plain", "qemu-tls", "miggate"] {
        let cell = row(&out, "Migration: paused guest", t);
        // Last two columns: CPU-s per GiB of the source side and the target side.
        let cols: Vec<&str> = cell.split_whitespace().collect();
        for side in &cols[cols.len() - 2..] {
            assert!(
                side.parse::<f64>().is_ok_and(|v| v > 0.0),
                "{t}: {cell:?} has no CPU figure per side\n{out}"
            );
        }
        let downtime = row(&out, "Migration: running guest", t);
        assert_figure(downtime, t, &out);
    }
    assert!(
        out.contains("targets: miggate's median downtime") && out.contains("qemu-tls"),
        "{out}"
    );
    for p in ["direct (TCP)", "miggate"] {
        assert_figure(row(&out, "Switch-over exchange", p), p, &out);
    }
}
