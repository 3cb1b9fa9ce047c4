"""A subscriber written with the official Python SDK's gRPC extension (`dapr.ext.grpc.App`).
Every event it receives is appended as a JSON line to the file named by OUT.
Topic `orders` answers SUCCESS, `flaky` answers RETRY, `bad` answers DROP."""

import json
import os
import sys

from cloudevents.sdk.event import v1
from dapr.clients.grpc._response import TopicEventResponse
from dapr.ext.grpc import App

app = App()
OUT = os.environ["OUT"]


def record(event: v1.Event, route: str):
    data = event.Data()
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    with open(OUT, "a") as f:
        f.write(json.dumps({"route": route, "id": event.EventID(), "source": event.Source(),
                            "type": event.EventType(), "content_type": event.ContentType(),
                            "data": data, "topic": event.Extensions().get("topic"),
                            "pubsubname": event.Extensions().get("pubsubname")}) + "\n")


@app.subscribe(pubsub_name="pubsub", topic="orders")
def orders(event: v1.Event) -> TopicEventResponse:
    record(event, "orders")
    return TopicEventResponse("success")


@app.subscribe(pubsub_name="pubsub", topic="flaky", dead_letter_topic="dlq")
def flaky(event: v1.Event) -> TopicEventResponse:
    record(event, "flaky")
    return TopicEventResponse("retry")


@app.subscribe(pubsub_name="pubsub", topic="bad", dead_letter_topic="dlq")
def bad(event: v1.Event) -> TopicEventResponse:
    record(event, "bad")
    return TopicEventResponse("drop")


@app.subscribe(pubsub_name="pubsub", topic="dlq")
def dlq(event: v1.Event) -> TopicEventResponse:
    record(event, "dlq")
    return TopicEventResponse("success")


@app.subscribe(pubsub_name="pubsub", topic="routed", rule=None)
def routed_default(event: v1.Event) -> TopicEventResponse:
    record(event, "routed")
    return TopicEventResponse("success")


if __name__ == "__main__":
    app.run(int(sys.argv[1]))
