"""Agents over HTTP, in the spirit of Llama Stack's Agents API: agents, sessions, and turns streamed as step events.

    POST /v1/agents                         {"instructions", "tools", "tool_choice", "max_steps", "sampling"}
    POST /v1/agents/{agent_id}/session                    {"session_name"}            -> {"session_id"}
    POST /v1/agents/{agent_id}/session/{session_id}/turn  {"messages"}                -> text/event-stream
    GET  /v1/agents/{agent_id}/session/{session_id}       the session and its turns

Each SSE event is {"event": {"payload": {"event_type": ...}}}: turn_start, step_start / step_progress (text deltas)
/ step_complete for inference and tool_execution steps, turn_complete with the whole turn. A session keeps its
dialog; its turns run one at a time. Mounted by `create_app(..., routers=[router])`.

An agent's tools are the built-in ones and the Python functions the server's operator offers
(`create_app(..., tools=[...])`, `herd serve --tools pkg.module:function`), by name: a client never names code
for the server to import and run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator

from herd.agent import Agent, FinalAnswer, ModelText, ToolCall, ToolResult
from herd.generate import ContextLengthError, SamplingParams
from herd.serve.app import count_served, read_json, validate
from herd.serve.auth import check_key
from herd.serve.protocol import APIError, Message, StrictModel, internal_error, token_bias
from herd.tokenizer.tool_calls import BUILTIN_TOOLS
from herd.tools import ToolError, builtin_tool

router = APIRouter(prefix="/v1/agents")
log = logging.getLogger("herd.serve")


class AgentConfig(StrictModel):
    instructions: str = ""
    tools: list[str] = Field(default_factory=list)  # built-in tools' names and those of the operator's functions
    tool_choice: str = "auto"  # auto, required or a tool's name: the first reply of each turn is then a call
    max_steps: int = Field(8, ge=1, le=64)
    sampling: dict[str, Any] = Field(default_factory=dict)  # SamplingParams fields

    @field_validator("sampling")
    @classmethod
    def _sampling_params(cls, sampling: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in fields(SamplingParams)}
        if unknown := sorted(set(sampling) - known):
            raise ValueError(f"unknown sampling fields {unknown}: use {sorted(known)}")
        if isinstance(sampling.get("logit_bias"), dict):  # its token ids came as JSON's string keys
            sampling = {**sampling, "logit_bias": token_bias(sampling["logit_bias"])}
        try:
            SamplingParams(**sampling)  # its own checks of the values
        except TypeError as error:  # a value of the wrong type, compared with a bound
            raise ValueError(f"sampling {sampling}: {error}") from None
        return sampling


class SessionRequest(StrictModel):
    session_name: str = ""


class TurnRequest(StrictModel):
    messages: list[Message] = Field(min_length=1)


class _Session:
    def __init__(self, name: str):
        self.name, self.dialog, self.turns, self.lock = name, [], [], threading.Lock()


def _agents(request: Request) -> dict[str, tuple[AgentConfig, dict[str, _Session]]]:
    check_key(request.headers.get("authorization"), request.app.state.herd.settings.api_keys)
    if not hasattr(request.app.state, "agents"):
        request.app.state.agents = {}
    return request.app.state.agents


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The request's body as `model`, read as every route reads one: key first, then the size limit and JSON."""
    return validate(request, model, await read_json(request), None)


def _find(request: Request, agent_id: str, session_id: str | None = None):
    agents = _agents(request)
    if agent_id not in agents:
        raise APIError(404, f"no agent {agent_id}", code="agent_not_found")
    config, sessions = agents[agent_id]
    if session_id is not None and session_id not in sessions:
        raise APIError(404, f"no session {session_id} of agent {agent_id}", code="session_not_found")
    return config, sessions, sessions.get(session_id)


@router.post("")
async def create_agent(request: Request) -> dict:
    agents = _agents(request)
    config = await _body(request, AgentConfig)
    try:
        _agent(request, config)  # a bad tool or tool_choice is a 400 now, not an error at the first turn
    except (ToolError, ValueError) as error:
        raise APIError(400, str(error), param="tools") from None
    agent_id = str(uuid.uuid4())
    agents[agent_id] = (config, {})
    count_served(request)
    return {"agent_id": agent_id}


@router.post("/{agent_id}/session")
async def create_session(request: Request, agent_id: str) -> dict:
    _, sessions, _ = _find(request, agent_id)
    body = await _body(request, SessionRequest)
    session_id = str(uuid.uuid4())
    sessions[session_id] = _Session(body.session_name)
    count_served(request)
    return {"session_id": session_id}


