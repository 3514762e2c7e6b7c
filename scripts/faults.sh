#!/usr/bin/env bash
# Faults during a real migration (crates/cli/tests/faults.rs): every
# process of the path killed with SIGKILL at three points, and the path
# between the gateways cut. Runs the test file, then prints the matrix
# "victim x point: survived / failed" and the count. `--qemu 10.0` runs
# the matrix on QEMU 10.0 (scripts/setup.sh unpacks it) instead of the
# system's; other arguments go to the test binary (e.g. a name filter).
# Needs root (network namespaces).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --qemu ]; then
    export MIGGATE_FAULTS_QEMU="${2:?--qemu needs system or 10.0}"
    shift 2
fi
echo "QEMU: ${MIGGATE_FAULTS_QEMU:-system}"
log=$(mktemp -t miggate-faults.XXXXXX)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
# Two test threads: QEMUs, gateways and tests share two cores.
cargo test --locked -p miggate-cli --test faults -- --test-threads=2 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
secs=$(( $(date +%s) - start ))

result() { # test name -> survived | failed | -
    local line
    line=$(grep -E "^test $1 \.\.\. " "$log" | tail -n1)
    case "$line" in
    *" ok") echo survived ;;
    *FAILED) echo failed ;;
    *) echo - ;;
    esac
}

printf '\n%-16s | %-10s | %-10s | %-12s\n' "victim" "handshake" "mid-stream" "switch-over"
printf '%s\n' "-----------------+------------+------------+-------------"
ok=0
tried=0
for victim in source_gateway target_gateway daemon source_qemu target_qemu; do
    row=()
    for point in killed_during_handshake killed_mid_stream killed_at_switchover; do
        r=$(result "${victim}_${point}")
        row+=("$r")
        [ "$r" = survived ] && ok=$((ok + 1))
        [ "$r" != - ] && tried=$((tried + 1))
    done
    printf '%-16s | %-10s | %-10s | %-12s\n' "$victim" "${row[0]}" "${row[1]}" "${row[2]}"
done
r=$(result path_between_gateways_cut_mid_stream)
printf '%-16s | %-10s | %-10s | %-12s\n' "path cut" "" "$r" ""
[ "$r" = survived ] && ok=$((ok + 1))
[ "$r" != - ] && tried=$((tried + 1))
printf '\nsurvived %d of %d in %d s\n' "$ok" "$tried" "$secs"
# Postcopy, outside the count: the target gateway killed mid-postcopy,
# recovered through a restart with its --state-dir (and refused without).
r=$(result postcopy_faults::target_gateway_killed_in_postcopy_recovers_with_its_state_dir)
[ "$r" = survived ] && r="recovered through a restarted gateway with --state-dir"
printf 'postcopy, target gateway killed: %s\n' "$r"
r=$(result postcopy_faults::target_gateway_killed_in_postcopy_without_state_refuses_the_recovery)
[ "$r" = survived ] && r="as documented: recovery refused, nothing reaches the target QEMU"
printf 'postcopy, target gateway killed, no --state-dir: %s\n' "$r"
exit "$status"
