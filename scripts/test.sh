#!/usr/bin/env bash
# The whole test suite: installs the real NBD clients the tests drive (if missing), then
# formatting, lints, and every test of the workspace (unit, model-based, crash simulation, real
# NBD clients). Long soak runs are ignored tests: see README, "Soak runs".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
