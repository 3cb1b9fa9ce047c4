#!/usr/bin/env bash
# Sidecar CPU per publish with a light load generator (wrk: C, one thread, 16 connections),
# so the figure is not inflated by the harness competing for the two cores.
#   bash scripts/bench-wrk.sh [DAPRD_BINARY]     (needs wrk: apt-get install wrk; Redis on 6379)
# Prints, per route: requests/s and the sidecar's CPU time per request from /proc/<pid>/stat.
set -euo pipefail
bin=${1:-target/release/daprd}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/c.yaml" <<'YAML'
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: redis}
spec: {type: pubsub.redis, version: v1, metadata: [{name: redisHost, value: "127.0.0.1:6379"}, {name: maxLenApprox, value: "10000"}]}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: memory}
spec: {type: pubsub.in-memory, version: v1, metadata: []}
YAML
body=$(python3 -c 'import json; print(json.dumps(json.dumps({"orderId": 1, "pad": "x" * 1000})))')
printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' "$body" > "$dir/post.lua"
port=3799
"$bin" --app-id bench --resources-path "$dir" --dapr-http-port $port --dapr-grpc-port $((port + 1)) \
  --log-level error > /dev/null 2>&1 &
pid=$!
for _ in $(seq 100); do
  curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1.0/healthz/outbound" 2>/dev/null | grep -q 204 && break
  sleep 0.05
done
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
for route in "redis/orders" "redis/orders?metadata.rawPayload=true" "memory/orders"; do
  t0=$(ticks)
  out=$(wrk -t1 -c16 -d5s -s "$dir/post.lua" "http://127.0.0.1:$port/v1.0/publish/$route")
  t1=$(ticks)
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  bad=$(echo "$out" | grep -c 'Non-2xx' || true)
  echo "$route: ${rps} req/s, sidecar CPU $(python3 -c "print(round(($t1 - $t0) * 10000 / $n, 1))") µs/request (non-2xx lines: $bad)"
done
