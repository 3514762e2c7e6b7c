#!/usr/bin/env bash
# Fuzzes miggate's parsers with libFuzzer (cargo-fuzz; targets in fuzz/,
# the property each checks in src/fuzzing.rs).
#
#   scripts/fuzz.sh [--time SECONDS] [TARGET...]
#       Runs each target (default: all) for SECONDS (default 600), one at a
#       time in one process, growing fuzz/corpus/<target>/, then minimises
#       that corpus (cargo fuzz cmin) and prints a table: target, seconds,
#       executions, exec/s, coverage (edges) and features, corpus files and
#       bytes, crashes. A crash stops its target; the input is left in
#       fuzz/artifacts/<target>/ and the script exits 1.
#   FUZZ_LOGS=DIR keeps each target's libFuzzer output as DIR/<target>.log.
#
#   scripts/fuzz.sh --ci [TARGET...]
#       The short run CI does: 20 s per target (--time overrides), new
#       inputs go to a temporary directory (the committed corpus is only
#       read), no minimisation; any crash fails.
#
# Needs the nightly toolchain and cargo-fuzz; installs either when missing
# (rustup toolchain install nightly --profile minimal; cargo install
# --locked cargo-fuzz at the version below). fuzz/Cargo.lock is committed
# and must not change (checked with --locked before building).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(qemu_stream frames acl_json glob dn control_body daemon_toml)

ci=0
secs=""
targets=()
while (($#)); do
    case "$1" in
    --ci) ci=1 ;;
    --time)
        secs="${2:?--time needs SECONDS}"
        shift
        ;;
    --time=*) secs="${1#--time=}" ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "fuzz: unknown option $1 (see scripts/fuzz.sh --help)" >&2
        exit 2
        ;;
    *) targets+=("$1") ;;
    esac
    shift
done
if [ -z "$secs" ]; then
    if ((ci)); then secs=20; else secs=600; fi
fi
if ! [[ "$secs" =~ ^[0-9]+$ ]] || ((secs < 1)); then
    echo "fuzz: --time wants a whole number of seconds, not $secs" >&2
    exit 2
fi
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
        echo "fuzz: no target $t (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

# The toolchain: nightly (libFuzzer's instrumentation and the sanitizer
# need unstable flags).
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
    if ! rustup toolchain install nightly --profile minimal; then
        echo "fuzz: cannot install the nightly Rust toolchain, which cargo-fuzz needs;" \
            "install it with: rustup toolchain install nightly --profile minimal" >&2
        exit 1
    fi
fi
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    if ! cargo +stable install --locked --force cargo-fuzz --version "$CARGO_FUZZ_VERSION"; then
        echo "fuzz: cannot install cargo-fuzz $CARGO_FUZZ_VERSION; install it with:" \
            "cargo install --locked cargo-fuzz --version $CARGO_FUZZ_VERSION" >&2
        exit 1
    fi
fi

(cd fuzz && cargo +nightly metadata --locked --format-version 1 >/dev/null) || {
    echo "fuzz: fuzz/Cargo.lock is out of date; run 'cargo +nightly update -w' in fuzz/ and commit it" >&2
    exit 1
}
echo "fuzz: building the targets (release, debug assertions, address sanitizer)"
(cd fuzz && cargo +nightly fuzz build -O --debug-assertions)
# The binaries run directly from here on: an edit of the sources during a
# long run does not rebuild them under it.
bin="$PWD/fuzz/target/x86_64-unknown-linux-gnu/release"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# libFuzzer's full output per target: FUZZ_LOGS=DIR keeps it.
logs="${FUZZ_LOGS:-$work}"
mkdir -p "$logs"
rows=()
failed=0
for t in "${targets[@]}"; do
    corpus="$PWD/fuzz/corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    if ((ci)); then
        # New inputs go to a scratch directory; the committed corpus seeds.
        mkdir -p "$work/$t"
        dirs=("$work/$t" "$corpus")
    else
        dirs=("$corpus")
    fi
    # Inputs stay small: the sniffer needs at most 4 KiB (SNIFF_MAX) and
    # a little more shows it decides within it; frames are at most 16 KiB.
    case "$t" in
    qemu_stream) max_len=4200 ;;
    frames) max_len=17000 ;;
    *) max_len=4096 ;;
    esac
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log="$logs/$t.log"
    echo "fuzz: $t for ${secs} s"
    start=$(date +%s)
    set +e
    # One process (what -jobs=1 amounts to); crashes land in fuzz/artifacts/<target>/.
    "$bin/$t" "${dirs[@]}" -max_total_time="$secs" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"$log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    after=$(find "fuzz/artifacts/$t" -type f | wc -l)
    crashes=$((after - before))
    if ((rc != 0)) && ((crashes == 0)); then crashes="?"; fi
    if ((rc != 0)); then
        failed=1
        echo "fuzz: $t FAILED (exit $rc); the end of its log:" >&2
        grep -v '^INFO:' "$log" | grep -B2 -A12 -m1 -E 'panicked|ERROR: |SUMMARY' >&2 || tail -30 "$log" >&2
        ls -t "fuzz/artifacts/$t" 2>/dev/null | head -3 | sed "s|^|fuzz: artifact fuzz/artifacts/$t/|" >&2
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    # The last status line: "#N  DONE cov: E ft: F corp: C/Sb ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    if ((!ci)) && ((rc == 0)); then
        echo "fuzz: minimising fuzz/corpus/$t"
        # What cargo fuzz cmin does: merge into an empty directory the
        # inputs that add coverage, then keep only those.
        mkdir -p "$work/$t.min"
        if "$bin/$t" -merge=1 -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
            "$work/$t.min" "$corpus" >"$work/$t.cmin.log" 2>&1; then
            find "$corpus" -type f -delete
            cp "$work/$t.min"/* "$corpus"/
        else
            echo "fuzz: minimising $t failed:" >&2
            tail -20 "$work/$t.cmin.log" >&2
            failed=1
        fi
    fi
    files=$(find "$corpus" -type f | wc -l)
    bytes=$(du -sb "$corpus" | cut -f1)
    rows+=("$(printf '%-13s %7s %12s %8s %8s %8s %7s %9s %7s' "$t" "$took" "${execs:-?}" \
        "${rate:-?}" "${cov:-?}" "${ft:-?}" "$files" "$bytes" "$crashes")")
done

echo
printf '%-13s %7s %12s %8s %8s %8s %7s %9s %7s\n' target seconds executions exec/s \
    coverage features corpus bytes crashes
printf '%s\n' "${rows[@]}"
if ((failed)); then
    echo "fuzz: a target failed; reproduce with: fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/FILE" >&2
    exit 1
fi
