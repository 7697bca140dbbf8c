"""What the server tests share besides their fixtures (a module name no other test directory uses: a test's
`from conftest import` had found whichever directory's conftest.py was imported first)."""
import socket
import threading
import time

from herd.serve.app import ServeSettings, create_app

KEY = "test-key-0123456789"


class AppServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


class Server(AppServer):
    """herd's own app on `llm`."""

    def __init__(self, llm, settings: ServeSettings, **app_options):
        self.llm = llm
        super().__init__(create_app(llm, settings, **app_options))
