"""The chat page end to end in headless Chromium (Debian's `chromium`), driven over the DevTools protocol: it asks the
real server a question, streams the answer, and shows exactly what the API answers to the same greedy request.

HERD_SCREENSHOT=docs/chat-page.png saves the screenshot there (the README's picture); otherwise it goes to a
temporary directory."""
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import KEY, Server
from herd.generate import EngineConfig, Generator
from herd.llm import LLM
from herd.serve.app import ServeSettings

pytestmark = [pytest.mark.heavy,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                                 "(scripts/setup.sh installs it)")]
QUESTION = "What is the capital of France?"


class DevTools:
    """A minimal DevTools-protocol client for one page: commands by id, events ignored."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)

    def __call__(self, method: str, **params):
        sent = next(self.ids)
        self.ws.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}; the page shows: " + \
                repr(self.evaluate("document.body.innerText"))
            time.sleep(0.1)
        return value

    def open(self, url: str) -> None:
        self("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", 30)


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
         "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def page_server(default_llm):
    """The default model behind its own engine with the prefix cache off: the page's request and the API's are
    then both computed from scratch (tests/quant/test_phase.py checks that a cache hit changes nothing)."""
    llm = LLM(default_llm.model, default_llm.tokenizer, default_llm.chat_format, name=default_llm.name)
    llm.generator = Generator(llm.model, llm.tokenizer, config=EngineConfig(max_batch=4, prefix_caching=False))
    server = Server(llm, ServeSettings(api_keys=(KEY,)))
    yield server
    server.stop()


def test_chat_page_streams_the_same_answer_as_the_api(page_server, browser, tmp_path):
    import openai

    server = page_server
    browser("Emulation.setDeviceMetricsOverride", width=900, height=520, deviceScaleFactor=1, mobile=False)
    browser.open(server.url + "/health")  # the page's origin, to hand it the API key the way a user would
    browser.evaluate(f"localStorage.setItem('herd-key', {json.dumps(KEY)})")
    browser.open(server.url + "/?" + urllib.parse.urlencode({"q": QUESTION, "temperature": 0, "max_tokens": 32}))
    browser.wait_for("document.body.dataset.state === 'done'", timeout=300)
    assert browser.evaluate("document.querySelectorAll('.error').length") == 0
    assert browser.evaluate("document.getElementById('model').textContent") == server.llm.name
    assert browser.evaluate("[...document.querySelectorAll('.user')].map(e => e.textContent)") == [QUESTION]
    shown = browser.evaluate("[...document.querySelectorAll('.assistant')].map(e => e.textContent)")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    answer = client.chat.completions.create(model=server.llm.name, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=32, temperature=0).choices[0].message.content
    assert "Paris" in answer
    assert shown == [answer]

    png = base64.b64decode(browser("Page.captureScreenshot", format="png")["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 900
    out = Path(os.environ.get("HERD_SCREENSHOT") or tmp_path / "chat-page.png")
    out.write_bytes(png)
