#!/usr/bin/env bash
# Reads GPU telemetry the way the sidecar reports it, next to nvidia-smi at
# the same moment, on a machine with NVIDIA GPUs. Starts a simulated engine
# and a sidecar (no control plane needed: the sidecar keeps retrying it and
# serves metrics meanwhile), optionally loads the GPU with PyTorch if it is
# installed, and prints several paired readings.
#   scripts/gpu-reading.sh [BIN_DIR] [OUT_FILE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/target/release}"
out="${2:-/dev/stdout}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/infermesh-sim-engine" --listen 127.0.0.1:18000 --model gpu-check >"$work/engine.log" 2>&1 &
pids+=($!)
"$bin/infermesh-sidecar" --listen 127.0.0.1:18100 --metrics-listen 127.0.0.1:18190 \
  --engine-url http://127.0.0.1:18000 --endpoint-id gpu-check-0 --pool gpu-check \
  --model gpu-check --region local --control-plane 127.0.0.1:1 >"$work/sidecar.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS 127.0.0.1:18190/metrics 2>/dev/null | grep -q '^infermesh_sidecar_gpu_telemetry_available' && break
  sleep 0.1
done

load=""
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  python3 - <<'PY' &
import time, torch
x = torch.randn(8192, 8192, device="cuda")
end = time.time() + 25
while time.time() < end:
    y = x @ x
    torch.cuda.synchronize()
PY
  pids+=($!)
  load="PyTorch matmul loop on GPU 0"
fi

{
  echo "# GPU telemetry check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# load: ${load:-none (idle GPUs)}"
  nvidia-smi --query-gpu=driver_version,name --format=csv,noheader | head -1 | sed 's/^/# driver, GPU: /'
  grep -m1 -i 'gpu telemetry\|no GPU telemetry' "$work/sidecar.log" | sed 's/^/# sidecar: /' || true
  for i in 1 2 3 4 5; do
    sleep 2
    echo "## reading $i"
    # Both at the same moment: nvidia-smi and the sidecar's last scrape (once a second).
    nvidia-smi --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total \
      --format=csv,noheader,nounits | sed 's/^/nvidia-smi: /'
    curl -fsS 127.0.0.1:18190/metrics | grep -E '^infermesh_sidecar_gpu_' | sed 's/^/sidecar:    /'
  done
} >"$out"
