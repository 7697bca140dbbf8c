"""The agents endpoint: agents, sessions, and a turn streamed as Llama Stack-style step events over SSE."""
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from herd.generate import ContextLengthError
from herd.serve.agents import router
from herd.serve.app import ServeSettings, create_app

KEY = "agents-key"


def streamed(pieces, message):
    """As LLM.chat(stream=True): the text in pieces, and the message as the generator's return value."""
    yield from pieces
    return message


@pytest.fixture
def api(default_llm, monkeypatch):
    """The real app around the default model, its replies scripted (the loop, not the model, is under test)."""
    replies = ['{"name": "wolfram_alpha", "parameters": {"query": "what is 12 * 34"}}', "12 * 34 = 408."]
    seen = []

    def chat(messages, tools=None, *, stream=False, **options):
        seen.append((list(messages), tools))
        text = replies.pop(0)
        message = default_llm.chat_format.decode_assistant(text, "end_of_turn")  # a whole turn
        return streamed([text[:5], text[5:]], message) if stream else message

    monkeypatch.setattr(default_llm, "chat", chat)
    client = TestClient(create_app(default_llm, ServeSettings(api_keys=(KEY,)), routers=[router]))
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client, seen


def sse(response) -> list[dict]:
    return [json.loads(line[len("data: "):])["event"]["payload"] for line in response.text.splitlines()
            if line.startswith("data: ")]


def test_turn_streams_step_events_and_the_session_keeps_the_dialog(api):
    client, seen = api
    agent_id = client.post("/v1/agents", json={"instructions": "Be brief.", "tools": ["wolfram_alpha"]}
                           ).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={"session_name": "s"}).json()["session_id"]
    response = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                           json={"messages": [{"role": "user", "content": "What is 12 times 34?"}]})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    assert [(e["event_type"], e.get("step_type")) for e in events] == [
        ("turn_start", None),
        ("step_start", "inference"), ("step_progress", "inference"), ("step_progress", "inference"),
        ("step_complete", "inference"),
        ("step_start", "tool_execution"), ("step_complete", "tool_execution"),
        ("step_start", "inference"), ("step_progress", "inference"), ("step_progress", "inference"),
        ("step_complete", "inference"),
        ("turn_complete", None)]
    execution = events[6]["step_details"]
    assert execution["tool_calls"][0]["arguments"] == {"query": "what is 12 * 34"}
    assert json.loads(execution["tool_responses"][0]["content"])["result"] == "408"
    turn = events[-1]["turn"]
    assert turn["output_message"]["content"] == "12 * 34 = 408." and turn["stop_reason"] == "end_of_turn"
    assert seen[0][0][0] == {"role": "system", "content": "Be brief."} and seen[0][1] == [{"type": "wolfram_alpha"}]
    assert seen[1][0][-1]["role"] == "ipython"  # the result went back to the model
    stored = client.get(f"/v1/agents/{agent_id}/session/{session_id}").json()
    assert stored["session_name"] == "s" and [t["turn_id"] for t in stored["turns"]] == [turn["turn_id"]]


