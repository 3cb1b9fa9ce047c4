#!/usr/bin/env bash
# Proves what can be proven of the container image without a Docker engine or a registry:
#  1. daprd links statically (glibc with crt-static) — the build the Dockerfile makes, here
#     with the in-memory and Redis components only, to keep the test's build short;
#  2. it runs as a non-root user (65532) in a directory holding nothing but the binary,
#     /etc/hosts (which Kubernetes mounts) and a resources directory: it resolves
#     `localhost`, serves, and a publish reaches Redis;
#  3. with buildah (Debian's, offline: the image is FROM scratch), the image of
#     Containerfile.test builds, runs `/daprd --version` as user 65532, has no shell, and
#     its size is printed.
# Needs Redis on 127.0.0.1:6379 (scripts/services.sh) and root (for chroot).
set -euo pipefail
cd "$(dirname "$0")/../.."

target=x86_64-unknown-linux-gnu
echo "==> static daprd (crt-static, in-memory + redis)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked -q -p daprd \
  --no-default-features --features in-memory,redis --target "$target"
bin="target/$target/debug/daprd"
if ldd "$bin" 2>&1 | grep -q "=>"; then
  echo "error: $bin links shared libraries:" >&2
  ldd "$bin" >&2
  exit 1
fi

root=$(mktemp -d)
log=$(mktemp)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$root" "$log"
}
trap cleanup EXIT
mkdir -p "$root/etc" "$root/res"
cp "$bin" "$root/daprd"
printf '127.0.0.1 localhost\n' > "$root/etc/hosts"
topic="image-test-$$-$RANDOM"
cat > "$root/res/redis.yaml" <<YAML
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: redis}
spec:
  type: pubsub.redis
  version: v1
  metadata: [{name: redisHost, value: "localhost:6379"}, {name: redisDB, value: "4"}]
YAML
chmod -R a+rX "$root"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(port); grpc=$(port); metrics=$(port)

echo "==> the static binary as user 65532 in an otherwise empty root"
chroot --userspec=65532:65532 "$root" /daprd --app-id image-test --dapr-http-port "$http" \
  --dapr-grpc-port "$grpc" --dapr-listen-addresses 127.0.0.1 --metrics-port "$metrics" \
  --metrics-listen-address 127.0.0.1 --resources-path /res >"$log" 2>&1 &
pid=$!
deadline=$((SECONDS + 20))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http/v1.0/healthz/outbound")" = 204 ]; do
  if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
    echo "error: daprd did not start in the empty root:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
uid=$(awk '/^Uid:/ {print $3}' "/proc/$pid/status")
[ "$uid" = 65532 ] || { echo "error: daprd runs as uid $uid, not 65532" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
  -d '{"n":1}' "http://127.0.0.1:$http/v1.0/publish/redis/$topic")
[ "$code" = 204 ] || { echo "error: publish answered $code" >&2; cat "$log" >&2; exit 1; }
len=$(redis-cli -n 4 XLEN "$topic")
redis-cli -n 4 DEL "$topic" >/dev/null
[ "$len" = 1 ] || { echo "error: Redis stream $topic holds $len entries, not 1" >&2; exit 1; }
kill "$pid"
wait "$pid" || true
pid=
echo "ok: static, uid 65532, nothing but /daprd and /etc/hosts, publish reached Redis"

if ! command -v buildah >/dev/null; then
  echo "buildah is not installed: the image build is skipped (scripts/services.sh installs it)"
  exit 0
fi
echo "==> the image, built offline with buildah"
ctx=$(mktemp -d)
store=$(mktemp -d)
trap 'cleanup; rm -rf "$ctx" "$store"' EXIT
cp "$bin" "$ctx/daprd"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
bah() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }
bah build -q --isolation chroot -t daprd-rs:image-test -f deploy/kubernetes/Containerfile.test "$ctx" >/dev/null
user=$(bah inspect --format '{{.OCIv1.Config.User}}' daprd-rs:image-test)
[ "$user" = 65532:65532 ] || { echo "error: the image's user is $user" >&2; exit 1; }
ctr=$(bah from -q daprd-rs:image-test)
version=$(bah run --isolation chroot "$ctr" -- /daprd --version)
case "$version" in 1.18.3+daprd-rs.*) ;; *) echo "error: /daprd --version said $version" >&2; exit 1;; esac
if bah run --isolation chroot "$ctr" -- /bin/sh -c true 2>/dev/null; then
  echo "error: the image has a shell" >&2
  exit 1
fi
bah rm "$ctr" >/dev/null
size=$(bah images --format '{{.Size}}' daprd-rs:image-test)
echo "ok: image daprd-rs:image-test ($size, debug build of two components) runs /daprd as 65532, has no shell"
