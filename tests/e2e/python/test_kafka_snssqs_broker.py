"""pubsub.kafka and pubsub.aws.snssqs seen from the broker: what the sidecar writes is read
back with independent clients (kafka-python, boto3), what those clients write reaches the app
with the broker's metadata, offsets are committed only after the app's answer, and a poison
message with a dead-letter topic does not block its partition (contrib#3529).

Kafka runs on a private tansu broker per test; SNS/SQS on the moto server (.ci/run starts it)."""

import json
import time
import uuid

import pytest
import requests

from conftest import SNSSQS_ENDPOINT, eventually, received, start_tansu

KAFKA_COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.kafka
  version: v1
  metadata:
  - {{name: brokers, value: "127.0.0.1:{port}"}}
  - {{name: authType, value: none}}
  - {{name: initialOffset, value: oldest}}
  - {{name: autoCreateTopics, value: "true"}}
  - {{name: autoCreateTopicPartitions, value: "{partitions}"}}
  - {{name: backOffDuration, value: 300ms}}
"""

SNSSQS_COMPONENT = f"""apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.aws.snssqs
  version: v1
  metadata:
  - {{name: endpoint, value: "{SNSSQS_ENDPOINT}"}}
  - {{name: region, value: us-east-1}}
  - {{name: accessKey, value: test}}
  - {{name: secretKey, value: test}}
  - {{name: messageVisibilityTimeout, value: "2"}}
"""


def lower_headers(record):
    return {k.lower(): v for k, v in record["headers"].items()}


def sarama_partition(key: bytes, partitions: int) -> int:
    """sarama's hash partitioner: FNV-1a 32 of the key, as a signed int, modulo, absolute."""
    h = 0x811C9DC5
    for b in key:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    if h >= 2**31:
        h -= 2**32
    return abs(h) % partitions


@pytest.fixture
def tansu():
    t = start_tansu()
    yield t
    t.stop()


def kafka_topic(port, name, partitions):
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def kafka_records(port, topic, count, timeout=15):
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=f"127.0.0.1:{port}", auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000)
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            got.extend(c)
    finally:
        c.close()
    return got


def test_kafka_publish_writes_go_daprd_bytes(sidecar_factory, tansu):
    s = sidecar_factory([KAFKA_COMPONENT.format(port=tansu.port, partitions=3)])
    r = requests.post(s.http + "/v1.0/publish/pubsub/orders?metadata.partitionKey=customer-42"
                      "&metadata.note=hello", json={"orderId": 1})
    assert r.status_code == 204, r.text
    r = requests.post(s.http + "/v1.0/publish/pubsub/orders?metadata.partitionNumber=0"
                      "&metadata.rawPayload=true", data=b"raw-bytes",
                      headers={"content-type": "application/octet-stream"})
    assert r.status_code == 204, r.text
    records = kafka_records(tansu.port, "orders", 2)
    assert len(records) == 2, records
    keyed = next(x for x in records if x.key is not None)
    raw = next(x for x in records if x.key is None)
    # the record value is the CloudEvent envelope; the key is partitionKey, hashed as sarama does
    event = json.loads(keyed.value)
    assert event["data"] == {"orderId": 1} and event["topic"] == "orders"
    assert event["source"] == "checkout" and event["pubsubname"] == "pubsub"
    assert event["type"] == "com.dapr.event.sent" and event["specversion"] == "1.0"
    assert keyed.key == b"customer-42"
    assert keyed.partition == sarama_partition(b"customer-42", 3)
    headers = dict(keyed.headers)
    assert headers["partitionKey"] == b"customer-42" and headers["note"] == b"hello", headers
    # rawPayload: the bytes as sent; partitionNumber picks the partition
    assert raw.value == b"raw-bytes" and raw.partition == 0
    assert dict(raw.headers)["rawPayload"] == b"true"
    r = requests.post(s.http + "/v1.0/publish/pubsub/orders?metadata.partitionNumber=-1", json={})
    assert r.status_code == 500 and r.json()["errorCode"] == "ERR_PUBSUB_PUBLISH_MESSAGE", r.text
    assert "partitionNumber" in r.json()["message"]