def test_errors_are_4xx(api):
    client, _ = api
    assert client.post("/v1/agents", json={"tools": ["nonsense"]}).status_code == 400
    wrong = client.post("/v1/agents", json={"tools": ["wolfram_alpha"], "tool_choice": "get_time"})
    assert wrong.status_code == 400 and "tool_choice must be auto, required or one of the tools (wolfram_alpha)" \
        in wrong.json()["error"]["message"]
    assert client.post("/v1/agents/nope/session", json={}).status_code == 404
    agent_id = client.post("/v1/agents", json={}).json()["agent_id"]
    asked = {"messages": [{"role": "user", "content": "x"}]}
    assert client.post(f"/v1/agents/{agent_id}/session/nope/turn", json=asked).status_code == 404
    assert client.post(f"/v1/agents/{agent_id}/session", json={}, headers={"Authorization": "Bearer wrong"}
                       ).status_code == 401
    # Bodies are read as on every other route: the key before the body, the size limit, valid Unicode.
    assert client.post("/v1/agents", json={"max_steps": "x"}, headers={"Authorization": "Bearer wrong"}
                       ).status_code == 401
    huge = client.post("/v1/agents", json={"instructions": "x" * (2 << 20)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert client.post("/v1/agents", content=b'{"instructions": "\\udc00"}',
                       headers={"Content-Type": "application/json"}).status_code == 400


def test_a_client_names_tools_never_code_to_import(api, tmp_path, monkeypatch):
    # A spec such as os:system would let any client have the model run a shell command on the server.
    client, _ = api
    (tmp_path / "herd_probe_module.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n"
                                                   "def f(x: str) -> str:\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("os:system", "herd_probe_module:f"):
        answer = client.post("/v1/agents", json={"tools": [spec]})
        assert answer.status_code == 400
        assert answer.json()["error"]["message"].startswith(f"unknown tool {spec!r}: this server offers brave_search")
    assert not (tmp_path / "ran").exists()
    for sampling in ({"temperature": 0, "shell": "ls"}, {"temperature": -1}, {"max_tokens": "x"}):
        assert client.post("/v1/agents", json={"sampling": sampling}).status_code == 400


def test_a_turn_checks_its_messages_and_a_failing_turn_ends_in_an_error_event(api, default_llm, monkeypatch):
    client, _ = api
    agent_id = client.post("/v1/agents", json={}).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
    turn = f"/v1/agents/{agent_id}/session/{session_id}/turn"
    for messages in ([{"role": "wizard", "content": "x"}], [{"content": None}], [{"role": "user", "content": ["x"]}]):
        assert client.post(turn, json={"messages": messages}).status_code == 400

    def failing(error):
        def chat(*args, **options):
            raise error
        return chat

    monkeypatch.setattr(default_llm, "chat", failing(RuntimeError("a bug")))
    answer = client.post(turn, json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    last = json.loads(answer.text.strip().splitlines()[-1][len("data: "):])
    assert last == {"error": {"message": "internal error: RuntimeError", "type": "server_error", "param": None,
                              "code": None}}
    # A session's dialog outgrowing the model is the client's to act on, not an internal error.
    monkeypatch.setattr(default_llm, "chat", failing(ContextLengthError("the prompt has 9000 tokens")))
    answer = client.post(turn, json={"messages": [{"role": "user", "content": "hi"}]})
    last = json.loads(answer.text.strip().splitlines()[-1][len("data: "):])["error"]
    assert last["code"] == "context_length_exceeded" and "start a new session" in last["message"]


def test_the_operators_functions_are_offered_by_name(default_llm, monkeypatch):
    calls = []

    def shout(text: str) -> str:
        """Upper-cases text."""
        calls.append(text)
        return text.upper()

    replies = ['{"name": "shout", "parameters": {"text": "hi"}}', "HI."]
    def chat(messages, tools=None, *, stream=False, **options):
        text = replies.pop(0)
        message = default_llm.chat_format.decode_assistant(text, "end_of_turn")  # a whole turn
        return streamed([text], message) if stream else message

    monkeypatch.setattr(default_llm, "chat", chat)
    client = TestClient(create_app(default_llm, routers=[router], tools=[shout]))
    agent = client.post("/v1/agents", json={"tools": ["shout", "wolfram_alpha"], "sampling": {"temperature": 0},
                                            "tool_choice": "shout"})
    assert agent.status_code == 200, agent.text
    agent_id = agent.json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
    turn = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                       json={"messages": [{"role": "user", "content": "Shout hi."}]})
    assert turn.status_code == 200 and calls == ["hi"]
    assert sse(turn)[-1]["turn"]["output_message"]["content"] == "HI."


def test_an_operators_function_gets_no_longer_than_the_servers_timeout(default_llm, monkeypatch):
    """A function slower than --timeout had run its course (the agent's 60 s) before the turn's limit was read."""
    def slow(text: str) -> str:
        """Takes its time."""
        time.sleep(4)
        return text

    replies = ['{"name": "slow", "parameters": {"text": "hi"}}', "done."]
    def chat(messages, tools=None, *, stream=False, **options):
        text = replies.pop(0) if replies else "done."
        message = default_llm.chat_format.decode_assistant(text, "end_of_turn")
        return streamed([text], message) if stream else message

    monkeypatch.setattr(default_llm, "chat", chat)
    client = TestClient(create_app(default_llm, ServeSettings(request_timeout=1.0), routers=[router], tools=[slow]))
    agent_id = client.post("/v1/agents", json={"tools": ["slow"], "tool_choice": "slow"}).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
    began = time.monotonic()
    turn = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                       json={"messages": [{"role": "user", "content": "Go."}], "stream": False})
    assert time.monotonic() - began < 3  # the function's 4 s cut at the server's 1 s
    assert turn.status_code == 504 and turn.json()["error"]["code"] == "request_timeout"


def test_an_agents_sampling_takes_a_logit_bias_as_json_writes_it(default_llm):
    """JSON's keys are strings: an agent's logit_bias reached the engine so ({"5": 1}) and its first turn failed
    with a TypeError; a key that is no token id, or a field of the wrong type, is a 400 when the agent is made."""
    client = TestClient(create_app(default_llm, routers=[router]))
    assert client.post("/v1/agents", json={"sampling": {"logit_bias": {"x": 1}}}).status_code == 400
    assert client.post("/v1/agents", json={"max_steps": "3"}).status_code == 400  # strict, as every route
    bias = {str(default_llm.tokenizer.encode("Paris", bos=False)[0]): 100}
    agent_id = client.post("/v1/agents", json={"sampling": {"logit_bias": bias, "max_tokens": 3, "temperature": 0}}
                           ).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
    turn = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                       json={"messages": [{"role": "user", "content": "Name a city."}]})
    assert turn.status_code == 200 and "error" not in turn.text, turn.text
    assert sse(turn)[-1]["turn"]["output_message"]["content"].startswith("Paris")  # the bias took effect


def test_every_agents_route_counts_its_successes_beside_its_errors(api):
    """herd_requests_total had counted these routes' errors only (by the error handler): an error ratio read 100%."""
    client, _ = api
    agent_id = client.post("/v1/agents", json={"tools": ["wolfram_alpha"]}).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={"session_name": "s"}).json()["session_id"]
    client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn", json={"messages": [{"role": "user",
                                                                                       "content": "12 * 34?"}]})
    assert client.get(f"/v1/agents/{agent_id}/session/{session_id}").status_code == 200
    assert client.get("/v1/agents/nope/session/none").status_code == 404
    text = client.get("/metrics").text
    for route in ("", "/{agent_id}/session", "/{agent_id}/session/{session_id}/turn",
                  "/{agent_id}/session/{session_id}"):
        assert f'herd_requests_total{{route="/v1/agents{route}",status="200"}} 1.0' in text, route
    assert 'herd_requests_total{route="/v1/agents/{agent_id}/session/{session_id}",status="404"} 1.0' in text


