"""A real herd server on loopback (uvicorn in a thread, a free port) with the built-in default model."""
import importlib
import importlib.util
import sys
import types

import pytest

import herd
from herd.serve.app import ServeSettings

from serve_helpers import KEY, AppServer, Server


@pytest.fixture
def serve_app():
    """`serve_app(app)`: an ASGI app served on loopback for this test (its AppServer), stopped after it."""
    started = []
    yield lambda app: started.append(AppServer(app)) or started[-1]
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def default_llm():
    return herd.load()


@pytest.fixture(scope="session")
def server(default_llm):
    server = Server(default_llm, ServeSettings(api_keys=(KEY,), max_body_bytes=256 << 10, max_n=4))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    # Generous: a shared, loaded CI machine makes a 40-token reply slow, not wrong; a hang still fails.
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def llama_stack():
    """A loader of llama-stack's API modules (its request and response types), imported without its package
    __init__, which needs its client library; they leave sys.modules again after the session. Once per session:
    imported a second time, pydantic's models of the second import met typing's cached forward references to the
    first's and recursed without end (the agents tests, then the inference ones, had failed so)."""
    spec = importlib.util.find_spec("llama_stack")
    package = types.ModuleType("llama_stack")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules["llama_stack"] = package
    try:
        yield importlib.import_module
    finally:
        for name in [n for n in sys.modules if n == "llama_stack" or n.startswith("llama_stack.")]:
            del sys.modules[name]
