"""A plain HTTP subscriber app (no SDK): answers GET /dapr/subscribe with the JSON in the
SUBSCRIPTIONS env var (or what POST /_subscriptions set since), records every POST it receives,
and answers each path as told through POST /_mode. GET /_received returns what it recorded."""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECEIVED = []
STARTED = []
MODES = {}  # path -> {"status": int, "body": str, "sleep": float}
LOCK = threading.Lock()
HEALTH = {"healthy": os.environ.get("HEALTHY", "1") == "1"}
SUBSCRIPTIONS = {}  # "now": the answer to GET /dapr/subscribe, once POST /_subscriptions set it


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200 if HEALTH["healthy"] else 503)
        if self.path == "/dapr/subscribe":
            subs = SUBSCRIPTIONS.get("now", os.environ.get("SUBSCRIPTIONS"))
            if subs is None:
                return self.reply(404, b"not found", "text/plain")
            return self.reply(200, subs.encode())
        if self.path == "/_started":
            with LOCK:
                return self.reply(200, json.dumps(STARTED).encode())
        if self.path == "/_received":
            with LOCK:
                return self.reply(200, json.dumps(RECEIVED).encode())
        return self.reply(404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path == "/_health":
            HEALTH["healthy"] = json.loads(body)["healthy"]
            return self.reply(204)
        if self.path == "/_subscriptions":
            SUBSCRIPTIONS["now"] = body.decode()
            return self.reply(204)
        if self.path == "/_mode":
            with LOCK:
                MODES.update(json.loads(body))
            return self.reply(204)
        mode = MODES.get(self.path, {})
        with LOCK:
            STARTED.append({"path": self.path, "at": time.time(),
                            "body": body.decode(errors="replace")})
        if mode.get("sleep"):
            time.sleep(mode["sleep"])
        with LOCK:
            RECEIVED.append({"path": self.path, "headers": {k: v for k, v in self.headers.items()},
                             "body": body.decode(errors="replace"), "done": time.time()})
        status = mode.get("status", 200)
        out = mode.get("body", "").encode()
        if mode.get("poison_mod"):
            # only events whose data.seq is a multiple of poison_mod get `status`/`body`
            try:
                seq = json.loads(body)["data"]["seq"]
            except (ValueError, KeyError, TypeError):
                seq = None
            if seq is None or seq % mode["poison_mod"] != 0:
                status, out = 200, b""
        if mode.get("bulk"):
            # answer each bulk entry with the status named in its event's data (default SUCCESS)
            entries = json.loads(body)["entries"]
            out = json.dumps({"statuses": [
                {"entryId": e["entryId"],
                 "status": (e["event"].get("data") or {}).get("status", "SUCCESS") if isinstance(e["event"], dict) else "SUCCESS"}
                for e in entries]}).encode()
        with LOCK:
            if mode.get("fail_first") is not None:
                # the first N calls get `status`/`body`, later ones 200 with an empty body
                mode["fail_first"] -= 1
                if mode["fail_first"] < 0:
                    status, out = 200, b""
        return self.reply(status, out)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    if os.environ.get("TLS_CERT"):
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.environ["TLS_CERT"], os.environ["TLS_KEY"])
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