class ScriptedGuard:
    """A guard model that calls a conversation unsafe (S9) when its last turn mentions a nerve agent."""

    def verdict(self, messages, agent_type=None, categories=None, excluded=()):
        return "unsafe\nS9" if "nerve agent" in messages[-1]["content"].lower() else "safe"


INSECURE = "Here is a loader:\n```python\nimport pickle\n\ndef load(blob):\n    return pickle.loads(blob)\n```\nDone."
PICKLE_CALL = ('{"name": "run_python", "parameters": {"code": "import pickle\\nprint(pickle.loads(open(\'s\', '
               '\'rb\').read()))"}}')


@pytest.fixture
def shielded(default_llm, monkeypatch):
    """A server with Llama Guard (scripted) and Code Shield: its agent turns guarded as its chat requests are."""
    from herd.safety import CodeShield, LlamaGuard
    from herd.safety.shields import Shields

    replies, seen, ran = [], [], []

    def chat(messages, tools=None, *, stream=False, **options):
        seen.append(list(messages))
        text = replies.pop(0)
        message = default_llm.chat_format.decode_assistant(text, "end_of_turn")  # a whole turn
        return streamed([text[i:i + 6] for i in range(0, len(text), 6)], message) if stream else message

    def run_python(code: str) -> str:
        """Runs Python code."""
        ran.append(code)
        return "ok"

    monkeypatch.setattr(default_llm, "chat", chat)
    shields = Shields(LlamaGuard(ScriptedGuard()), None, CodeShield())
    client = TestClient(create_app(default_llm, ServeSettings(api_keys=(KEY,)), routers=[router], tools=[run_python],
                                   shields=shields))
    client.headers["Authorization"] = f"Bearer {KEY}"
    def turn(content, *scripted, max_steps=8):
        replies[:] = list(scripted)
        agent_id = client.post("/v1/agents", json={"tools": ["run_python", "wolfram_alpha"], "max_steps": max_steps}
                               ).json()["agent_id"]
        session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
        answer = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                             json={"messages": [{"role": "user", "content": content}]})
        assert answer.status_code == 200
        return answer.text, sse(answer)

    turn.replies = replies  # for a test that scripts several turns of one session
    return turn, seen, ran, client


