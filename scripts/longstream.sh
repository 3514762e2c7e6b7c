#!/usr/bin/env bash
# Long streams with TLS 1.3 key updates (README: "Long streams and key
# updates"), in a release build:
#   scripts/longstream.sh [--gib N] [--back-gib N] [--rekey-after-mib M]
#       N GiB (default 64) from a generator through a source and a target
#       gateway into a sink, and --back-gib (default: a quarter) back from
#       the sink, both gateways rekeying every M MiB they send (default 64,
#       at most one update per 250 ms); SHA-256 on both ends of both ways.
#   scripts/longstream.sh --native-gib N [--rekey-after-mib M]
#       N GiB (e.g. 16) of a running guest's migration through a source
#       gateway into a target QEMU with its own TLS (GnuTLS), rekeying.
# Prints GiB, seconds, GiB/s, the key updates each way and the hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
test_name=full_size_long_stream
while (($#)); do
    case "$1" in
        --gib) export LONGSTREAM_GIB="${2:?--gib N}"; shift 2 ;;
        --back-gib) export LONGSTREAM_BACK_GIB="${2:?--back-gib N}"; shift 2 ;;
        --rekey-after-mib) export LONGSTREAM_REKEY_MIB="${2:?--rekey-after-mib M}"; shift 2 ;;
        --native-gib)
            export LONGSTREAM_NATIVE_GIB="${2:?--native-gib N}"
            test_name=full_size_native_tls_migration
            shift 2 ;;
        -h|--help) usage ;;
        *) echo "longstream: unknown argument $1" >&2; usage ;;
    esac
done
for v in LONGSTREAM_GIB LONGSTREAM_BACK_GIB LONGSTREAM_REKEY_MIB LONGSTREAM_NATIVE_GIB; do
    case "${!v:-1}" in
        ''|*[!0-9]*|0) echo "longstream: ${v} must be a whole number above 0" >&2; exit 2 ;;
    esac
done
# The full sizes are ignored tests of crates/cli/tests/long_stream.rs.
exec cargo test --release --locked -p miggate-cli --test long_stream -- \
    --ignored --exact "$test_name" --nocapture --test-threads=1
