#!/usr/bin/env bash
# Runs every check and test of infermesh on a fresh machine: installs what
# the tests need (protoc, etcd, grpcurl, promtool), checks the alerting
# rules (promtool unit tests) and the dashboard, lints and renders the Helm
# chart and validates its manifests (kubernetes-validate, which the webhook
# test also uses), checks the shape of the sources (file and function
# length, import cycles between modules), checks formatting and lints,
# checks the dependencies (none unused, licenses allowed: cargo-machete and
# cargo-deny, installed into .tools), builds the binaries the whole-system
# tests start, runs all tests, runs every shell block of the README and
# docs/ against a live local system (scripts/check-docs.py), then fuzzes
# the edge's request parser for a bounded time (cargo-fuzz).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-deps.sh
export PATH="$root/.tools/bin:$PATH"

scripts/check-monitoring.sh
scripts/check-helm.sh
scripts/check-structure.py
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/check-deps.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked
scripts/check-docs.py
scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
