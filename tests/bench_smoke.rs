//! CI smoke run of `miggate bench --quick`: the benchmark must keep
//! running end to end, listing every transport with a figure or an
//! explicit "skipped: not installed". No timing assertions: CI machines
//! are too noisy for that; the README's table comes from full runs.

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

fn assert_figure_or_skipped(cell: &str, name: &str, out: &str) {
    let first = cell.split_whitespace().next().unwrap_or("");
    assert!(
        first.parse::<f64>().is_ok() || cell.starts_with("skipped: not installed"),
        "{name}: {cell:?} is neither a figure nor 'skipped: not installed'\n{out}"
    );
}

#[test]
fn quick_bench_lists_every_transport() {
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
        assert_figure_or_skipped(row(&out, "Migration:", t), t, &out);
    }
    for p in RELAY_PATHS {
        assert_figure_or_skipped(row(&out, "Relay only", p), p, &out);
    }
    assert!(out.contains("p50 ") && out.contains("p99 "), "{out}");
    assert!(out.contains("per open channel"), "{out}");
    assert!(out.contains("per handshake stalled"), "{out}");
}
