#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS (default 20) each, on top of the corpus
# in fuzz/corpus/<target> (kept between runs on one machine, not committed). Needs a nightly
# toolchain (`cargo +nightly`); installs cargo-fuzz from crates.io when it is missing.
# A crash, a timeout or an allocation over 512 MiB fails the run and leaves the input in
# fuzz/artifacts/<target>/.
#   scripts/fuzz.sh [SECONDS]   build the targets (if not built) and run each
#   scripts/fuzz.sh --build     only install cargo-fuzz and build the targets
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-20}
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "error: the fuzz targets need a nightly toolchain (cargo +nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
cargo +nightly fuzz build
if [ "$seconds" = "--build" ]; then
  exit 0
fi
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target"
  if [ -d "seeds/$target" ]; then
    cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
  fi
  echo "--> $target (${seconds} s)"
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|==|SUMMARY|Done)" || true
  if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "error: fuzz target $target found a failing input: fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
