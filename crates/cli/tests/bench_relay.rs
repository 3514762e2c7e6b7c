//! The relay experiments of `miggate bench` keep running end to end (no
//! QEMU needed): `--relay-variants` relays the same bytes through today's
//! relay, the in-place one (`miggate::relay::inplace`), today's with a
//! read-ahead buffer, and the real gateway processes; `--relay-channels`
//! sends K channels at once through one gateway pair. The bench itself
//! fails a round whose sink did not get every byte, so a figure in every
//! row means every byte arrived. No timing assertions (README's figures
//! come from full runs).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_miggate");

/// The first number after `name` in the table whose header starts with
/// `header`.
fn figure(out: &str, header: &str, name: &str) -> f64 {
    let table = out
        .split_once(header)
        .unwrap_or_else(|| panic!("no table {header:?} in:\n{out}"))
        .1;
    let rest = table
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.trim_start().strip_prefix(name))
        .unwrap_or_else(|| panic!("no row {name:?} under {header:?} in:\n{out}"));
    let cell = rest.split_whitespace().next().unwrap_or("");
    cell.parse()
        .unwrap_or_else(|_| panic!("{name}: {rest:?} has no figure\n{out}"))
}

#[test]
fn relay_variants_and_parallel_channels_run_end_to_end() {
    let run = Command::new(BIN)
        .args([
            "bench",
            "--relay-variants",
            "--relay-channels",
            "1,2",
            "--relay-mib",
            "32",
            "--rounds",
            "1",
            "--no-warmup",
        ])
        .output()
        .expect("run miggate bench");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "miggate bench --relay-variants failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for v in [
        "today's relay ",
        "sealed in place ",
        "today's + read-ahead ",
        "gateway processes ",
    ] {
        assert!(figure(&out, "Relay variants", v) > 0.0, "{v}\n{out}");
    }
    assert!(
        out.contains("sealed in place vs today's relay, round by round"),
        "{out}"
    );
    for k in ["1 ", "2 "] {
        assert!(figure(&out, "Parallel channels", k) > 0.0, "K={k}\n{out}");
    }
}