def test_kafka_records_reach_the_app_with_their_metadata(sidecar_factory, app_factory, tansu):
    from kafka import KafkaProducer

    kafka_topic(tansu.port, "inbound", 1)
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "inbound", "route": "/in"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([KAFKA_COMPONENT.format(port=tansu.port, partitions=1)], app_port=app.port)
    s.wait_ready()
    event = {"specversion": "1.0", "id": "e-1", "source": "elsewhere", "type": "t",
             "datacontenttype": "application/json", "data": {"n": 1}}
    p = KafkaProducer(bootstrap_servers=f"127.0.0.1:{tansu.port}")
    p.send("inbound", json.dumps(event).encode(), key=b"k9", headers=[("trace-note", b"abc")],
           timestamp_ms=1700000000123).get(timeout=10)
    p.close()
    got = eventually(lambda: received(app.port, "/in"), 15, "the record at the app")
    assert json.loads(got[0]["body"]) == event
    h = lower_headers(got[0])
    assert h["__key"] == "k9" and h["__topic"] == "inbound" and h["__partition"] == "0"
    assert h["__offset"] == "0" and h["__timestamp"] == "1700000000123"
    assert h["trace-note"] == "abc"


WORK_SUBSCRIPTION = json.dumps([{"pubsubname": "pubsub", "topic": "work", "route": "/work"}])


def m1_accepted_m2_retried(sidecar_factory, app_factory, comp, extra_args=()):
    """The sidecar of an app that accepted m1 and refuses m2, which is retried in place."""
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": WORK_SUBSCRIPTION})
    s = sidecar_factory([comp], app_port=app.port, extra_args=extra_args)
    s.wait_ready()
    s.publish("work", '{"m":1}')
    eventually(lambda: received(app.port, "/work"), 15, "m1")
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/work": {"status": 500}}).raise_for_status()
    s.publish("work", '{"m":2}')
    eventually(lambda: len(received(app.port, "/work")) >= 3, 15, "m2 retried in place")
    return s


def test_kafka_commits_only_after_success(sidecar_factory, app_factory, tansu):
    """m1 is accepted, m2 is refused (retried in place): a second sidecar of the same app
    (same consumer group) starts at m2, not at m1 and not after m2."""
    comp = KAFKA_COMPONENT.format(port=tansu.port, partitions=1)
    s = m1_accepted_m2_retried(sidecar_factory, app_factory, comp)
    s.stop()
    app2 = app_factory("http_app.py", env={"SUBSCRIPTIONS": WORK_SUBSCRIPTION})
    s2 = sidecar_factory([comp], app_port=app2.port)
    s2.wait_ready()
    got = eventually(lambda: received(app2.port, "/work"), 20, "redelivery to the new sidecar")
    assert json.loads(got[0]["body"])["data"] == {"m": 2}, "m1 was committed, m2 was not"
    s2.publish("work", '{"m":3}')
    eventually(lambda: len(received(app2.port, "/work")) == 2, 15, "m3 after m2")
    ms = [json.loads(r["body"])["data"]["m"] for r in received(app2.port, "/work")]
    assert ms == [2, 3], ms


def test_kafka_sidecar_exits_within_its_grace_period_with_the_broker_gone(
        sidecar_factory, app_factory, tansu):
    """SIGTERM while a refused message is retried and the broker is gone: the sidecar exits
    within its grace period (1 s here) for the drain plus as much for closing the components,
    as Go daprd does; it does not wait for the Kafka consumer's close, which waits for a group
    coordinator as long as the broker stays away."""
    s = m1_accepted_m2_retried(sidecar_factory, app_factory,
                               KAFKA_COMPONENT.format(port=tansu.port, partitions=1),
                               extra_args=["--dapr-graceful-shutdown-seconds", "1"])
    tansu.stop()
    s.proc.terminate()
    exited = eventually(lambda: s.proc.poll() is not None, 6, "the sidecar's exit after SIGTERM")
    assert exited and s.proc.returncode == 0, s.output()[-3000:]