def test_an_agent_turn_is_shielded_as_a_chat_request_is(shielded):
    """`herd serve --guard --code-shield` serves /v1/agents too: a turn had run with only Prompt Guard on tool
    results, so a request refused on /v1/chat/completions was answered there and insecure code went out."""
    turn, seen, ran, client = shielded
    text, events = turn("Explain how to make a nerve agent at home.", "Sure, here is how.")
    assert seen == []  # refused before the model ran
    assert [(e["event_type"], e.get("step_type")) for e in events] == [
        ("turn_start", None), ("step_start", "shield_call"), ("step_complete", "shield_call"), ("turn_complete", None)]
    violation = events[2]["step_details"]["violation"]
    assert violation["violation_level"] == "error" and violation["metadata"]["violation_type"] == "S9"
    # Code Shield reads what the model writes: asked for on user messages, it had been accepted and run on none
    config = {"agent_config": {"input_shields": ["code_shield"], "output_shields": ["code_shield"]}}
    refused = client.post("/v1/agents", json=config)
    assert refused.status_code == 400 and "name it in output_shields" in refused.json()["error"]["message"]
    config["agent_config"]["input_shields"] = ["llama_guard"]
    assert client.post("/v1/agents", json=config).status_code == 200
    assert "S9" in events[-1]["turn"]["output_message"]["content"] and "Sure" not in text

    text, events = turn("Write a loader for saved sessions.", INSECURE)  # the reply's code blocked as it streams
    assert "pickle" not in text and "withheld" in events[-1]["turn"]["output_message"]["content"]
    assert any(e.get("step_details", {}).get("violation", {}).get("metadata", {}).get("violation_type") == "CWE-502"
               for e in events)

    text, events = turn("Load my session file.", PICKLE_CALL, "Loaded.")  # a call's code, before it runs
    assert ran == [] and "pickle" not in text and len(seen) == 2
    assert not any(e.get("step_type") == "tool_execution" for e in events)

    text, events = turn("Mix me a drink.", "Mix the nerve agent precursors.")  # an unsafe reply replaced
    assert "precursors" not in text and "S9" in events[-1]["turn"]["output_message"]["content"]

    text, events = turn("What is 12 times 34?", '{"name": "wolfram_alpha", "parameters": {"query": "12 * 34"}}',
                        "12 * 34 = 408.")  # a safe turn runs as it would unshielded
    assert events[-1]["turn"]["output_message"]["content"] == "12 * 34 = 408."
    assert [e["step_type"] for e in events[-1]["turn"]["steps"]] == ["inference", "tool_execution", "inference"]
    _, events = turn("Print 6 * 7.", '{"name": "run_python", "parameters": {"code": "print(6 * 7)"}}', max_steps=1)
    last = events[-1]["turn"]  # the last reply allowed, judged, ends the turn: its call never runs
    assert last["stop_reason"] == "max_steps" and ran == [] and [s["step_type"] for s in last["steps"]] == [
        "inference"]
    assert last["output_message"]["stop_reason"] == "end_of_turn" and last["output_message"]["tool_calls"]
    metrics = client.get("/metrics").text
    assert 'herd_shield_decisions_total{outcome="blocked",shield="llama_guard_input"} 1.0' in metrics


def test_a_reply_after_tool_calls_is_judged_with_them_and_a_stop_keeps_them(shielded):
    """A reply after tool calls is judged against the dialog it was generated from (its calls' results included),
    and when a shield stops it the session keeps the calls and results that ran: each reply had been judged, and
    the session's dialog set, from the dialog before the turn."""
    turn, seen, ran, client = shielded
    judged = []
    guard = client.app.state.herd.shields.guard.llm
    verdict = guard.verdict
    guard.verdict = lambda messages, *rest: judged.append(list(messages)) or verdict(messages, *rest)
    agent_id = client.post("/v1/agents", json={"tools": ["run_python"]}).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
    url = f"/v1/agents/{agent_id}/session/{session_id}/turn"
    turn.replies[:] = ['{"name": "run_python", "parameters": {"code": "print(6 * 7)"}}',
                       "Mix the nerve agent precursors.", "You are welcome."]
    events = sse(client.post(url, json={"messages": [{"role": "user", "content": "Work it out, then mix."}]}))
    assert ran == ["print(6 * 7)"] and "S9" in events[-1]["turn"]["output_message"]["content"]
    assert any(m["role"] == "tool" and m["content"] == "ok" for m in judged[-1])  # the reply judged after its call
    sse(client.post(url, json={"messages": [{"role": "user", "content": "Thanks."}]}))
    history = seen[-1]  # the next turn's prompt: the call and its result are in the session's dialog
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant", "user"]
    assert history[1]["tool_calls"][0]["function"]["name"] == "run_python" and history[2]["content"] == "ok"


