"""The agents endpoint: agents, sessions, and a turn streamed as Llama Stack-style step events over SSE."""
import json

import pytest
from fastapi.testclient import TestClient

from herd.serve.agents import router
from herd.serve.app import ServeSettings, create_app

KEY = "agents-key"


@pytest.fixture
def api(default_llm, monkeypatch):
    """The real app around the default model, its replies scripted (the loop, not the model, is under test)."""
    replies = ['{"name": "wolfram_alpha", "parameters": {"query": "what is 12 * 34"}}', "12 * 34 = 408."]
    seen = []

    def chat(messages, tools=None, *, stream=False, **options):
        seen.append((list(messages), tools))
        text = replies.pop(0)
        return iter([text[:5], text[5:]]) if stream else default_llm.chat_format.decode_assistant(text)

    monkeypatch.setattr(default_llm, "chat", chat)
    client = TestClient(create_app(default_llm, ServeSettings(api_keys=(KEY,)), routers=[router]))
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client, seen


def sse(response) -> list[dict]:
    return [json.loads(line[len("data: "):])["event"]["payload"] for line in response.text.splitlines()
            if line.startswith("data: ")]


def test_turn_streams_step_events_and_the_session_keeps_the_dialog(api):
    client, seen = api
    agent_id = client.post("/v1/agents", json={"instructions": "Be brief.", "tools": ["wolfram_alpha"]}).json()["agent_id"]
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
    assert client.post(f"/v1/agents/{agent_id}/session/nope/turn", json={"messages": [{"role": "user",
                                                                                      "content": "x"}]}).status_code == 404
    assert client.post(f"/v1/agents/{agent_id}/session", json={}, headers={"Authorization": "Bearer wrong"}
                       ).status_code == 401
