#!/usr/bin/env bash
# The README's first command: a complete secure migration of a running
# guest between two local QEMUs (a PKI, two QEMUs, a miggate daemon, then
# `miggate migrate` with its progress bar). Installs what it needs first.
# Extra arguments go to `miggate demo` (e.g. --multifd 2, --keep,
# --qemu 10.0). Only with --qemu 10.0 must QEMU 10.0 be installable: by
# default the demo runs on the system's QEMU and a QEMU 10.0 that cannot
# be installed is a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=--qemu10-optional
prev=
for a in "$@"; do
    if [ "$a" = --qemu=10.0 ] || { [ "$prev" = --qemu ] && [ "$a" = 10.0 ]; }; then
        setup=
    fi
    prev=$a
done
scripts/setup.sh ${setup:+"$setup"}
cargo build --release --locked --quiet
exec target/release/miggate demo "$@"