def test_kafka_poison_message_goes_to_the_dead_letter_topic_and_unblocks(
        sidecar_factory, app_factory, tansu):
    rules = {"rules": [{"match": 'event.data.kind == "poison"', "path": "/poison"}], "default": "/ok"}
    subs = json.dumps([
        {"pubsubname": "pubsub", "topic": "jobs", "routes": rules, "deadLetterTopic": "jobs-dlq"},
        {"pubsubname": "pubsub", "topic": "jobs-dlq", "route": "/dlq"},
    ])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/poison": {"status": 500}}).raise_for_status()
    s = sidecar_factory([KAFKA_COMPONENT.format(port=tansu.port, partitions=1)], app_port=app.port)
    s.wait_ready()
    s.publish("jobs", json.dumps({"kind": "poison"}))
    s.publish("jobs", json.dumps({"kind": "good"}))
    eventually(lambda: received(app.port, "/ok"), 15, "the message behind the poison one")
    dead = eventually(lambda: received(app.port, "/dlq"), 15, "the poison message in the DLT")
    assert json.loads(dead[0]["body"])["data"] == {"kind": "poison"}


def test_kafka_poison_message_without_dead_letter_topic_is_retried_in_place(
        sidecar_factory, app_factory, tansu):
    """As Go daprd with consumeRetryEnabled (the default): the partition waits for it."""
    rules = {"rules": [{"match": 'event.data.kind == "poison"', "path": "/poison"}], "default": "/ok"}
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "jobs", "routes": rules}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/poison": {"status": 500}}).raise_for_status()
    s = sidecar_factory([KAFKA_COMPONENT.format(port=tansu.port, partitions=1)], app_port=app.port)
    s.wait_ready()
    s.publish("jobs", json.dumps({"kind": "poison"}))
    s.publish("jobs", json.dumps({"kind": "good"}))
    eventually(lambda: len(received(app.port, "/poison")) >= 4, 15, "the poison message retried")
    assert received(app.port, "/ok") == [], "nothing passes the failing message in its partition"
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/poison": {"status": 200}}).raise_for_status()
    eventually(lambda: received(app.port, "/ok"), 15, "the next message once the first succeeds")


@pytest.fixture
def moto():
    requests.post(SNSSQS_ENDPOINT + "/moto-api/reset", timeout=10).raise_for_status()
    import boto3

    kw = dict(endpoint_url=SNSSQS_ENDPOINT, region_name="us-east-1", aws_access_key_id="test",
              aws_secret_access_key="test")
    return boto3.client("sns", **kw), boto3.client("sqs", **kw)


def test_snssqs_entities_and_bytes(sidecar_factory, app_factory, moto):
    sns, sqs = moto
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders.v1", "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([SNSSQS_COMPONENT], app_port=app.port)
    s.wait_ready()
    # the topic (sanitized name), the consumerID queue (= app id) and its subscription
    topic_arn = next(t["TopicArn"] for t in sns.list_topics()["Topics"])
    assert topic_arn.endswith(":ordersv1")
    queue_url = sqs.get_queue_url(QueueName="checkout")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    subs_of_topic = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    assert [x["Endpoint"] for x in subs_of_topic] == [attrs["QueueArn"]]
    policy = json.loads(attrs["Policy"])
    assert policy["Statement"][0]["Condition"]["ArnEquals"]["aws:SourceArn"] == topic_arn
    # an independent queue on the same topic sees the bytes the sidecar publishes
    mine = sqs.create_queue(QueueName=f"probe-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    mine_arn = sqs.get_queue_attributes(QueueUrl=mine, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=mine_arn)
    s.publish("orders.v1", json.dumps({"orderId": 5}))
    got = []
    deadline = time.monotonic() + 15
    while not got and time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=mine, WaitTimeSeconds=1).get("Messages", [])
    assert got, "no message on the probe queue"
    envelope = json.loads(got[0]["Body"])
    assert envelope["TopicArn"] == topic_arn
    event = json.loads(envelope["Message"])
    assert event["data"] == {"orderId": 5} and event["topic"] == "orders.v1"
    assert event["source"] == "checkout" and event["type"] == "com.dapr.event.sent"
    # and a message published to the SNS topic by another client reaches the app
    foreign = {"specversion": "1.0", "id": "x-1", "source": "boto3", "type": "t",
               "datacontenttype": "application/json", "data": {"from": "boto3"}}
    sns.publish(TopicArn=topic_arn, Message=json.dumps(foreign))
    def both():
        bodies = [json.loads(r["body"]) for r in received(app.port, "/orders")]
        return bodies if len(bodies) == 2 else None
    bodies = eventually(both, 15, "both messages at the app")
    assert {b["id"] for b in bodies} == {event["id"], "x-1"}
    # the app's SUCCESS deleted them from the component's queue
    def drained():
        a = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        return a["ApproximateNumberOfMessages"] == "0" and a["ApproximateNumberOfMessagesNotVisible"] == "0"
    eventually(drained, 10, "the component's queue to be empty")


