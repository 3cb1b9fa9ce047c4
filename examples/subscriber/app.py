"""A minimal subscriber for the README's two-terminal example (Python standard library
only): tells daprd it wants topic `orders` on pubsub `pubsub`, and prints each event."""

import json
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/dapr/subscribe":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print(f"received {event['id']} on {event['topic']}: {json.dumps(event['data'])}", flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    print("subscriber listening on 127.0.0.1:3000", flush=True)
    HTTPServer(("127.0.0.1", 3000), Handler).serve_forever()