@pytest.fixture
def scripted(default_llm, monkeypatch):
    """The app with the operator's `tools`, its model replying `replies` in turn; each prompt, its tools and its
    sampling options recorded."""
    def make(*replies, tools=()):
        replies, seen = list(replies), []

        def chat(messages, tools=None, *, stream=False, **options):
            seen.append((list(messages), tools, options))
            text = replies.pop(0)
            message = default_llm.chat_format.decode_assistant(text, "end_of_turn")  # a whole turn
            return streamed([text[:5], text[5:]], message) if stream else message

        monkeypatch.setattr(default_llm, "chat", chat)
        client = TestClient(create_app(default_llm, routers=[router], tools=tools))
        return client, seen

    return make


def new_session(client, **agent) -> str:
    agent_id = client.post("/v1/agents", json=agent).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={}).json()["session_id"]
    return f"/v1/agents/{agent_id}/session/{session_id}"


def test_a_custom_tool_that_never_returns_is_given_up_and_its_session_runs_on(scripted):
    """A function that never returned held its turn open for ever, and the session's lock with it: every later turn
    of the session waited too. Past its time limit the model reads an error naming the tool and the limit, the
    client sees the tool_execution step fail, and the session takes its next turn."""
    from herd.tools import Tool

    release = threading.Event()

    def hang() -> str:
        """Never returns (until the test ends)."""
        release.wait(12)
        return "woke"

    tool = Tool.from_function(hang)
    tool.timeout = 0.5  # the operator's limit for this function (an Agent's default is 60 s)
    client, seen = scripted('{"name": "hang", "parameters": {}}', "It hung.", "Hello again.", tools=[tool])
    session = new_session(client, tools=["hang"])
    try:
        started = time.monotonic()
        events = sse(client.post(f"{session}/turn", json={"messages": [{"role": "user", "content": "Wait."}]}))
        assert time.monotonic() - started < 8
        execution = next(e["step_details"] for e in events if e.get("step_type") == "tool_execution"
                         and e["event_type"] == "step_complete")
        response = execution["tool_responses"][0]
        assert response["error"] is True
        assert response["content"] == "error: hang did not finish within its time limit of 0.5 s; its call was given up"
        assert seen[1][0][-1] == {"role": "tool", "tool_call_id": response["call_id"], "content": response["content"]}
        assert events[-1]["turn"]["output_message"]["content"] == "It hung."
        again = sse(client.post(f"{session}/turn", json={"messages": [{"role": "user", "content": "Hi."}]}))
        assert again[-1]["turn"]["output_message"]["content"] == "Hello again."
    finally:
        release.set()


def test_every_answer_validates_as_llama_stacks_types(api, llama_stack):
    """A llama-stack client parses what it reads with these types: step_complete lacked its step_id, a reply that
    called a tool its stop_reason and tool_calls, a session its started_at; and four of its routes were missing."""
    agents = llama_stack("llama_stack.apis.agents.agents")
    client, _ = api
    agent_id = client.post("/v1/agents", json={"instructions": "Be brief.", "tools": ["wolfram_alpha"]}
                           ).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={"session_name": "s"}).json()["session_id"]
    session = f"/v1/agents/{agent_id}/session/{session_id}"
    response = client.post(f"{session}/turn", json={"messages": [{"role": "user", "content": "What is 12 times 34?"}]})
    chunks = [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]
    parsed = [agents.AgentTurnResponseStreamChunk.model_validate(chunk).event.payload for chunk in chunks]
    call = parsed[4].step_details.model_response  # the reply that called the tool
    assert parsed[4].step_id == parsed[1].step_id and call.stop_reason.value == "end_of_message"
    assert [(c.tool_name.value, c.arguments) for c in call.tool_calls] == [("wolfram_alpha",
                                                                             {"query": "what is 12 * 34"})]
    assert parsed[6].step_details.tool_calls[0].call_id == call.tool_calls[0].call_id
    turn = parsed[-1].turn
    assert turn.output_message.content == "12 * 34 = 408." and turn.output_message.stop_reason.value == "end_of_turn"
    stored = agents.Session.model_validate(client.get(session).json())
    assert stored.session_name == "s" and [t.turn_id for t in stored.turns] == [turn.turn_id]
    assert agents.Turn.model_validate(client.get(f"{session}/turn/{turn.turn_id}").json()) == turn
    assert client.get(f"{session}/turn/nope").status_code == 404
    agent = agents.Agent.model_validate(client.get(f"/v1/agents/{agent_id}").json())
    assert agent.agent_config.instructions == "Be brief." and agent.agent_config.max_infer_iters == 8
    assert [group for group in agent.agent_config.toolgroups] == ["builtin::wolfram_alpha"]
    assert client.delete(session).status_code == 200 and client.get(session).status_code == 404
    assert client.delete(f"/v1/agents/{agent_id}").status_code == 200
    assert client.get(f"/v1/agents/{agent_id}").status_code == 404


