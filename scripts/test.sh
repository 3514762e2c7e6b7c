#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that migrate real
# QEMU guests through real gateways. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --workspace --all-targets
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo fmt --all --check
# Two test threads: QEMUs, gateways and tests share two cores.
cargo test --locked --workspace -- --test-threads=2
# The fuzz targets: the corpus replays in cargo test (fuzz_corpus); here a
# short libFuzzer run of each (scripts/fuzz.sh --ci, 20 s per target).
scripts/fuzz.sh --ci
