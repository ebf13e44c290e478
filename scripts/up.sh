#!/usr/bin/env bash
# Brings a whole infermesh up on this machine and shows it working:
# etcd, the control plane, an edge for each of two regions, and five
# replicas (simulated vLLM/SGLang engines, each with its sidecar) serving two
# models. A local root CA is made first (.run/pki): the control plane serves
# gRPC over TLS and is the mesh's certificate authority; edges and sidecars
# trade admin-made join tokens for certificates naming them
# (.run/identity/), renewed with no restart, and know each other by them:
# edge -> sidecar runs mutual TLS. The admin API takes an admin certificate
# or an admin token, and the eu-west edge serves HTTPS. Everything is registered through
# grpcurl, then a streamed chat completion goes through an edge. Processes keep running in the background;
# `scripts/up.sh down` stops them. Logs are in .run/logs/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
run="$root/.run"

ETCD_PORT="${ETCD_PORT:-23790}"
CP_PORT="${CP_PORT:-7070}"
EDGE_EU_PORT="${EDGE_EU_PORT:-8080}"
EDGE_US_PORT="${EDGE_US_PORT:-8090}"
# Mesh listeners: where the other region's edge spills over, over mutual TLS.
EDGE_EU_MESH_PORT="${EDGE_EU_MESH_PORT:-8081}"
EDGE_US_MESH_PORT="${EDGE_US_MESH_PORT:-8091}"
PROFILE="${PROFILE:-release}"
# Prometheus endpoints: control plane, edges, then one per sidecar.
CP_METRICS_PORT="${CP_METRICS_PORT:-9100}"

stop_all() {
  if [ -f "$run/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$run/pids"
    sleep 0.5
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done < "$run/pids"
    rm -f "$run/pids"
  fi
}

if [ "${1:-}" = "down" ]; then
  stop_all
  echo "infermesh stopped"
  exit 0
fi

scripts/install-deps.sh
if [ "$PROFILE" = "release" ]; then
  cargo build --release --bins --locked
else
  cargo build --bins --locked
fi
bin="$root/target/$PROFILE"
grpcurl="$root/.tools/bin/grpcurl"
cp_addr="127.0.0.1:$CP_PORT"
pki="$run/pki"
tls=(-cacert "$pki/ca.pem" -cert "$pki/admin.pem" -key "$pki/admin-key.pem")

stop_all
mkdir -p "$run/logs"
rm -rf "$run/etcd"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$ETCD_PORT" $((ETCD_PORT + 10)) "$CP_PORT" "$EDGE_EU_PORT" "$EDGE_US_PORT" "$EDGE_EU_MESH_PORT" "$EDGE_US_MESH_PORT" $(seq 18001 18005) $(seq 18101 18105) \
  $(seq "$CP_METRICS_PORT" $((CP_METRICS_PORT + 7))); do
  if port_busy "$port"; then
    echo "port $port is in use; stop what holds it (or set ETCD_PORT, CP_PORT, EDGE_EU_PORT, EDGE_US_PORT)" >&2
    exit 1
  fi
done

start() {
  local name="$1"
  shift
  "$@" >"$run/logs/$name.log" 2>&1 &
  echo $! >>"$run/pids"
}

wait_for() {
  local what="$1"
  shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "timed out waiting for $what; see $run/logs/" >&2
  exit 1
}

admin() {
  "$grpcurl" "${tls[@]}" -d "$2" "$cp_addr" "infermesh.v1.AdminService/$1" >/dev/null
  echo "  $1 $2"
}

replicas=(llama-8b-eu-west-0 llama-8b-eu-west-1 qwen-7b-eu-west-0 llama-8b-us-east-0 qwen-7b-us-east-0)
echo "making a local root CA, the control plane's certificate and an admin token in $pki"
# Only the root, the control plane's serving certificate and the admin's are
# made here; edges and sidecars get theirs from the control plane (below).
"$bin/infermesh-certs" generate --out "$pki" --force >/dev/null
rm -f "$pki/admin-tokens"
"$bin/infermesh-certs" admin-token --name local-admin --tokens-file "$pki/admin-tokens" >"$run/admin-token"
chmod 600 "$run/admin-token"

echo "starting etcd on 127.0.0.1:$ETCD_PORT"
start etcd etcd --name local --data-dir "$run/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
  --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT + 10))" --log-level warn
wait_for etcd curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

