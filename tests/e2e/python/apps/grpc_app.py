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
# AppCallbackHealthCheck answers OK (for --enable-app-health-check)
app.register_health_check(lambda: None)


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


@app.subscribe(pubsub_name="pubsub", topic="flaky", dead_letter_topic="dlq.all")
def flaky(event: v1.Event) -> TopicEventResponse:
    record(event, "flaky")
    return TopicEventResponse("retry")


@app.subscribe(pubsub_name="pubsub", topic="bad", dead_letter_topic="dlq.all")
def bad(event: v1.Event) -> TopicEventResponse:
    record(event, "bad")
    return TopicEventResponse("drop")


@app.subscribe(pubsub_name="pubsub", topic="dlq.all")
def dlq(event: v1.Event) -> TopicEventResponse:
    record(event, "dlq.all")
    return TopicEventResponse("success")


@app.subscribe(pubsub_name="pubsub", topic="routed", rule=None)
def routed_default(event: v1.Event) -> TopicEventResponse:
    record(event, "routed")
    return TopicEventResponse("success")


if __name__ == "__main__":
    port = int(sys.argv[1])
    if os.environ.get("TLS_CERT"):
        # grpcs: the SDK's App has no TLS switch, so its gRPC server gets a secure port.
        import grpc
        with open(os.environ["TLS_KEY"], "rb") as k, open(os.environ["TLS_CERT"], "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        app._server.add_secure_port(f"127.0.0.1:{port}", creds)
        app._server.start()
        app._server.wait_for_termination()
    else:
        app.run(port)