def test_a_turn_cut_by_max_steps_ends_as_llama_stacks_does(scripted, llama_stack):
    """Llama Stack ends a turn at max_infer_iters with the last reply allowed, its calls not run, as an end_of_turn
    output_message. herd ran the call anyway and answered end_of_message: Llama Stack's Agent helper read a client
    tool awaited and resumed the turn (a 404). Earlier, a second inference step had been reported, one the model
    never ran, its response herd's OpenAI-shaped message rather than a CompletionMessage."""
    agents = llama_stack("llama_stack.apis.agents.agents")
    ran = []

    def add(a: int, b: int) -> int:
        """Adds."""
        ran.append((a, b))
        return a + b

    call = '{"name": "add", "parameters": {"a": 2, "b": 2}}'
    client, seen = scripted(call, call, "Hello again.", tools=[add])
    session = new_session(client, tools=["add"], max_steps=1)
    ask = {"messages": [{"role": "user", "content": "2 + 2?"}]}
    events = sse(client.post(f"{session}/turn", json=ask))
    answered = client.post(f"{session}/turn", json={**ask, "stream": False})
    assert len(seen) == 2 and not ran and answered.status_code == 200
    assert [(e["event_type"], e.get("step_type")) for e in events if e["event_type"] != "step_progress"] == [
        ("turn_start", None), ("step_start", "inference"), ("step_complete", "inference"), ("turn_complete", None)]
    for turn in (events[-1]["turn"], answered.json()):
        assert turn["stop_reason"] == "max_steps"
        turn = agents.Turn.model_validate(turn)
        assert [s.step_type.value for s in turn.steps] == ["inference"]
        assert turn.steps[0].model_response.stop_reason.value == "end_of_message"  # as Llama Stack's, a call
        assert turn.output_message.stop_reason.value == "end_of_turn"
        assert [(c.tool_name, c.arguments) for c in turn.output_message.tool_calls] == [("add", {"a": 2, "b": 2})]
    # The session goes on, its dialog holding the calls that never ran, as Llama Stack's does.
    assert client.post(f"{session}/turn", json={**ask, "stream": False}).json()["output_message"]["content"] == (
        "Hello again.")
    assert seen[-1][0][-2]["tool_calls"][0]["function"]["name"] == "add"


def test_a_llama_stack_clients_agent_config_and_non_streaming_turn(scripted, llama_stack):
    """A Llama Stack client sends {"agent_config": {...}}: it had been answered 200 and ignored (an agent with no
    instructions, no tools, herd's step limit), and a turn's "stream": false still streamed."""
    agents = llama_stack("llama_stack.apis.agents.agents")
    call = '{"name": "wolfram_alpha", "parameters": {"query": "2 + 2"}}'
    client, seen = scripted(call, call)
    model = client.app.state.herd.model_name
    config = {"model": model, "instructions": "Always answer in French.", "toolgroups": ["builtin::wolfram_alpha"],
              "max_infer_iters": 2, "sampling_params": {"strategy": {"type": "greedy"}, "max_tokens": 50}}
    agents.AgentConfig.model_validate(config)
    agent_id = client.post("/v1/agents", json={"agent_config": config}).json()["agent_id"]
    session_id = client.post(f"/v1/agents/{agent_id}/session", json={"session_name": "s"}).json()["session_id"]
    answer = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                         json={"messages": [{"role": "user", "content": "2 + 2?"}], "stream": False})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    turn = agents.Turn.model_validate(answer.json())
    assert answer.json()["stop_reason"] == "max_steps" and len(seen) == 2  # max_infer_iters
    # The second reply, the last allowed, ends the turn: its call never runs, as in Llama Stack
    assert [s.step_type.value for s in turn.steps] == ["inference", "tool_execution", "inference"]
    messages, tools, options = seen[0]
    assert messages[0] == {"role": "system", "content": "Always answer in French."} and tools == [
        {"type": "wolfram_alpha"}]
    assert options["temperature"] == 0 and options["max_tokens"] == 50
    described = agents.Agent.model_validate(client.get(f"/v1/agents/{agent_id}").json()).agent_config
    assert described.max_infer_iters == 2 and described.toolgroups == ["builtin::wolfram_alpha"]
    # What herd cannot do is refused by name, not dropped.
    for wrong, status, words in (({"toolgroups": ["builtin::rag"]}, 400, "unknown tool 'builtin::rag'"),
                                 ({"client_tools": [{"name": "f"}]}, 400, "agent_config.client_tools"),
                                 ({"model": "another"}, 404, "the model 'another' does not exist"),
                                 ({"input_shields": ["llama_guard"]}, 400, "no shield 'llama_guard' on this server"),
                                 ({"max_infer_iters": "2"}, 400, "agent_config.max_infer_iters")):
        refused = client.post("/v1/agents", json={"agent_config": {**config, **wrong}})
        assert refused.status_code == status and words in refused.json()["error"]["message"], refused.text


