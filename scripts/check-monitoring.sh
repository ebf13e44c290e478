#!/usr/bin/env bash
# Checks infermesh's monitoring assets, which live once in the Helm chart:
#   helm/infermesh/files/alerts.yaml   - promtool check rules
#   monitoring/alerts.test.yaml        - promtool test rules (unit tests of every alert)
#   helm/infermesh/files/dashboard.json - valid JSON (python3 -m json.tool)
# Needs promtool (Debian's prometheus package; scripts/install-deps.sh installs it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

rules=helm/infermesh/files/alerts.yaml
tests=monitoring/alerts.test.yaml
dashboard=helm/infermesh/files/dashboard.json

fail() {
  echo "check-monitoring: FAILED: $*" >&2
  exit 1
}

command -v promtool >/dev/null 2>&1 \
  || fail "promtool not found; run scripts/install-deps.sh (Debian package prometheus)"

echo "== promtool check rules $rules" >&2
promtool check rules "$rules" || fail "promtool check rules $rules"

echo "== promtool test rules $tests" >&2
promtool test rules "$tests" || fail "promtool test rules $tests"

echo "== python3 -m json.tool $dashboard" >&2
python3 -m json.tool "$dashboard" >/dev/null || fail "$dashboard is not valid JSON"

echo "check-monitoring: OK" >&2
