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

from serve_helpers import KEY, AppServer, Server
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


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module's tests (starting one took a second and a half a test); FakeBackend.start
    clears what the page keeps in the browser."""
    profile = tmp_path_factory.mktemp("chromium") / "profile"
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
    browser.wait_for("!!document.getElementById('model').textContent", timeout=60)
    # Filled, not sent: a link from another site had asked at once, with the key this origin keeps.
    assert browser.evaluate("document.querySelectorAll('.user').length") == 0
    assert browser.evaluate("document.getElementById('input').value") == QUESTION
    browser.evaluate("document.querySelector('form').requestSubmit()")
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


# The page against a scripted fake backend: what it does with a slow reply, errors, tool calls and key presses, in
# seconds and without the model. The fake serves the real page; each test sets `fake.script` and reads `fake.requests`.

class FakeBackend(AppServer):
    def __init__(self):
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
        from starlette.routing import Route

        from herd.serve.app import STATIC

        self.script, self.requests, self.closed = "echo", [], []
        self.run = 0  # which test's page: a stream an earlier test left running ends in this one's (one browser)

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "fake",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        async def page(request):
            return FileResponse(STATIC / "index.html")

        async def models(request):
            if self.script == "bad-key":
                return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
            return JSONResponse({"object": "list", "data": [{"id": "fake"}]})

        async def chat(request):
            import asyncio

            body = await request.json()
            self.requests.append(body)
            script = self.script
            if script == "bad-key":
                return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
            if script == "busy":
                return JSONResponse({"error": {"message": "the queue is full: try again shortly"}}, status_code=429)
            if script == "proxy-504":
                return HTMLResponse("<html><body><h1>504 Gateway Time-out</h1></body></html>", status_code=504)

            async def stream():
                number, run = len(self.requests), self.run
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    if script == "tool-pieces":  # as OpenAI streams one: id and name, then arguments in fragments
                        yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}]})
                        for piece in ['{"city":', ' "Paris"}']:
                            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                    elif script == "error-midway":
                        yield chunk({"content": "a partial answer"})
                        yield "data: " + json.dumps({"error": {"message": "the request ran past its limit"}}) + "\n\n"
                        return
                    elif script == "slow":
                        for i in range(600):  # a minute: a test stops it long before, however slow the machine
                            yield chunk({"content": f"line {i}\n"})
                            await asyncio.sleep(0.1)
                    elif script == "cut":
                        yield chunk({"content": "the start of an answer"}, finish="length")
                    elif script == "empty":
                        yield chunk({}, finish="stop")
                    elif script == "long-line":
                        yield chunk({"content": "https://example.com/" + "b" * 400})
                    else:
                        yield chunk({"content": "echo: " + body["messages"][-1]["content"]})
                    yield "data: [DONE]\n\n"
                finally:
                    if run == self.run:
                        self.closed.append(number)

            return StreamingResponse(stream(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/", page), Route("/v1/models", models),
                                Route("/v1/chat/completions", chat, methods=["POST"])])
        super().__init__(app)

    def start(self, browser, script="echo", query="", fresh=True):
        """Opens a fresh page on the fake, once it knows the model (or has shown why not); `fresh`: with nothing kept
        in the browser from before."""
        self.script, self.requests, self.closed = script, [], []
        self.run += 1
        browser("Emulation.setDeviceMetricsOverride", width=700, height=420, deviceScaleFactor=1, mobile=False)
        if fresh:
            browser("Storage.clearDataForOrigin", origin=self.url, storageTypes="all")
        browser.open(self.url + "/" + query)
        browser.wait_for("!!(document.getElementById('model').textContent || document.querySelector('.error'))", 30)


@pytest.fixture(scope="module")
def fake():
    backend = FakeBackend()
    yield backend
    backend.stop()


def say(browser, text):
    """Types text into the box and presses Enter, as a user does."""
    browser.evaluate("document.getElementById('input').focus()")
    browser("Input.insertText", text=text)
    for kind in ("keyDown", "keyUp"):
        browser("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)


def shown(browser):
    return browser.evaluate("[...document.querySelectorAll('#log .msg')].map(e => [e.className, e.textContent])")


def settled(browser, requests: int, fake):
    """Waits for the page to have sent `requests` chat requests and finished its reply."""
    browser.wait_for("document.body.dataset.state === 'done'", 30)
    deadline = time.monotonic() + 30
    while len(fake.requests) < requests and time.monotonic() < deadline:
        time.sleep(0.05)
    browser.wait_for("document.body.dataset.state === 'done'", 30)


def wait_closed(fake, timeout: float):
    deadline = time.monotonic() + timeout
    while not fake.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    return fake.closed


def test_enter_while_a_reply_streams_sends_nothing(fake, browser):
    fake.start(browser, "slow")
    say(browser, "first")
    browser.wait_for("document.querySelector('.assistant')?.textContent.includes('line 2')", 30)
    say(browser, "second")  # one request at a time: the text waits in the box until the reply ends
    time.sleep(0.5)
    assert len(fake.requests) == 1 and len(shown(browser)) == 2
    assert browser.evaluate("document.getElementById('input').value") == "second"


def test_stop_ends_the_reply_and_keeps_what_came(fake, browser):
    fake.start(browser, "slow")
    say(browser, "first")
    browser.wait_for("document.querySelector('.assistant')?.textContent.includes('line 2')", 30)
    assert browser.evaluate("document.getElementById('send').textContent") == "Stop"
    browser.evaluate("document.getElementById('send').click()")
    assert wait_closed(fake, 15) == [1]  # the fetch was aborted: the server stopped streaming
    browser.wait_for("document.body.dataset.state === 'done'", 20)
    partial = browser.evaluate("document.querySelector('.assistant').textContent")
    assert partial.startswith("line 0\nline 1\nline 2\n") and "line 99" not in partial
    assert browser.evaluate("document.querySelectorAll('.error').length") == 0
    assert browser.evaluate("document.getElementById('send').textContent") == "Send"
    fake.script = "echo"
    say(browser, "second")
    settled(browser, 2, fake)
    assert fake.requests[1]["messages"] == [{"role": "user", "content": "first"},  # what was shown stays in the chat
                                            {"role": "assistant", "content": partial},
                                            {"role": "user", "content": "second"}]


def test_leaving_the_page_stops_the_reply(fake, browser):
    fake.start(browser, "slow")
    say(browser, "first")
    browser.wait_for("document.querySelector('.assistant')?.textContent.includes('line 1')", 30)
    # Chromium keeps the page alive in its back-forward cache, fetch and all, unless the page aborts it on pagehide
    browser("Page.navigate", url="about:blank")
    assert wait_closed(fake, 15) == [1]


def test_a_wrong_key_is_shown_and_the_question_kept(fake, browser):
    fake.start(browser, "bad-key")  # the page cannot even list the models
    say(browser, "my question")
    browser.wait_for("document.querySelectorAll('.error').length === 2", 20)
    assert "invalid API key" in browser.evaluate("document.querySelectorAll('.error')[1].textContent")
    assert browser.evaluate("document.getElementById('input').value") == "my question"  # to send again
    assert browser.evaluate("document.body.dataset.state") == "done"


def test_an_error_midway_keeps_the_partial_reply(fake, browser):
    fake.start(browser, "error-midway")
    say(browser, "question")
    settled(browser, 1, fake)
    assert shown(browser) == [["msg user", "question"], ["msg assistant", "a partial answer"],
                              ["msg error", "Error: the request ran past its limit"]]


def test_a_proxy_error_page_shows_its_status_and_text(fake, browser):
    fake.start(browser, "proxy-504")  # not the API's JSON: a proxy's HTML page
    say(browser, "question")
    settled(browser, 1, fake)
    error = browser.evaluate("document.querySelector('.error').textContent")
    assert "504" in error and "Gateway Time-out" in error and "JSON" not in error
    assert browser.evaluate("document.getElementById('input').value") == "question"


def test_max_tokens_is_left_to_the_server(fake, browser):
    fake.start(browser)
    say(browser, "hello")
    settled(browser, 1, fake)
    assert "max_tokens" not in fake.requests[0]  # the server then allows what the context has room for
    fake.start(browser, query="?max_tokens=7")
    say(browser, "hello")
    settled(browser, 1, fake)
    assert fake.requests[0]["max_tokens"] == 7


def test_tool_call_pieces_are_put_together(fake, browser):
    fake.start(browser, "tool-pieces")
    say(browser, "weather?")
    settled(browser, 1, fake)
    assert [text for kind, text in shown(browser) if "tool" in kind] == ['tool call: get_weather({"city": "Paris"})']
    fake.script = "echo"
    say(browser, "next")
    settled(browser, 2, fake)
    assert fake.requests[1]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}


def test_enter_that_ends_an_ime_composition_sends_nothing(fake, browser):
    fake.start(browser)
    browser.evaluate("""(() => { const box = document.getElementById('input'); box.value = 'にほんご';
        box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', keyCode: 229, isComposing: true,
                                                        bubbles: true, cancelable: true})); })()""")
    time.sleep(0.5)
    assert fake.requests == [] and browser.evaluate("document.getElementById('input').value") == "にほんご"


def test_a_long_line_wraps(fake, browser):
    fake.start(browser, "long-line")
    say(browser, "a long line")
    settled(browser, 1, fake)
    assert browser.evaluate("log.scrollWidth <= log.clientWidth")  # no sideways scrolling


def test_a_reader_who_scrolled_up_stays_there(fake, browser):
    fake.start(browser, "slow")
    say(browser, "go")
    browser.wait_for("document.querySelector('.assistant')?.textContent.includes('line 30')", 30)
    assert browser.evaluate("log.scrollHeight > log.clientHeight")
    browser.evaluate("log.scrollTop = 0")
    time.sleep(0.5)  # five more lines
    assert browser.evaluate("log.scrollTop") == 0


def test_new_chat_starts_over(fake, browser):
    fake.start(browser)
    say(browser, "one")
    settled(browser, 1, fake)
    browser.evaluate("document.getElementById('new').click()")
    assert shown(browser) == []
    say(browser, "two")
    settled(browser, 2, fake)
    assert fake.requests[1]["messages"] == [{"role": "user", "content": "two"}]
    assert shown(browser) == [["msg user", "two"], ["msg assistant", "echo: two"]]


def test_an_unanswered_question_leaves_the_page_with_the_conversation(fake, browser):
    fake.start(browser, "busy")
    say(browser, "My name is Zed.")
    settled(browser, 1, fake)
    assert shown(browser) == [["msg error", "Error: HTTP 429 Too Many Requests: the queue is full: try again shortly"]]
    assert browser.evaluate("document.getElementById('input').value") == "My name is Zed."
    fake.script = "echo"
    browser.evaluate("document.getElementById('input').value = ''")
    say(browser, "What is my name?")
    settled(browser, 2, fake)
    assert fake.requests[1]["messages"] == [{"role": "user", "content": "What is my name?"}]
    assert [text for kind, text in shown(browser) if "user" in kind] == ["What is my name?"]


def click(browser, element: str, count: int) -> None:
    """A real mouse click on the element; count 2 is the second click of a double click."""
    box = browser.evaluate(f"(() => {{ const r = document.getElementById('{element}').getBoundingClientRect();"
                           " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        browser("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=count)


def test_a_double_click_on_send_does_not_stop_the_reply(fake, browser):
    fake.start(browser, "slow")
    browser.evaluate("document.getElementById('input').value = 'go'")
    click(browser, "send", 1)
    browser.wait_for("document.getElementById('send').textContent === 'Stop'", 10)
    click(browser, "send", 2)
    browser.wait_for("document.querySelector('.assistant')?.textContent.includes('line 3')", 30)
    assert fake.closed == [] and browser.evaluate("document.body.dataset.state") == "streaming"
    assert browser.evaluate("document.activeElement.id") == "send"
    click(browser, "send", 1)  # a click of its own stops it, and typing goes on in the box
    assert wait_closed(fake, 15) == [1]
    browser.wait_for("document.body.dataset.state === 'done'", 20)
    assert browser.evaluate("document.activeElement.id") == "input"


def test_a_reply_cut_at_its_token_limit_or_empty_says_so(fake, browser):
    def marker():
        return browser.evaluate("getComputedStyle(document.querySelector('.assistant'), '::after').content")

    fake.start(browser, "cut")
    say(browser, "question")
    settled(browser, 1, fake)
    assert "token limit" in marker()
    fake.start(browser, "empty")
    say(browser, "question")
    settled(browser, 1, fake)
    assert "empty reply" in marker()


def test_right_to_left_text_runs_right_to_left(fake, browser):
    fake.start(browser)
    say(browser, "שלום, מה שלומך?")
    settled(browser, 1, fake)
    directions = browser.evaluate("[...document.querySelectorAll('#log .msg')].map(e => getComputedStyle(e).direction)")
    assert directions == ["rtl", "ltr"]  # each by its first letter: the echo starts with "echo: "


def test_a_phone_wide_page_does_not_scroll_sideways(fake, browser):
    fake.start(browser)
    browser("Emulation.setDeviceMetricsOverride", width=375, height=667, deviceScaleFactor=1, mobile=True)
    browser.evaluate("document.getElementById('model').textContent = 'a-rather-long-model-name-' + 'x'.repeat(60)")
    say(browser, "hello")
    settled(browser, 1, fake)
    assert browser.evaluate("document.documentElement.scrollWidth") <= 375
    assert browser.evaluate("document.getElementById('new').getBoundingClientRect().right") <= 375
    assert browser.evaluate("document.querySelector('header').getBoundingClientRect().height") < 100


def test_replies_errors_and_controls_reach_a_screen_reader(fake, browser):
    fake.start(browser, "busy")
    say(browser, "question")
    settled(browser, 1, fake)
    nodes = browser("Accessibility.getFullAXTree")["nodes"]

    def named(role):
        return [node.get("name", {}).get("value", "") for node in nodes if node.get("role", {}).get("value") == role]

    assert all(named("textbox")) and len(named("textbox")) == 2  # the key and the message, each with a name
    assert all(named("button")) and len(named("button")) == 3
    assert len(named("log")) == 1 and len(named("alert")) == 1  # replies are announced, and so is the error


def test_settings_are_sent_kept_and_overridden_by_the_address(fake, browser):
    """A system prompt, temperature and max tokens set in the page (it had no way to set them but the address)."""
    def settle(**boxes):
        for box, value in boxes.items():
            browser.evaluate(f"(() => {{ const b = document.getElementById({json.dumps(box)}); b.value = "
                             f"{json.dumps(value)}; b.dispatchEvent(new Event('change')); }})()")

    fake.start(browser)
    assert browser.evaluate("document.getElementById('settings').hidden")
    browser.evaluate("document.getElementById('toggle-settings').click()")
    assert not browser.evaluate("document.getElementById('settings').hidden")
    settle(system="Be brief.", temperature="0.7", **{"max-tokens": "5"})
    say(browser, "hi")
    settled(browser, 1, fake)
    first = fake.requests[0]
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (first["temperature"], first["max_tokens"]) == (0.7, 5)
    fake.start(browser, query="?temperature=0&max_tokens=3", fresh=False)  # kept in the browser; the address overrides
    say(browser, "again")
    settled(browser, 1, fake)
    again = fake.requests[0]
    assert again["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (again["temperature"], again["max_tokens"]) == (0, 3)
    settle(system="", **{"max-tokens": ""})  # blank: left out, for the server to decide
    say(browser, "once more")
    settled(browser, 2, fake)
    assert fake.requests[1]["messages"][0]["role"] == "user" and "max_tokens" not in fake.requests[1]
