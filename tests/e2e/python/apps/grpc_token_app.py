"""A gRPC app on the SDK's generated AppCallback service that records, for each event, the
`dapr-api-token` and `traceparent` call metadata daprd sent (JSON lines in OUT)."""

import json
import os
import sys
from concurrent import futures

import grpc
from dapr.proto.runtime.v1 import appcallback_pb2, appcallback_pb2_grpc

OUT = os.environ["OUT"]


class Servicer(appcallback_pb2_grpc.AppCallbackServicer):
    def ListTopicSubscriptions(self, request, context):
        md = dict(context.invocation_metadata())
        with open(OUT, "a") as f:
            f.write(json.dumps({"call": "list", "token": md.get("dapr-api-token")}) + "\n")
        return appcallback_pb2.ListTopicSubscriptionsResponse(subscriptions=[
            appcallback_pb2.TopicSubscription(pubsub_name="pubsub", topic="orders"),
        ])

    def OnTopicEvent(self, request, context):
        md = dict(context.invocation_metadata())
        with open(OUT, "a") as f:
            f.write(json.dumps({"call": "event", "token": md.get("dapr-api-token"),
                                "traceparent": md.get("traceparent"), "topic": request.topic,
                                "id": request.id}) + "\n")
        return appcallback_pb2.TopicEventResponse(status=appcallback_pb2.TopicEventResponse.SUCCESS)


if __name__ == "__main__":
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    appcallback_pb2_grpc.add_AppCallbackServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()
    server.wait_for_termination()
