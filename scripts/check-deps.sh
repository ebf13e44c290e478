#!/usr/bin/env bash
# Checks the workspace's dependencies: none declared and unused
# (cargo-machete), and every crate in the tree under an allowed license
# with no wildcard version (cargo-deny, configured by deny.toml; bans and
# licenses only, as advisories need the RustSec database from the network).
# Installs both tools, pinned, into .tools if missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARGO_MACHETE_VERSION="0.9.2"
CARGO_DENY_VERSION="0.20.2"

install_tool() {
  local crate="$1" version="$2"
  if ! "$root/.tools/bin/$crate" --version 2>/dev/null | grep -qxE "($crate )?$version"; then
    echo "installing $crate $version into .tools" >&2
    cargo install --quiet --locked --root "$root/.tools" "$crate" --version "$version"
  fi
}
install_tool cargo-machete "$CARGO_MACHETE_VERSION"
install_tool cargo-deny "$CARGO_DENY_VERSION"
export PATH="$root/.tools/bin:$PATH"

cd "$root"
cargo machete
cargo deny --locked check bans licenses
