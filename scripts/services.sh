#!/usr/bin/env bash
# Sets up everything the tests need on this machine, and is idempotent: the system packages
# the Kafka build and tests use, Prometheus for the metrics tests, the brokers on loopback
# (each started only when its port is closed), tansu (a Kafka-protocol broker, built from crates.io once), moto (an SNS/SQS
# server, into .venv) and Google's Pub/Sub emulator. (Pulsar's tests start the repository's own
# test broker, target/debug/pulsar-testbroker, per test.) scripts/test.sh runs it first; run it alone to bring the brokers up.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- services -----------------------------------------------------------------------
# Broker-backed component tests run against the brokers on loopback; start any that is down.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ensure_service() {
  local name=$1 port=$2 start=$3
  port_open "$port" && return 0
  echo "==> $name is down on port $port; starting it"
  bash -c "$start" || true
  for _ in $(seq 1 300); do
    port_open "$port" && return 0
    sleep 0.2
  done
  echo "error: $name did not come up on port $port" >&2
  return 1
}
mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
ensure_service Redis 6379 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'
ensure_service RabbitMQ 5672 'rabbitmq-server -detached'
ensure_service Mosquitto 1883 'mosquitto -d -c /etc/mosquitto/mosquitto.conf'
mkdir -p /var/lib/nats-server 2>/dev/null || true
ensure_service NATS 4222 'start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log'
for tool in redis-server redis-cli rabbitmqctl mosquitto mosquitto_pub mosquitto_sub nats-server openssl fuser; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required for the broker tests" >&2; exit 1; }
done

# pubsub.kafka builds librdkafka from source (rdkafka-sys) against the system OpenSSL; its TLS
# tests put socat in front of tansu (which has no TLS listener). The metrics tests scrape the
# sidecar with a real Prometheus server (started by the tests themselves). buildah builds the
# container image offline (deploy/kubernetes/image-test.sh). daprd-bench drives the sidecar with
# C load generators too (wrk, h2load from nghttp2-client; redis-benchmark comes with Redis).
# pubsub.pulsar's client compiles Pulsar's protocol definition with protoc (protobuf-compiler).
for pkg in libssl-dev socat prometheus patch buildah wrk nghttp2-client protobuf-compiler; do
  if ! dpkg -s "$pkg" >/dev/null 2>&1; then
    echo "==> installing $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >/dev/null
  fi
done

# Kafka-protocol broker for pubsub.kafka: tansu 0.6.0 from crates.io, built once (skipped when
# this build is installed) with scripts/tansu-rejoin.patch
# applied to its group coordinator (the file says why). Tests start private tansu brokers too,
# so it must be on PATH. `dynostore` is its in-memory storage; `libsql` its SQLite storage,
# where the SASL tests keep the SCRAM users across a restart.
export PATH="$HOME/.cargo/bin:$PATH"
tansu_patch="$PWD/scripts/tansu-rejoin.patch"
tansu_mark="$HOME/.cargo/bin/.tansu-0.6.0-$(sha256sum "$tansu_patch" | cut -c1-16)"
if ! command -v tansu >/dev/null || [ ! -e "$tansu_mark" ]; then
  echo "==> building tansu 0.6.0 (Kafka-compatible broker) from crates.io, with $tansu_patch"
  work="${TMPDIR:-/tmp}/daprd-rs-tansu-build"
  rm -rf "$work"
  mkdir -p "$work/fetch/src"
  # the crates' sources, unpacked by cargo into its registry
  printf '[package]\nname = "fetch-tansu"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ntansu = { version = "=0.6.0", features = ["dynostore", "libsql"] }\ntansu-broker = "=0.6.0"\n' \
    >"$work/fetch/Cargo.toml"
  touch "$work/fetch/src/lib.rs"
  (cd "$work/fetch" && cargo fetch --quiet)
  registry="$(dirname "$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-broker-0.6.0 | head -1)")"
  cp -r "$registry/tansu-0.6.0" "$work/tansu"
  cp -r "$registry/tansu-broker-0.6.0" "$work/tansu-broker"
  patch --quiet -p1 -d "$work/tansu-broker" <"$tansu_patch"
  printf '\n[patch.crates-io]\ntansu-broker = { path = "../tansu-broker" }\n' >>"$work/tansu/Cargo.toml"
  # tansu's own Cargo.lock pins every other crate. Optimisation level 1 (for its C parts too)
  # instead of release's 3: a test broker need not be fast, and its build is the longest step
  # of a fresh CI run (at level 3: 19 minutes alone on 2 cores; at level 1: 20 CPU-minutes,
  # 21 minutes beside the sidecar's debug build).
  (cd "$work/tansu" && CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo build --release --quiet --features dynostore,libsql)
  install -m 755 "$work/tansu/target/release/tansu" "$HOME/.cargo/bin/tansu"
  rm -f "$HOME"/.cargo/bin/.tansu-0.6.0-*
  touch "$tansu_mark"
  rm -rf "$work"
  # a shared broker started from an older build goes: the one started below is this build
  pkill -f '^tansu broker --listener-url tcp://127.0.0.1:9092 ' || true
fi
ensure_service "tansu (Kafka)" 9092 'nohup tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ >/tmp/tansu-ci.log 2>&1 &'

# SNS/SQS server for pubsub.aws.snssqs: moto from PyPI, in the test virtualenv.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/python/requirements.txt
ensure_service "moto (SNS/SQS)" 4566 'nohup .venv/bin/moto_server -H 127.0.0.1 -p 4566 >/tmp/moto-ci.log 2>&1 &'
# a second one for the broker fault suite, which scripts/test.sh runs beside the other SDK
# tests, whose SNS/SQS tests reset the first
ensure_service "moto (SNS/SQS, fault suite)" 4567 'nohup .venv/bin/moto_server -H 127.0.0.1 -p 4567 >/tmp/moto-faults-ci.log 2>&1 &'

# Azure Blob Storage for Event Hubs' checkpoints: Microsoft's emulator Azurite from npm (3.35.0:
# later versions need a newer Node.js than Debian's), into .azurite/; each test starts a
# private one (daprd_testkit::azurite).
if [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
  echo "==> installing azurite 3.35.0 (npm)"
  mkdir -p .azurite
  npm install --prefix .azurite --no-audit --no-fund --silent --no-package-lock azurite@3.35.0
fi

# Google Cloud Pub/Sub for pubsub.gcp.pubsub: Google's own Pub/Sub emulator (Debian package
# google-cloud-cli-pubsub-emulator, Java), in memory: each test run uses projects of its own.
emulator=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
if [ ! -x "$emulator" ]; then
  apt-get install -y -qq google-cloud-cli-pubsub-emulator >/dev/null || {
    echo "error: the Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator) is required for the pubsub.gcp.pubsub tests" >&2
    exit 1
  }
fi
ensure_service "Pub/Sub emulator" 8085 "nohup $emulator --host=127.0.0.1 --port=8085 >/tmp/pubsub-emulator-ci.log 2>&1 &"
