#!/usr/bin/env bash
# The one command that runs every test of daprd-rs:
#   1. Rust unit and integration tests (cargo test --workspace);
#   2. end-to-end tests that start the built `daprd` binary and drive it with the official
#      Python SDK (`dapr`, pytest) and JavaScript SDK (`@dapr/dapr`, node --test);
#   3. the container image's checks (deploy/kubernetes/image-test.sh).
# It installs the test-only Python and npm packages itself (into .venv and
# tests/e2e/js/node_modules), and first runs scripts/services.sh, which installs and starts
# what is missing of the brokers on loopback: Redis, RabbitMQ, Mosquitto, NATS, tansu (Kafka,
# 9092, and the `tansu` command for private brokers), moto (SNS/SQS, 4566 and 4567) and Google's Pub/Sub
# emulator (8085), and installs Azurite (npm) into .azurite. Needs: cargo,
# python3 (with venv), node and npm, and the Debian packages of those brokers.
set -euo pipefail
cd "$(dirname "$0")/.."
# a phase's heading, with the time of day (UTC), so that a log shows where the time goes
say() { echo "==> [$(date -u +%T)] $*"; }
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/services.sh

# Every component is built in (feature daprd/full: pubsub.kafka with librdkafka and
# pubsub.aws.snssqs with the AWS SDK), so the tests cover them all.
say "cargo test --workspace --features daprd/full"
cargo build --locked -p daprd --features full
# the test control plane the Kubernetes-mode SDK test runs (target/debug/test-controlplane)
cargo build --locked -p daprd-testkit --features controlplane --bin test-controlplane
# the Pulsar test broker the pubsub.pulsar SDK tests start (target/debug/pulsar-testbroker)
cargo build --locked -p daprd-testkit --features pulsar --bin pulsar-testbroker
cargo build --locked -p daprd-testkit --features servicebus --bin servicebus-testbroker
cargo test --locked --workspace --features daprd/full

# Runs commands side by side: side_by_side NAME COMMAND [NAME COMMAND ...]; each line of a
# command's output is prefixed with [NAME]; fails when any of them failed. The end-to-end suites
# wait on brokers and timers more than they compute, so two of them side by side take about
# the time of the longer one.
side_by_side() {
  local pids=() failed=0
  while [ $# -gt 0 ]; do
    (set -o pipefail; eval "$2" 2>&1 | sed -u "s/^/[$1] /") &
    pids+=($!)
    shift 2
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  return "$failed"
}

say "Python SDK end-to-end tests: the broker fault suite beside the rest"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/python/requirements.txt
export DAPRD_BIN="$PWD/target/debug/daprd"
pytest_e2e() { (cd tests/e2e/python && ../../../.venv/bin/python -m pytest -q -p no:cacheprovider "$@"); }
# The fault suite talks to the second moto server (scripts/services.sh), as the SNS/SQS tests
# of the other lane reset theirs. Two of test_faults.py's slowest rows (a subscriber SIGKILLed
# on GCP Pub/Sub and on Event Hubs: about a minute each, waiting for redelivery) run in the
# fault lane, which is shorter by minutes. --durations: the slowest tests, where a lane's time
# goes.
moved="test_subscriber_sigkill_loses_nothing and (gcp or eventhubs)"
side_by_side \
  python "pytest_e2e --durations=15 --ignore=test_broker_faults.py -k 'not ($moved)'" \
  faults "SNSSQS_ENDPOINT=http://127.0.0.1:4567 pytest_e2e --durations=15 test_broker_faults.py test_faults.py -k 'test_broker_faults or ($moved)'" ||
  { echo "error: the Python SDK end-to-end tests failed (lines marked FAILED above)" >&2; exit 1; }

say "container image: static binary, non-root, empty root, offline image build"
bash deploy/kubernetes/image-test.sh

say "JavaScript SDK end-to-end tests"
(cd tests/e2e/js && npm install --no-audit --no-fund --silent --no-package-lock && npm test)

# The broker matrix: the same SDK suites again with each broker component in place of
# pubsub.in-memory (DAPRD_E2E_PUBSUB). The brokers are those scripts/services.sh started.
# E2E_BROKERS="" skips it; E2E_BROKERS="redis" runs one. They run in two lanes side by side,
# every other broker of the list in each (no broker is in both, and each test has its own slice
# of its broker).
matrix_lane() {
  for broker in "$@"; do
    say "SDK end-to-end tests against pubsub.$broker"
    DAPRD_E2E_PUBSUB=$broker pytest_e2e test_publish_sdk.py test_subscribe.py test_streaming.py
    (cd tests/e2e/js && DAPRD_E2E_PUBSUB=$broker npm test)
  done
}
read -r -a brokers <<<"${E2E_BROKERS-redis rabbitmq mqtt3 jetstream kafka aws.snssqs gcp.pubsub pulsar azure.servicebus.topics azure.servicebus.queues azure.eventhubs}"
lanes=("" "")
for i in "${!brokers[@]}"; do
  lanes[i % 2]+=" ${brokers[i]}"
done
side_by_side "matrix 1" "matrix_lane ${lanes[0]}" "matrix 2" "matrix_lane ${lanes[1]}" ||
  { echo "error: the broker matrix failed (lines marked FAILED or not ok above)" >&2; exit 1; }
