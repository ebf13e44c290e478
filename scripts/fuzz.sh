#!/usr/bin/env bash
# Fuzzes the edge's request parser with cargo-fuzz (libFuzzer) for a
# bounded time: `scripts/fuzz.sh [seconds]` (default 60). Installs
# cargo-fuzz into .tools if missing. cargo-fuzz needs nightly features;
# RUSTC_BOOTSTRAP lets the installed stable toolchain provide them.
# The corpus grows under edge/fuzz/corpus (not checked in), seeded from
# edge/fuzz/seeds; a crash leaves its input under edge/fuzz/artifacts and
# fails the run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-60}"
CARGO_FUZZ_VERSION="0.13.2"

if [ ! -x "$root/.tools/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into .tools" >&2
  cargo install --quiet --locked --root "$root/.tools" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export PATH="$root/.tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1

cd "$root/edge/fuzz"
mkdir -p corpus/request_parser
for target in request_parser; do
  echo "fuzzing $target for ${seconds}s" >&2
  cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
