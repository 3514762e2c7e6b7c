#!/usr/bin/env bash
# Soak: N back-to-back migrations of one running 64 MiB guest (each into a
# fresh target QEMU) through a long-lived standalone gateway pair and/or a
# long-lived daemon with a one-shot ticket per migration. Prints, per
# migration, its seconds and the miggate processes' RSS (VmRSS, KiB) and
# open descriptors, then the verdict: every migration completed, RSS grew
# by less than 2 MiB and descriptors stayed within ±2 from the 10th
# migration on (the 4th when N < 20). Exit status 0 only if every path passed.
#
#   scripts/soak.sh [--count N] [--via gateways|daemon|both]   (default: 100, both)
set -euo pipefail
cd "$(dirname "$0")/.."

count=100
via=both
usage() { echo "usage: $0 [--count N] [--via gateways|daemon|both]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --count) [ $# -ge 2 ] || usage; count=$2; shift 2 ;;
        --via) [ $# -ge 2 ] || usage; via=$2; shift 2 ;;
        -h|--help) usage ;;
        *) usage ;;
    esac
done
case "$count" in ''|*[!0-9]*|0) echo "--count: expected a positive number, got '$count'" >&2; exit 2 ;; esac
case "$via" in
    gateways) tests=(soak_through_gateway_pair_stays_flat) ;;
    daemon) tests=(soak_through_daemon_with_tickets_stays_flat) ;;
    both) tests=(soak_through_gateway_pair_stays_flat soak_through_daemon_with_tickets_stays_flat) ;;
    *) usage ;;
esac

cargo build --locked -p miggate-cli --tests
failed=()
for t in "${tests[@]}"; do
    # One path at a time, so that its table is not interleaved with another's.
    if ! MIGGATE_SOAK_COUNT=$count cargo test --locked -q -p miggate-cli --test soak -- \
        --exact "$t" --nocapture --test-threads=1; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -eq 0 ]; then
    echo "soak: PASS ($count migrations per path: ${tests[*]})"
else
    echo "soak: FAIL (${failed[*]})"
    exit 1
fi
