"""A gRPC app built on the SDK's generated AppCallback service that declares a subscription
but does not implement OnTopicEvent (the generated servicer answers UNIMPLEMENTED)."""

import sys
from concurrent import futures

import grpc
from dapr.proto.runtime.v1 import appcallback_pb2, appcallback_pb2_grpc


class Servicer(appcallback_pb2_grpc.AppCallbackServicer):
    def ListTopicSubscriptions(self, request, context):
        return appcallback_pb2.ListTopicSubscriptionsResponse(subscriptions=[
            appcallback_pb2.TopicSubscription(pubsub_name="pubsub", topic="orders", dead_letter_topic="dlq.all"),
        ])


if __name__ == "__main__":
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    appcallback_pb2_grpc.add_AppCallbackServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()
    server.wait_for_termination()
