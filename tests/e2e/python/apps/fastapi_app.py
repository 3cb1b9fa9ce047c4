"""A subscriber written with the official Python SDK's FastAPI extension (`DaprApp`).
Every event it receives is appended as a JSON line to the file named by OUT."""

import json
import os
import sys

import uvicorn
from dapr.ext.fastapi import DaprApp
from fastapi import Body, FastAPI

app = FastAPI()
dapr_app = DaprApp(app)
OUT = os.environ["OUT"]


@dapr_app.subscribe(pubsub="pubsub", topic="orders")
def orders(event=Body()):
    with open(OUT, "a") as f:
        f.write(json.dumps({"route": "orders", "event": event}) + "\n")
    return {"status": "SUCCESS"}


@dapr_app.subscribe(pubsub="pubsub", topic="fastapi-dead", dead_letter_topic="dlq.fastapi")
def dead(event=Body()):
    with open(OUT, "a") as f:
        f.write(json.dumps({"route": "fastapi-dead", "event": event}) + "\n")
    return {"status": "DROP"}


@dapr_app.subscribe(pubsub="pubsub", topic="dlq.fastapi")
def dlq(event=Body()):
    with open(OUT, "a") as f:
        f.write(json.dumps({"route": "dlq.fastapi", "event": event}) + "\n")
    return {"status": "SUCCESS"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