echo "starting the control plane on $cp_addr (gRPC over TLS, client certificates checked; the mesh's CA)"
start control-plane "$bin/infermesh-control-plane" --listen "$cp_addr" \
  --metrics-listen "127.0.0.1:$CP_METRICS_PORT" \
  --etcd-endpoints "http://127.0.0.1:$ETCD_PORT" \
  --tls-cert "$pki/server.pem" --tls-key "$pki/server-key.pem" --tls-client-ca "$pki/ca.pem" \
  --admin-tokens-file "$pki/admin-tokens" --autoscale-interval-ms 1000 \
  --ca-cert "$pki/ca.pem" --ca-key "$pki/ca-key.pem"
wait_for "control plane" sh -c "'$grpcurl' -cacert '$pki/ca.pem' '$cp_addr' grpc.health.v1.Health/Check | grep -q SERVING"

echo "registering regions, models and pools through grpcurl"
admin CreateRegion '{"region":{"name":"eu-west","zones":["eu-west-1a","eu-west-1b"],"failover":["us-east"],"edge_address":"127.0.0.1:'"$EDGE_EU_MESH_PORT"'"}}'
admin CreateRegion '{"region":{"name":"us-east","zones":["us-east-1a"],"failover":["eu-west"],"edge_address":"127.0.0.1:'"$EDGE_US_MESH_PORT"'"}}'
admin CreateModel '{"model":{"name":"meta-llama/Llama-3.1-8B-Instruct","aliases":["llama-8b"],"routing_policy":"LEAST_OUTSTANDING","cache_policy":{"enabled":true,"ttl_seconds":600},"description":"Llama 3.1 8B on vLLM"}}'
admin CreateModel '{"model":{"name":"Qwen/Qwen2.5-7B-Instruct","aliases":["qwen-7b"],"routing_policy":"ROUND_ROBIN","description":"Qwen 2.5 7B on SGLang"}}'
# Autoscaled: 2 waiting requests per replica at most; at night (00:00-08:00
# Paris time) at least 1 replica, otherwise at least 2.
admin CreatePool '{"pool":{"name":"llama-8b-eu-west","model":"meta-llama/Llama-3.1-8B-Instruct","region":"eu-west","engine":"VLLM","min_replicas":2,"max_replicas":8,"scaling_targets":{"waiting_per_replica":2,"kv_cache_usage":0.8},"time_zone":"Europe/Paris","floors":[{"start":"00:00","end":"08:00","min_replicas":1}]}}'
admin CreatePool '{"pool":{"name":"llama-8b-us-east","model":"meta-llama/Llama-3.1-8B-Instruct","region":"us-east","engine":"VLLM","min_replicas":1,"max_replicas":8}}'
admin CreatePool '{"pool":{"name":"qwen-7b-eu-west","model":"Qwen/Qwen2.5-7B-Instruct","region":"eu-west","engine":"SGLANG","min_replicas":1,"max_replicas":4}}'
admin CreatePool '{"pool":{"name":"qwen-7b-us-east","model":"Qwen/Qwen2.5-7B-Instruct","region":"us-east","engine":"SGLANG","min_replicas":1,"max_replicas":4}}'

echo "creating a tenant and an API key (the secret is shown once; etcd keeps its SHA-256)"
admin CreateTenant '{"tenant":{"name":"demo","limits":{"requests_per_minute":600,"tokens_per_minute":200000}}}'
key_json=$("$grpcurl" "${tls[@]}" -d '{"tenant":"demo","name":"local demo","limits":{"requests_per_minute":120}}' \
  "$cp_addr" infermesh.v1.AdminService/CreateApiKey)
KEY=$(printf '%s' "$key_json" | sed -n 's/.*"secret": "\([^"]*\)".*/\1/p')
[ -n "$KEY" ] || { echo "CreateApiKey returned no secret: $key_json" >&2; exit 1; }
printf '%s\n' "$KEY" > "$run/api-key"
chmod 600 "$run/api-key"

