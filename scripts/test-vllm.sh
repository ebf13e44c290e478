#!/usr/bin/env bash
# Runs the system tests that matter against real vLLM instead of the
# simulated engine (integration-tests/tests/vllm.rs): the OpenAI SDK's
# streams and usage, the sidecar reading vLLM's metrics, prefix routing,
# a client disconnect aborting the request in vLLM, a sidecar draining, and
# a LoRA adapter (scripts/vllm/make-tiny-lora.py) loaded through the sidecar
# on its first request.
# Installs vLLM's CPU build into .tools/vllm-venv (about 6 GB, once), builds
# a tiny random-weight Llama into .tools/vllm/tiny-llama, starts two vLLM
# engines on free ports (about a minute each on two cores), runs the tests
# and stops the engines. Not part of scripts/test.sh: the install is large.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
MODEL_NAME="infermesh/tiny-llama"
ENGINES="${VLLM_ENGINES:-2}"

scripts/install-deps.sh
export PATH="$root/.tools/bin:$PATH"
scripts/vllm/install.sh
venv="${VLLM_VENV:-$root/.tools/vllm-venv}"
model_dir="$root/.tools/vllm/tiny-llama"
if [ ! -f "$model_dir/config.json" ]; then
  "$venv/bin/python" scripts/vllm/make-tiny-llama.py "$model_dir"
fi
lora_dir="$root/.tools/vllm/tiny-lora"
if [ ! -f "$lora_dir/adapter_config.json" ]; then
  "$venv/bin/python" scripts/vllm/make-tiny-lora.py "$model_dir" "$lora_dir"
fi
cargo build --workspace --bins --locked

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
urls=()
for i in $(seq 1 "$ENGINES"); do
  port="$(free_port)"
  # Prefix caching on (vLLM's default), a small KV cache, float32 on CPU;
  # LoRA adapters loadable at run time (the sidecar loads them).
  VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$model_dir" --served-model-name "$MODEL_NAME" --host 127.0.0.1 --port "$port" \
    --max-model-len 2048 --dtype float32 --enable-prefix-caching \
    --enable-lora --max-lora-rank 8 --max-loras 2 \
    >"$work/vllm-$i.log" 2>&1 &
  pids+=("$!")
  urls+=("http://127.0.0.1:$port")
done
echo "starting $ENGINES vLLM engines: ${urls[*]}" >&2
for i in "${!urls[@]}"; do
  for _ in $(seq 1 600); do
    if curl -fsS "${urls[$i]}/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      tail -30 "$work/vllm-$((i + 1)).log" >&2
      echo "vLLM engine $((i + 1)) exited" >&2
      exit 1
    fi
    sleep 0.5
  done
  curl -fsS "${urls[$i]}/health" >/dev/null || { echo "vLLM ${urls[$i]} not ready after 300 s" >&2; exit 1; }
done
"$venv/bin/python" -c 'import vllm; print("vLLM", vllm.__version__, "ready")'

INFERMESH_VLLM_URLS="$(IFS=,; echo "${urls[*]}")" INFERMESH_VLLM_MODEL="$MODEL_NAME" \
  INFERMESH_VLLM_LORA="$lora_dir" \
  cargo test -p infermesh-integration-tests --test vllm --locked -- --ignored --test-threads=1 --nocapture