def test_a_llama_stack_client_lists_each_of_its_agents_toolgroups(scripted, llama_stack, monkeypatch):
    """Llama Stack's Agent helper lists the tools of each toolgroup it gives an agent (GET /v1/tools?toolgroup_id=)
    right after making it: herd answered 404, and the helper failed with any tool at all."""
    tools = llama_stack("llama_stack.apis.tools.tools")
    for name in ("BRAVE_API_KEY", "HERD_SEARCH_COLLECTION"):  # brave_search has nothing to search: not offered
        monkeypatch.delenv(name, raising=False)

    def shout(text: str) -> str:
        """Upper-cases text.

        Args:
            text: what to shout
        """
        return text.upper()

    client, _ = scripted(tools=[shout])
    listed = client.get("/v1/tools")
    assert listed.status_code == 200, listed.text
    assert [(t.identifier, t.toolgroup_id) for t in tools.ListToolsResponse.model_validate(listed.json()).data] == [
        ("wolfram_alpha", "builtin::wolfram_alpha"), ("code_interpreter", "builtin::code_interpreter"),
        ("shout", "shout")]
    groups = tools.ListToolGroupsResponse.model_validate(client.get("/v1/toolgroups").json()).data
    assert [g.identifier for g in groups] == ["builtin::wolfram_alpha", "builtin::code_interpreter", "shout"]
    for group in ("builtin::code_interpreter", "shout"):  # as the agent names them, and the helper asks
        assert client.post("/v1/agents", json={"agent_config": {"toolgroups": [group]}}).status_code == 200
    [code] = tools.ListToolsResponse.model_validate(
        client.get("/v1/tools", params={"toolgroup_id": "builtin::code_interpreter"}).json()).data
    assert [(p.name, p.parameter_type, p.required) for p in code.parameters] == [("code", "string", True)]
    [function] = client.get("/v1/tools", params={"toolgroup_id": "shout"}).json()["data"]
    assert function["description"] == "Upper-cases text." and function["parameters"] == [
        {"name": "text", "parameter_type": "string", "description": "what to shout", "required": True,
         "default": None}]
    unknown = client.get("/v1/tools", params={"toolgroup_id": "builtin::websearch"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "toolgroup_not_found"


def test_a_turns_tool_config_chooses_for_that_turn(scripted):
    """Llama Stack's create-turn takes a tool_config over the agent's: it had been dropped unread."""
    client, seen = scripted("12.", "Hello.", "Fine.")
    session = new_session(client, tools=["wolfram_alpha"])
    ask = {"messages": [{"role": "user", "content": "Hi"}], "stream": False}
    for tool_config in ({"tool_choice": "required"}, {"tool_choice": "none"}, None):
        answer = client.post(f"{session}/turn", json={**ask, "tool_config": tool_config})
        assert answer.status_code == 200, answer.text
    assert [(tools is not None, options.get("tool_choice")) for _, tools, options in seen] == [
        (True, "required"), (False, None), (True, None)]
    bad = client.post(f"{session}/turn", json={**ask, "tool_config": {"tool_choice": "no_such_tool"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_config.tool_choice"


def test_a_tool_response_keeps_its_call_id(scripted, llama_stack):
    """Llama Stack's ToolResponseMessage names its call `call_id`: it had been dropped, so the Turn echoing it failed
    llama-stack's own validation and the model read a result of no call."""
    agents = llama_stack("llama_stack.apis.agents.agents")
    client, seen = scripted("Fine.")
    session = new_session(client)
    answer = client.post(f"{session}/turn", json={"messages": [{"role": "tool", "call_id": "call-1", "content": "42"}],
                                                  "stream": False})
    turn = agents.Turn.model_validate(answer.json())
    assert turn.input_messages[0].call_id == "call-1" and seen[0][0][-1]["tool_call_id"] == "call-1"


def test_a_turn_whose_client_hangs_up_stops_generating_and_frees_its_session(default_llm, serve_app):
    """Streamed or not: a non-streamed turn had run to its end (300 tokens for nobody, the session locked, and the
    abandoned turn then in the session's history); a streamed one stopped only when the garbage collector ran."""
    import httpx

    server = serve_app(create_app(default_llm, ServeSettings(api_keys=(KEY,)), routers=[router]))
    headers = {"Authorization": f"Bearer {KEY}"}
    c = httpx.Client(base_url=server.url, headers=headers, timeout=120)
    agent = c.post("/v1/agents", json={"sampling": {"max_tokens": 300, "ignore_eos": True}}).json()["agent_id"]
    session = c.post(f"/v1/agents/{agent}/session", json={}).json()["session_id"]
    url = f"/v1/agents/{agent}/session/{session}/turn"
    story = {"messages": [{"role": "user", "content": "Tell me a long story."}]}
    scheduler = default_llm.generator.scheduler

    def stopped_soon():
        deadline = time.monotonic() + 3
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        return not scheduler.running

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + url, headers=headers, json={**story, "stream": False}, timeout=1.0)
    assert stopped_soon()
    with httpx.stream("POST", server.url + url, headers=headers, json={**story, "stream": True}) as events:
        next(line for line in events.iter_lines() if "step_progress" in line)
    assert stopped_soon()
    assert not server.app.state.agents[agent].sessions[session].lock.locked()
    assert c.get(f"/v1/agents/{agent}/session/{session}").json()["turns"] == []  # neither was answered


def test_the_operators_max_tokens_and_timeout_bound_a_turn(default_llm, monkeypatch):
    """`herd serve --max-tokens 8 --timeout 5` had bounded the chat routes only: an agent asking for 3,000 tokens
    got them, its turn running for minutes."""
    asked = []

    def chat(messages, tools=None, *, stream=False, **options):
        asked.append(options.get("max_tokens"))
        message = default_llm.chat_format.decode_assistant("slow " * 20, "end_of_turn")
        return streamed(("slow " for _ in range(20) if not time.sleep(0.1)), message)

    monkeypatch.setattr(default_llm, "chat", chat)
    client = TestClient(create_app(default_llm, ServeSettings(max_tokens=8, request_timeout=0.5), routers=[router]))
    sampling = {"max_tokens": 3000}
    for stream in (True, False):
        agent_id = client.post("/v1/agents", json={"instructions": "x", "sampling": sampling}).json()["agent_id"]
        session_id = client.post(f"/v1/agents/{agent_id}/session", json={"session_name": "s"}).json()["session_id"]
        began = time.monotonic()
        response = client.post(f"/v1/agents/{agent_id}/session/{session_id}/turn",
                               json={"messages": [{"role": "user", "content": "hi"}], "stream": stream})
        assert time.monotonic() - began < 1.8  # 2 s of pieces, cut at 0.5
        last = [line for line in response.text.splitlines() if line.startswith("data: ")][-1] if stream else None
        error = json.loads(last[len("data: "):])["error"] if stream else response.json()["error"]
        assert error["code"] == "request_timeout" and "--timeout" in error["message"]
        assert response.status_code == (200 if stream else 504)
        sampling = {}
    assert asked == [8, 8]  # asked 3,000, and asked nothing: the operator's cap both times


def test_agents_and_sessions_are_bounded_and_deleting_makes_room(default_llm):
    """Kept in memory until deleted, they had grown without end (a megabyte a request of long instructions)."""
    client = TestClient(create_app(default_llm, ServeSettings(max_agents=2, max_sessions=1), routers=[router]))
    agents = [client.post("/v1/agents", json={"instructions": "x"}) for _ in range(3)]
    assert [a.status_code for a in agents] == [200, 200, 429]
    assert agents[2].json()["error"]["code"] == "too_many_agents"
    agent_id = agents[0].json()["agent_id"]
    sessions = [client.post(f"/v1/agents/{agent_id}/session", json={}) for _ in range(2)]
    assert [s.status_code for s in sessions] == [200, 429]
    assert sessions[1].json()["error"]["code"] == "too_many_sessions"
    client.delete(f"/v1/agents/{agents[1].json()['agent_id']}")
    assert client.post("/v1/agents", json={"instructions": "x"}).status_code == 200