@router.get("/{agent_id}/session/{session_id}")
def get_session(request: Request, agent_id: str, session_id: str) -> dict:
    _, _, session = _find(request, agent_id, session_id)
    count_served(request)
    return {"session_id": session_id, "session_name": session.name, "turns": session.turns}


@router.post("/{agent_id}/session/{session_id}/turn")
async def create_turn(request: Request, agent_id: str, session_id: str) -> StreamingResponse:
    config, _, session = _find(request, agent_id, session_id)
    body = await _body(request, TurnRequest)
    messages = [m.as_dict() for m in body.messages]
    events = _turn_events(_agent(request, config), config, session, session_id, messages)
    count_served(request)  # as the other streams: a 200 once it opens, its errors its last events
    return StreamingResponse((f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in _ending_in_errors(events)),
                             media_type="text/event-stream")


def _ending_in_errors(events: Iterator[dict]) -> Iterator[dict]:
    """The stream has begun when a turn fails: the client learns of it as its last event, on an open connection."""
    try:
        yield from events
    except ContextLengthError as error:  # the session's dialog (with this turn's tool results) outgrew the model
        yield APIError(400, f"{error}, or start a new session (an agent's prompt is its session's whole dialog)",
                       code="context_length_exceeded").body()
    except Exception as error:
        log.exception("internal error in an agent's turn")
        yield internal_error(error).body()


def _agent(request: Request, config: AgentConfig) -> Agent:
    state = request.app.state.herd
    offered = [*BUILTIN_TOOLS, *state.tools]
    if unknown := [name for name in config.tools if name not in offered]:
        raise ValueError(f"unknown tool {unknown[0]!r}: this server offers {', '.join(offered)} (its operator adds "
                         "Python functions with `herd serve --tools pkg.module:function`)")
    tools = [state.tools.get(name) or builtin_tool(name) for name in config.tools]
    shields = state.shields  # Prompt Guard, when the server has it, screens every tool result
    return Agent(state.llm, tools=tools, max_steps=config.max_steps, tool_choice=config.tool_choice,
                 guard=shields.tool_guard() if shields is not None else None, **config.sampling)


def _turn_events(agent: Agent, config: AgentConfig, session: _Session, session_id: str,
                 messages: list[dict]) -> Iterator[dict]:
    with session.lock:
        if not session.dialog and config.instructions:
            session.dialog.append({"role": "system", "content": config.instructions})
        turn_id, started = str(uuid.uuid4()), time.time()
        yield _event("turn_start", turn_id=turn_id)
        steps: list[dict] = []
        inference, execution, text = _step("inference", turn_id), None, ""
        yield _event("step_start", step_type="inference", step_id=inference["step_id"])
        for step in agent.run(session.dialog + messages):
            if isinstance(step, (ModelText, FinalAnswer)) and inference is None:  # the model's turn after tools
                inference, text = _step("inference", turn_id), ""
                yield _event("step_start", step_type="inference", step_id=inference["step_id"])
            if isinstance(step, ModelText):
                text += step.text
                yield _event("step_progress", step_type="inference", step_id=inference["step_id"],
                             delta={"type": "text", "text": step.text})
            elif isinstance(step, ToolCall):
                if inference is not None:  # the model's turn ended in its calls
                    steps.append({**inference, "model_response": {"role": "assistant", "content": text}})
                    yield _event("step_complete", step_type="inference", step_details=steps[-1])
                    inference = None
                execution = {**_step("tool_execution", turn_id),
                             "tool_calls": [{"call_id": step.id, "tool_name": step.name, "arguments": step.arguments}]}
                yield _event("step_start", step_type="tool_execution", step_id=execution["step_id"])
            elif isinstance(step, ToolResult):
                execution["tool_responses"] = [{"call_id": step.call_id, "tool_name": step.name,
                                                "content": step.content, "error": step.error,
                                                "files": sorted(step.files), "flagged": step.flagged}]
                steps.append(execution)
                yield _event("step_complete", step_type="tool_execution", step_details=execution)
            elif isinstance(step, FinalAnswer):
                steps.append({**inference, "model_response": step.message})
                yield _event("step_complete", step_type="inference", step_details=steps[-1])
                session.dialog = step.messages
                turn = {"turn_id": turn_id, "session_id": session_id, "input_messages": messages, "steps": steps,
                        "output_message": step.message, "stop_reason": step.stop_reason, "started_at": started,
                        "completed_at": time.time()}
                session.turns.append(turn)
                yield _event("turn_complete", turn=turn)


def _step(kind: str, turn_id: str) -> dict:
    return {"step_id": str(uuid.uuid4()), "step_type": kind, "turn_id": turn_id}


def _event(event_type: str, **payload) -> dict:
    return {"event": {"payload": {"event_type": event_type, **payload}}}
