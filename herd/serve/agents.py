"""Agents over HTTP, in the spirit of Llama Stack's Agents API: agents, sessions, and turns streamed as step events.

    POST /v1/agents                         {"instructions", "tools", "tool_choice", "max_steps", "sampling"}
    POST /v1/agents/{agent_id}/session                    {"session_name"}            -> {"session_id"}
    POST /v1/agents/{agent_id}/session/{session_id}/turn  {"messages"}                -> text/event-stream
    GET  /v1/agents/{agent_id}/session/{session_id}       the session and its turns

Each SSE event is {"event": {"payload": {"event_type": ...}}}: turn_start, step_start / step_progress (text deltas)
/ step_complete for inference and tool_execution steps, turn_complete with the whole turn. A session keeps its
dialog; its turns run one at a time. Mounted by `create_app(..., routers=[router])`.

On a server with shields, a turn is shielded as a chat request is (see _shielded).

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
from dataclasses import dataclass, field, fields
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
    events = _turn_events(_agent(request, config), config, session, session_id, messages,
                          request.app.state.herd.shields)
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
                 messages: list[dict], shields=None) -> Iterator[dict]:
    with session.lock:
        if not session.dialog and config.instructions:
            session.dialog.append({"role": "system", "content": config.instructions})
        turn_id, started = str(uuid.uuid4()), time.time()
        yield _event("turn_start", turn_id=turn_id)
        steps: list[dict] = []
        inference, execution, text = None, None, ""
        dialog = session.dialog + messages
        for step in agent.run(dialog) if shields is None else _shielded(agent, shields, dialog):
            if isinstance(step, (ModelText, FinalAnswer)) and inference is None:  # the model's turn begins
                inference, text = _step("inference", turn_id), ""
                yield _event("step_start", step_type="inference", step_id=inference["step_id"])
            if isinstance(step, ModelText):
                text += step.text
                if step.text:
                    yield _event("step_progress", step_type="inference", step_id=inference["step_id"],
                                 delta={"type": "text", "text": step.text})
            elif isinstance(step, _ShieldCall):
                shield = {**_step("shield_call", turn_id), "violation": _violation(step.decision)}
                steps.append(shield)
                yield _event("step_start", step_type="shield_call", step_id=shield["step_id"])
                yield _event("step_complete", step_type="shield_call", step_details=shield)
                if step.stops:  # the turn ends with the shield's message as its answer, the model stopped
                    message = {"role": "assistant", "content": step.decision.message, "stop_reason": "end_of_turn",
                               "tool_calls": []}
                    if inference is not None:
                        steps.append({**inference, "model_response": message})
                        yield _event("step_complete", step_type="inference", step_details=steps[-1])
                    session.dialog = [*step.dialog, message]
                    yield from _completed(session, turn_id, session_id, messages, steps, message, "end_of_turn",
                                          started)
                    return
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
                yield from _completed(session, turn_id, session_id, messages, steps, step.message, step.stop_reason,
                                      started)


def _completed(session: _Session, turn_id: str, session_id: str, messages: list[dict], steps: list[dict],
               message: dict, stop_reason: str, started: float) -> Iterator[dict]:
    turn = {"turn_id": turn_id, "session_id": session_id, "input_messages": messages, "steps": steps,
            "output_message": message, "stop_reason": stop_reason, "started_at": started, "completed_at": time.time()}
    session.turns.append(turn)
    yield _event("turn_complete", turn=turn)


@dataclass
class _ShieldCall:
    decision: Any  # herd.safety.shields.Decision
    stops: bool = False  # the turn ends here
    # the session's dialog before the turn's answer, when it stops: the calls and results that ran included
    dialog: list[dict] = field(default_factory=list)


def _shielded(agent: Agent, shields, dialog: list[dict]) -> Iterator:
    """agent.run's steps with the server's shields around them, as a chat request has them (llama-stack runs its
    input and output shields on every turn): flagged tool results in the turn's messages withheld, the request
    judged before the model runs, and each reply through a ReplyFilter, held where it may yet be blocked; when it
    ends (in its calls, before they run, or as the answer) the rest goes out, or a shield ends the turn. What the
    shields decided comes as _ShieldCall steps."""
    dialog, flags = shields.screen_tool_results(dialog)
    yield from (_ShieldCall(flag) for flag in flags)
    verdict = shields.check_input(dialog)
    if not verdict.allowed:
        yield _ShieldCall(verdict, True, dialog)
        return
    run, reply, calls = agent.run(dialog), None, None
    for step in run:
        stopped = isinstance(step, FinalAnswer) and not (step.messages and step.messages[-1] is step.message)
        # a reply's later calls, their results, and a stop after them (max_steps, no room left) pass as they are
        if not (isinstance(step, ToolResult) or isinstance(step, ToolCall) and reply is None or stopped):
            first = reply is None
            if first:  # judged against the dialog it was generated from, the turn's calls and results included
                reply, text, calls = shields.reply_filter(dialog), "", None
            piece = reply.feed(step.text) if isinstance(step, ModelText) else reply.feed("", final=True)
            if reply.stopped is not None:
                run.close()  # a call whose code was blocked never runs
                yield from (_ShieldCall(d, d is reply.stopped, dialog) for d in reply.decisions)
                return
            if piece or first:  # the first piece begins the inference step, even when it is held
                text += piece
                yield ModelText(piece)
            if isinstance(step, ModelText):
                continue
            yield from (_ShieldCall(d) for d in reply.decisions)  # warnings
            reply = None
            if isinstance(step, FinalAnswer):  # the answer as it went out (with a warning, where one was added)
                message = {**step.message, "content": text}
                step = FinalAnswer(message, [*step.messages[:-1], message], step.steps, step.stop_reason)
        # the dialog grows as the agent's does, so that a shield stopping a later reply keeps what ran before it
        if isinstance(step, ToolCall):
            if calls is None:  # the reply's first call: the reply joins the dialog, its calls' results after it
                calls = {"role": "assistant", "content": "", "tool_calls": []}
                dialog = [*dialog, calls]
            calls["tool_calls"].append({"id": step.id, "type": "function", "function": {
                "name": step.name, "arguments": json.dumps(step.arguments, ensure_ascii=False)}})
        elif isinstance(step, ToolResult):
            dialog = [*dialog, agent._message(step)]
        yield step


def _violation(decision) -> dict:
    """A shield's decision as llama-stack's SafetyViolation: an error where it stopped or withheld something, a
    warning where it let the reply through."""
    return {"violation_level": "warn" if decision.allowed else "error", "user_message": decision.message,
            "metadata": {"shield": decision.shield, "categories": decision.categories,
                         **({"findings": decision.findings} if decision.findings else {})}}


def _step(kind: str, turn_id: str) -> dict:
    return {"step_id": str(uuid.uuid4()), "step_type": kind, "turn_id": turn_id}


def _event(event_type: str, **payload) -> dict:
    return {"event": {"payload": {"event_type": event_type, **payload}}}