echo "making join tokens (stored hashed; each edge and sidecar trades one for its own certificate)"
mkdir -p "$run/tokens"
# join_token FILE REQUEST: writes the secret of a new join token to FILE.
join_token() {
  local out
  out=$("$grpcurl" "${tls[@]}" -d "$2" "$cp_addr" infermesh.v1.IdentityService/CreateJoinToken)
  printf '%s' "$out" | sed -n 's/.*"secret": "\([^"]*\)".*/\1/p' >"$run/tokens/$1"
  chmod 600 "$run/tokens/$1"
  [ -s "$run/tokens/$1" ] || { echo "CreateJoinToken returned no secret: $out" >&2; exit 1; }
  echo "  $1 $2"
}
join_token edge-eu-west '{"role":"edge","region":"eu-west","ttl_seconds":600}'
join_token edge-us-east '{"role":"edge","region":"us-east","ttl_seconds":600}'
join_token llama-8b-eu-west '{"role":"sidecar","region":"eu-west","pool":"llama-8b-eu-west","ttl_seconds":600,"uses":2}'
join_token qwen-7b-eu-west '{"role":"sidecar","region":"eu-west","pool":"qwen-7b-eu-west","ttl_seconds":600}'
join_token llama-8b-us-east '{"role":"sidecar","region":"us-east","pool":"llama-8b-us-east","ttl_seconds":600}'
join_token qwen-7b-us-east '{"role":"sidecar","region":"us-east","pool":"qwen-7b-us-east","ttl_seconds":600}'
rm -rf "$run/identity"

# replica ID POOL MODEL REGION ZONE ENGINE ENGINE_PORT SIDECAR_PORT METRICS_PORT
replica() {
  local id="$1" pool="$2" model="$3" region="$4" zone="$5" engine="$6" eport="$7" sport="$8" mport="$9"
  start "engine-$id" "$bin/infermesh-sim-engine" --listen "127.0.0.1:$eport" --model "$model" \
    --metrics-dialect "$engine" --enable-lora
  start "sidecar-$id" "$bin/infermesh-sidecar" --listen "127.0.0.1:$sport" --metrics-listen "127.0.0.1:$mport" \
    --engine-url "http://127.0.0.1:$eport" --engine "$engine" --endpoint-id "$id" \
    --pool "$pool" --model "$model" --region "$region" --zone "$zone" --control-plane "$cp_addr" \
    --control-plane-ca "$pki/ca.pem" --identity-dir "$run/identity/sidecar-$id" \
    --join-token-file "$run/tokens/$pool"
}
echo "starting five replicas (simulated engine + sidecar each)"
replica llama-8b-eu-west-0 llama-8b-eu-west meta-llama/Llama-3.1-8B-Instruct eu-west eu-west-1a vllm 18001 18101 $((CP_METRICS_PORT + 3))
replica llama-8b-eu-west-1 llama-8b-eu-west meta-llama/Llama-3.1-8B-Instruct eu-west eu-west-1b vllm 18002 18102 $((CP_METRICS_PORT + 4))
replica qwen-7b-eu-west-0 qwen-7b-eu-west Qwen/Qwen2.5-7B-Instruct eu-west eu-west-1a sglang 18003 18103 $((CP_METRICS_PORT + 5))
replica llama-8b-us-east-0 llama-8b-us-east meta-llama/Llama-3.1-8B-Instruct us-east us-east-1a vllm 18004 18104 $((CP_METRICS_PORT + 6))
replica qwen-7b-us-east-0 qwen-7b-us-east Qwen/Qwen2.5-7B-Instruct us-east us-east-1a sglang 18005 18105 $((CP_METRICS_PORT + 7))

edge_tls() {
  edge_flags=(--control-plane "$cp_addr" --control-plane-ca "$pki/ca.pem"
    --identity-dir "$run/identity/edge-$1" --join-token-file "$run/tokens/edge-$1")
}
echo "starting edges: eu-west on https://127.0.0.1:$EDGE_EU_PORT, us-east on http://127.0.0.1:$EDGE_US_PORT"
edge_tls eu-west
start edge-eu-west "$bin/infermesh-edge" --listen "127.0.0.1:$EDGE_EU_PORT" --region eu-west \
  --node-id edge-eu-west-0 --metrics-listen "127.0.0.1:$((CP_METRICS_PORT + 1))" \
  --mesh-listen "127.0.0.1:$EDGE_EU_MESH_PORT" "${edge_flags[@]}" --tls-cert "$pki/server.pem" --tls-key "$pki/server-key.pem"
edge_tls us-east
start edge-us-east "$bin/infermesh-edge" --listen "127.0.0.1:$EDGE_US_PORT" --region us-east \
  --node-id edge-us-east-0 --metrics-listen "127.0.0.1:$((CP_METRICS_PORT + 2))" \
  --mesh-listen "127.0.0.1:$EDGE_US_MESH_PORT" "${edge_flags[@]}"

chat='{"model":"llama-8b","messages":[{"role":"user","content":"Hello, infermesh!"}],"max_tokens":12}'
for url in "https://127.0.0.1:$EDGE_EU_PORT" "http://127.0.0.1:$EDGE_US_PORT"; do
  wait_for "edge $url to route" curl -fsS -o /dev/null --cacert "$pki/ca.pem" \
    -H 'content-type: application/json' -H "authorization: Bearer $KEY" \
    -d "$chat" "$url/v1/chat/completions"