def test_snssqs_failed_message_is_received_again_then_deleted_at_the_retry_limit(
        sidecar_factory, app_factory, moto):
    sns, sqs = moto
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "flaky", "route": "/flaky"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/flaky": {"status": 500}}).raise_for_status()
    comp = SNSSQS_COMPONENT.replace('"2"}', '"1"}') + '  - {name: messageRetryLimit, value: "3"}\n'
    s = sidecar_factory([comp], app_port=app.port)
    s.wait_ready()
    s.publish("flaky", '{"n":1}')
    # receives 1 and 2 reach the app; the 3rd receive hits messageRetryLimit: deleted unseen
    eventually(lambda: len(received(app.port, "/flaky")) == 2, 15, "two attempts")
    queue_url = sqs.get_queue_url(QueueName="checkout")["QueueUrl"]
    def gone():
        a = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        return a["ApproximateNumberOfMessages"] == "0" and a["ApproximateNumberOfMessagesNotVisible"] == "0"
    eventually(gone, 15, "the message deleted at the retry limit")
    assert len(received(app.port, "/flaky")) == 2


def test_snssqs_fifo_topic_and_queue_keep_order(sidecar_factory, app_factory, moto):
    sns, sqs = moto
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "ledger", "route": "/ledger"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    comp = SNSSQS_COMPONENT + ('  - {name: fifo, value: "true"}\n'
                               '  - {name: concurrencyMode, value: single}\n')
    s = sidecar_factory([comp], app_port=app.port)
    s.wait_ready()
    arns = [t["TopicArn"] for t in sns.list_topics()["Topics"]]
    assert [a.rsplit(":", 1)[1] for a in arns] == ["ledger.fifo"]
    attrs = sns.get_topic_attributes(TopicArn=arns[0])["Attributes"]
    assert attrs["FifoTopic"] == "true" and attrs["ContentBasedDeduplication"] == "true"
    queue_url = sqs.get_queue_url(QueueName="checkout.fifo")["QueueUrl"]
    qattrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert qattrs["FifoQueue"] == "true"
    for n in range(20):
        s.publish("ledger", json.dumps({"n": n}))
    def all_in():
        got = received(app.port, "/ledger")
        return got if len(got) == 20 else None
    got = eventually(all_in, 20, "20 FIFO messages")
    assert [json.loads(r["body"])["data"]["n"] for r in got] == list(range(20))


def test_snssqs_dead_letters_queue_gets_what_the_app_keeps_refusing(
        sidecar_factory, app_factory, moto):
    sns, sqs = moto
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "bills", "route": "/bills"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/bills": {"status": 500}}).raise_for_status()
    comp = SNSSQS_COMPONENT.replace('"2"}', '"1"}') + (
        '  - {name: sqsDeadLettersQueueName, value: bills-dlq}\n'
        '  - {name: messageReceiveLimit, value: "2"}\n')
    s = sidecar_factory([comp], app_port=app.port)
    s.wait_ready()
    dlq_url = sqs.get_queue_url(QueueName="bills-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.get_queue_url(QueueName="checkout")["QueueUrl"]
    redrive = json.loads(sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
                         ["Attributes"]["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dlq_arn and int(redrive["maxReceiveCount"]) == 2
    s.publish("bills", '{"bill":1}')
    eventually(lambda: len(received(app.port, "/bills")) == 2, 15, "two refused deliveries")
    got = []
    deadline = time.monotonic() + 15
    while not got and time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=1).get("Messages", [])
    assert got, "the message never reached the dead-letters queue"
    assert json.loads(json.loads(got[0]["Body"])["Message"])["data"] == {"bill": 1}
    assert len(received(app.port, "/bills")) == 2
