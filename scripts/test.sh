#!/usr/bin/env bash
# The one command that runs every test of daprd-rs:
#   1. Rust unit and integration tests (cargo test --workspace);
#   2. end-to-end tests that start the built `daprd` binary and drive it with the official
#      Python SDK (`dapr`, pytest) and JavaScript SDK (`@dapr/dapr`, node --test);
#   3. the container image's checks (deploy/kubernetes/image-test.sh).
# It installs the test-only Python and npm packages itself (into .venv and
# tests/e2e/js/node_modules), and first runs scripts/services.sh, which installs and starts
# what is missing of the brokers on loopback: Redis, RabbitMQ, Mosquitto, NATS, tansu (Kafka,
# 9092, and the `tansu` command for private brokers), moto (SNS/SQS, 4566) and Google's Pub/Sub
# emulator (8085). Needs: cargo,
# python3 (with venv), node and npm, and the Debian packages of those brokers.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/services.sh

# Every component is built in (feature daprd/full: pubsub.kafka with librdkafka and
# pubsub.aws.snssqs with the AWS SDK), so the tests cover them all.
echo "==> cargo test --workspace --features daprd/full"
cargo build --locked -p daprd --features full
# the test control plane the Kubernetes-mode SDK test runs (target/debug/test-controlplane)
cargo build --locked -p daprd-testkit --features controlplane --bin test-controlplane
# the Pulsar test broker the pubsub.pulsar SDK tests start (target/debug/pulsar-testbroker)
cargo build --locked -p daprd-testkit --features pulsar --bin pulsar-testbroker
cargo build --locked -p daprd-testkit --features servicebus --bin servicebus-testbroker
cargo test --locked --workspace --features daprd/full

echo "==> Python SDK end-to-end tests"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/python/requirements.txt
export DAPRD_BIN="$PWD/target/debug/daprd"
(cd tests/e2e/python && ../../../.venv/bin/python -m pytest -q -p no:cacheprovider)

echo "==> container image: static binary, non-root, empty root, offline image build"
bash deploy/kubernetes/image-test.sh

echo "==> JavaScript SDK end-to-end tests"
(cd tests/e2e/js && npm install --no-audit --no-fund --silent --no-package-lock && npm test)

# The broker matrix: the same SDK suites again with each broker component in place of
# pubsub.in-memory (DAPRD_E2E_PUBSUB). The brokers are those scripts/services.sh started.
# E2E_BROKERS="" skips it; E2E_BROKERS="redis" runs one.
for broker in ${E2E_BROKERS-redis rabbitmq mqtt3 jetstream kafka aws.snssqs gcp.pubsub pulsar azure.servicebus.topics azure.servicebus.queues}; do
  echo "==> SDK end-to-end tests against pubsub.$broker"
  (cd tests/e2e/python && DAPRD_E2E_PUBSUB=$broker ../../../.venv/bin/python -m pytest -q -p no:cacheprovider \
    test_publish_sdk.py test_subscribe.py test_streaming.py)
  (cd tests/e2e/js && DAPRD_E2E_PUBSUB=$broker npm test)
done