done

echo
echo "== endpoints registered with the control plane =="
"$grpcurl" "${tls[@]}" "$cp_addr" infermesh.v1.AdminService/ListEndpoints \
  | grep -E '"id"|"state"' | paste - - | sed 's/^ *//'
echo
echo "== the autoscaler's decision for llama-8b-eu-west =="
scaling() { "$grpcurl" "${tls[@]}" -d '{"pool":"llama-8b-eu-west"}' "$cp_addr" infermesh.v1.AdminService/GetPoolScaling; }
wait_for "an autoscaling decision" scaling
scaling | grep -E '"(currentReplicas|desiredReplicas|floorReplicas|reason)"' | sed 's/^ *//'
echo
echo "== a streamed chat completion through the eu-west edge (HTTPS, h2) =="
curl -sN --http2 --cacert "$pki/ca.pem" -H 'content-type: application/json' -H "authorization: Bearer $KEY" \
  "https://127.0.0.1:$EDGE_EU_PORT/v1/chat/completions" \
  -d '{"model":"llama-8b","messages":[{"role":"user","content":"Hello, infermesh!"}],"max_tokens":12,"stream":true,"stream_options":{"include_usage":true}}'
echo
cat <<TRY
infermesh is up (logs in .run/logs/, stop with: scripts/up.sh down).
The demo API key is in .run/api-key (tenant "demo", 120 requests/minute); the
admin token is in .run/admin-token; certificates are in .run/pki. Try:

  KEY=\$(cat .run/api-key)
  curl -s --cacert .run/pki/ca.pem https://127.0.0.1:$EDGE_EU_PORT/v1/models -H "authorization: Bearer \$KEY"
  curl -si --cacert .run/pki/ca.pem https://127.0.0.1:$EDGE_EU_PORT/v1/chat/completions -H "authorization: Bearer \$KEY" \\
    -H 'content-type: application/json' -d '{"model":"qwen-7b","messages":[{"role":"user","content":"hi"}]}'
  curl -sN http://127.0.0.1:$EDGE_US_PORT/v1/chat/completions -H "authorization: Bearer \$KEY" \\
    -H 'content-type: application/json' -d '{"model":"llama-8b","messages":[{"role":"user","content":"hi"}],"stream":true}'

  # deterministic requests are cached (llama-8b has a cache policy): miss, then hit
  for i in 1 2; do curl -s -o /dev/null -D - http://127.0.0.1:$EDGE_US_PORT/v1/chat/completions \
    -H "authorization: Bearer \$KEY" -H 'content-type: application/json' \
    -d '{"model":"llama-8b","messages":[{"role":"user","content":"hi"}],"temperature":0}' | grep -i x-infermesh-cache; done

  # admin API with the admin client certificate ...
  .tools/bin/grpcurl -cacert .run/pki/ca.pem -cert .run/pki/admin.pem -key .run/pki/admin-key.pem \\
    $cp_addr infermesh.v1.AdminService/ListModels
  # ... or with the admin bearer token
  .tools/bin/grpcurl -cacert .run/pki/ca.pem -H "authorization: Bearer \$(cat .run/admin-token)" \\
    -d '{"tenant":"demo"}' $cp_addr infermesh.v1.AdminService/ListApiKeys
  # join tokens (secrets are never shown again) and the identity an edge was issued
  .tools/bin/grpcurl -cacert .run/pki/ca.pem -cert .run/pki/admin.pem -key .run/pki/admin-key.pem \\
    $cp_addr infermesh.v1.IdentityService/ListJoinTokens
  openssl x509 -noout -ext subjectAltName,extendedKeyUsage -enddate -in .run/identity/edge-eu-west/identity.pem

  # Prometheus metrics: control plane, edges eu-west and us-east, then the sidecars
  curl -s 127.0.0.1:$CP_METRICS_PORT/metrics | grep '^infermesh_control_plane_subscribers'
  curl -s 127.0.0.1:$((CP_METRICS_PORT + 1))/metrics | grep '^infermesh_edge_requests_total'
  curl -s 127.0.0.1:$((CP_METRICS_PORT + 3))/metrics | grep '^infermesh_sidecar_engine'

  .tools/bin/grpcurl -cacert .run/pki/ca.pem $cp_addr list infermesh.v1.AdminService
  .tools/bin/grpcurl -cacert .run/pki/ca.pem $cp_addr describe infermesh.v1.Pool
TRY
