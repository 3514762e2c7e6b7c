#!/usr/bin/env bash
# The README's first command: a complete secure migration of a running
# guest between two local QEMUs (a PKI, two QEMUs, a miggate daemon, then
# `miggate migrate` with its progress bar). Installs what it needs first.
# Extra arguments go to `miggate demo` (e.g. --multifd 2, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --qemu10-optional
cargo build --release --locked --quiet
exec target/release/miggate demo "$@"
