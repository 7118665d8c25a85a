#!/usr/bin/env bash
# Every test: the Rust workspace (unit, parity and integration tests), the engine's tests once more
# on the device-generic path, then the end-to-end tests that start the real `candlewick` binary
# and talk to it with the official openai client.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

# The engine's tests again through the device-generic code (attention and matmuls as candle tensor
# operations, what CUDA runs), on CPU in f32: every parity test within the same tolerances.
CANDLEWICK_GENERIC_KERNELS=1 cargo test -p candlewick-engine

# `cargo test` has just built target/debug/candlewick for the CLI tests; the end-to-end tests use
# it unless CANDLEWICK_BIN names another build.
export CANDLEWICK_BIN="${CANDLEWICK_BIN:-$PWD/target/debug/candlewick}"
venv="${CANDLEWICK_E2E_VENV:-$PWD/target/e2e-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
"$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider
