#!/usr/bin/env bash
# The one command that runs every test of daprd-rs:
#   1. Rust unit and integration tests (cargo test --workspace);
#   2. end-to-end tests that start the built `daprd` binary and drive it with the official
#      Python SDK (`dapr`, pytest) and JavaScript SDK (`@dapr/dapr`, node --test).
# It installs the test-only Python and npm packages itself (into .venv and
# tests/e2e/js/node_modules). Needs: cargo, python3 (with venv), node and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo test --workspace"
cargo build --locked -p daprd
cargo test --locked --workspace

echo "==> Python SDK end-to-end tests"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/python/requirements.txt
export DAPRD_BIN="$PWD/target/debug/daprd"
(cd tests/e2e/python && ../../../.venv/bin/python -m pytest -q -p no:cacheprovider)

echo "==> JavaScript SDK end-to-end tests"
(cd tests/e2e/js && npm install --no-audit --no-fund --silent --no-package-lock && npm test)
