import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest


class StandIn:
    """A local HTTP server answering GETs with canned JSON by path, recording every request."""

    def __init__(self):
        self.routes: dict[str, tuple[int, object]] = {}
        self.requests: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlsplit(self.path)
                stand_in.requests.append({"path": url.path, "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                                          "headers": dict(self.headers)})
                # A pause: the answer a byte at a time, its headers too unless the route says "body".
                status, body, *pause = stand_in.routes.get(url.path, (404, {"error": "not found"}))
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                head = (f"HTTP/1.1 {status} {self.responses[status][0]}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
                slow = head + data if pause and pause[1:] != ["body"] else data if pause else b""
                try:
                    self.wfile.write((head + data)[:len(head + data) - len(slow)])
                    for byte in range(len(slow)):
                        self.wfile.write(slow[byte:byte + 1])
                        self.wfile.flush()
                        time.sleep(pause[0])
                except (BrokenPipeError, ConnectionResetError):  # the client has given up
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.close()
