"""Agents over HTTP, in the spirit of Llama Stack's Agents API: agents, sessions, and turns streamed as step events.

    POST   /v1/agents                         {"instructions", "tools", "tool_choice", "max_steps", "sampling"}
                                              or Llama Stack's {"agent_config": {...}}          -> {"agent_id"}
    GET    /v1/agents/{agent_id}                                 the agent, its config as Llama Stack's AgentConfig
    DELETE /v1/agents/{agent_id}
    POST   /v1/agents/{agent_id}/session                    {"session_name"}            -> {"session_id"}
    GET    /v1/agents/{agent_id}/session/{session_id}       the session and its turns
    DELETE /v1/agents/{agent_id}/session/{session_id}
    POST   /v1/agents/{agent_id}/session/{session_id}/turn  {"messages", "stream"}      -> text/event-stream
    GET    /v1/agents/{agent_id}/session/{session_id}/turn/{turn_id}

Each SSE event is {"event": {"payload": {"event_type": ...}}}: turn_start, step_start / step_progress (text deltas)
/ step_complete for inference and tool_execution steps, turn_complete with the whole turn; each validates as
llama-stack's AgentTurnResponseStreamChunk, a session as its Session, a turn as its Turn (its replies as
CompletionMessages, their calls as ToolCalls). A turn with "stream": false is answered as one JSON Turn. A session
keeps its dialog; its turns run one at a time. Mounted by `create_app(..., routers=[router])`.

On a server with shields, a turn is shielded as a chat request is (see _shielded).

An agent's tools are the built-in ones and the Python functions the server's operator offers
(`create_app(..., tools=[...])`, `herd serve --tools pkg.module:function`), by name: a client never names code
for the server to import and run. A function gets 60 s a call unless its Tool sets its own `timeout`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from herd.agent import Agent, FinalAnswer, ModelText, ToolCall, ToolResult
from herd.generate import ContextLengthError, SamplingParams
from herd.serve.app import count_served, read_json, server_state, unless_disconnected, validate
from herd.serve.auth import check_key
from herd.serve.llama_stack import GROUPS_OF, TOOLGROUPS, Sampling, ls_call, safety_violation
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


class _ToolConfig(StrictModel):
    tool_choice: str | None = None
    tool_prompt_format: str | None = None
    system_message_behavior: str | None = None


class TurnRequest(StrictModel):
    messages: list[Message] = Field(min_length=1)
    # Llama Stack's: false answers the whole Turn as one JSON object; left out, the turn streams as it always has.
    stream: bool | None = None
    documents: list[Any] | None = None
    toolgroups: list[Any] | None = None
    tool_config: _ToolConfig | None = None  # Llama Stack's: this turn's tool_choice over the agent's

    @field_validator("messages", mode="before")
    @classmethod
    def _call_ids(cls, messages):
        # Llama Stack's ToolResponseMessage names its call `call_id` (OpenAI's tool_call_id): it had been dropped
        return [{**m, "tool_call_id": m["call_id"]} if isinstance(m, dict) and m.get("call_id") is not None
                and m.get("tool_call_id") is None else m for m in messages] if isinstance(messages, list) else messages


_STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")


class _ToolGroup(StrictModel):
    name: str
    args: dict[str, Any] | None = None


class _LlamaStackConfig(StrictModel):
    """The fields of Llama Stack's AgentConfig that herd reads, checked as every body is."""

    model: str | None = None
    instructions: str | None = None
    toolgroups: list[str | _ToolGroup] | None = None
    client_tools: list[Any] | None = None
    tool_choice: str | None = None  # deprecated there for tool_config's
    tool_config: _ToolConfig | None = None
    max_infer_iters: int | None = None
    sampling_params: Sampling | None = None
    input_shields: list[str] | None = None
    output_shields: list[str] | None = None
    response_format: Any = None


class _LlamaStackAgent(StrictModel):
    agent_config: _LlamaStackConfig


def _choosing(tools: list[str], tool_choice: str) -> tuple[list[str], str]:
    """The tools offered and the tool_choice an agent runs with; "none" is no call at all: none offered."""
    return ([], "auto") if tool_choice == "none" else (tools, tool_choice)


async def _from_llama_stack(request: Request, data: dict[str, Any]) -> dict[str, Any]:
    """Llama Stack's AgentConfig ({"agent_config": {"model", "instructions", "toolgroups", "max_infer_iters",
    "sampling_params", "tool_config"}}) as herd's: it had been ignored, and the agent made without its instructions
    or tools. What herd cannot do is refused by name rather than dropped."""
    state = server_state(request)
    config = (await validate(request, _LlamaStackAgent, data, None)).agent_config
    shields = state.shields.names if state.shields is not None else []
    if config.model not in (None, state.model_name):
        raise APIError(404, f"the model '{config.model}' does not exist; this server has '{state.model_name}'",
                       param="agent_config.model", code="model_not_found")
    if config.client_tools:
        raise APIError(400, "agent_config.client_tools are not supported: herd runs the server's tools, named in "
                       f"toolgroups ({', '.join(GROUPS_OF.values())} or an operator's function by name)",
                       param="agent_config.client_tools")
    if config.response_format:
        raise APIError(400, "agent_config.response_format is not supported", param="agent_config.response_format")
    for name in ("input_shields", "output_shields"):
        # The server's shields all run on every turn (see _shielded); one it lacks would be a promise not kept.
        if missing := [shield for shield in getattr(config, name) or [] if shield not in shields]:
            raise APIError(400, f"agent_config.{name}: no shield {missing[0]!r} on this server; it has "
                           f"{shields or 'none'}, and runs them all on every turn", param=f"agent_config.{name}")
    if "code_shield" in (config.input_shields or []):  # accepted, it had screened no user message
        raise APIError(400, "agent_config.input_shields: code_shield screens what the model writes (its replies' "
                       "code and its tool calls), not what users send; name it in output_shields",
                       param="agent_config.input_shields")
    tools = []
    for group in config.toolgroups or []:
        if isinstance(group, _ToolGroup) and group.args:
            raise APIError(400, f"toolgroup {group.name!r}: args are not supported", param="agent_config.toolgroups")
        name = group.name if isinstance(group, _ToolGroup) else group
        tools.append(TOOLGROUPS.get(name, name))
    tools, tool_choice = _choosing(tools, (config.tool_config.tool_choice if config.tool_config else None)
                                   or config.tool_choice or "auto")
    flat = {"instructions": config.instructions or "", "tools": tools, "tool_choice": tool_choice,
            # llama-stack's default when left out, as its client expects
            "max_steps": 10 if config.max_infer_iters is None else config.max_infer_iters}
    if (params := config.sampling_params) is not None:
        strategy, sampling = params.strategy, {}
        if strategy.type == "greedy":
            sampling["temperature"] = 0.0
        else:
            sampling["temperature"] = strategy.temperature or 1.0
            sampling["top_p"] = (strategy.top_p or 1.0) if strategy.type == "top_p" else 1.0
            sampling["top_k"] = (strategy.top_k or 0) if strategy.type == "top_k" else 0
        if params.max_tokens:  # 0: the server's default
            sampling["max_tokens"] = params.max_tokens
        if params.repetition_penalty is not None:
            sampling["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            sampling["stop"] = list(params.stop)
        flat["sampling"] = sampling
    return flat


def _as_llama_stack(config: AgentConfig, model_name: str) -> dict[str, Any]:
    """herd's config as Llama Stack's AgentConfig, for GET /v1/agents/{agent_id}."""
    sampling = config.sampling
    if sampling.get("temperature", SamplingParams.temperature) == 0:
        strategy = {"type": "greedy"}
    elif sampling.get("top_k"):
        strategy = {"type": "top_k", "top_k": sampling["top_k"]}
    else:
        strategy = {"type": "top_p", "temperature": sampling.get("temperature", SamplingParams.temperature),
                    "top_p": sampling.get("top_p", SamplingParams.top_p)}
    return {"model": model_name, "instructions": config.instructions,
            "toolgroups": [GROUPS_OF.get(name, name) for name in config.tools],
            "tool_config": {"tool_choice": config.tool_choice}, "max_infer_iters": config.max_steps,
            "sampling_params": {"strategy": strategy, "max_tokens": sampling.get("max_tokens", 0),
                                "repetition_penalty": sampling.get("repetition_penalty", 1.0),
                                "stop": list(sampling.get("stop") or []) or None},
            "herd": config.model_dump()}  # herd's own fields, sampling whole (a logit_bias, penalties)


class _Session:
    def __init__(self, name: str):
        self.name, self.dialog, self.turns, self.lock = name, [], [], threading.Lock()
        self.started = time.time()


@dataclass
class _Agent:
    config: AgentConfig
    sessions: dict[str, _Session] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


def _agents(request: Request) -> dict[str, _Agent]:
    check_key(request.headers.get("authorization"), request.app.state.herd.settings.api_keys)
    if not hasattr(request.app.state, "agents"):
        request.app.state.agents = {}
    return request.app.state.agents


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The request's body as `model`, read as every route reads one: key first, then the size limit and JSON."""
    return await validate(request, model, await read_json(request), None)


def _find(request: Request, agent_id: str, session_id: str | None = None):
    agents = _agents(request)
    if agent_id not in agents:
        raise APIError(404, f"no agent {agent_id}", code="agent_not_found")
    agent = agents[agent_id]
    if session_id is not None and session_id not in agent.sessions:
        raise APIError(404, f"no session {session_id} of agent {agent_id}", code="session_not_found")
    return agent.config, agent.sessions, agent.sessions.get(session_id)


@router.post("")
async def create_agent(request: Request) -> dict:
    agents = _agents(request)
    data = await read_json(request)
    if isinstance(data, dict) and "agent_config" in data:  # a Llama Stack client's body
        data = await _from_llama_stack(request, data)
    config = await validate(request, AgentConfig, data, None)
    try:
        _agent(request, config)  # a bad tool or tool_choice is a 400 now, not an error at the first turn
    except (ToolError, ValueError) as error:
        raise APIError(400, str(error), param="tools") from None
    _room(len(agents), server_state(request).settings.max_agents, "agents", "DELETE /v1/agents/{agent_id}",
          "too_many_agents")
    agent_id = str(uuid.uuid4())
    agents[agent_id] = _Agent(config)
    count_served(request)
    return {"agent_id": agent_id}


def _room(held: int, limit: int, what: str, delete: str, code: str) -> None:
    """A 429 once the server holds `limit` of these (ServeSettings.max_agents, max_sessions)."""
    if held >= limit:
        raise APIError(429, f"this server holds {held} {what}, its limit: delete some ({delete}) and make this one "
                            "again", type="rate_limit_error", code=code)


@router.get("/{agent_id}")
def get_agent(request: Request, agent_id: str) -> dict:
    _find(request, agent_id)
    agent = request.app.state.agents[agent_id]
    count_served(request)
    return {"agent_id": agent_id, "agent_config": _as_llama_stack(agent.config, server_state(request).model_name),
            "created_at": agent.created}


@router.delete("/{agent_id}")
def delete_agent(request: Request, agent_id: str) -> None:
    _find(request, agent_id)
    del request.app.state.agents[agent_id]  # a turn under way finishes; its session is gone with the agent
    count_served(request)


@router.post("/{agent_id}/session")
async def create_session(request: Request, agent_id: str) -> dict:
    _, sessions, _ = _find(request, agent_id)
    body = await _body(request, SessionRequest)
    _room(len(sessions), server_state(request).settings.max_sessions, f"sessions of agent {agent_id}",
          f"DELETE /v1/agents/{agent_id}/session/{{session_id}}", "too_many_sessions")
    session_id = str(uuid.uuid4())
    sessions[session_id] = _Session(body.session_name)
    count_served(request)
    return {"session_id": session_id}


@router.get("/{agent_id}/session/{session_id}")
def get_session(request: Request, agent_id: str, session_id: str) -> dict:
    _, _, session = _find(request, agent_id, session_id)
    count_served(request)
    return {"session_id": session_id, "session_name": session.name, "turns": session.turns,
            "started_at": session.started}


@router.delete("/{agent_id}/session/{session_id}")
def delete_session(request: Request, agent_id: str, session_id: str) -> None:
    _, sessions, _ = _find(request, agent_id, session_id)
    del sessions[session_id]
    count_served(request)


@router.get("/{agent_id}/session/{session_id}/turn/{turn_id}")
def get_turn(request: Request, agent_id: str, session_id: str, turn_id: str) -> dict:
    _, _, session = _find(request, agent_id, session_id)
    turn = next((t for t in session.turns if t["turn_id"] == turn_id), None)
    if turn is None:
        raise APIError(404, f"no turn {turn_id} in session {session_id}", code="turn_not_found")
    count_served(request)
    return turn


@router.post("/{agent_id}/session/{session_id}/turn")
async def create_turn(request: Request, agent_id: str, session_id: str):
    config, _, session = _find(request, agent_id, session_id)
    body = await _body(request, TurnRequest)
    if body.documents:
        raise APIError(400, "a turn's documents are not supported: send their text in a message", param="documents")
    if body.toolgroups:
        raise APIError(400, "a turn's toolgroups are not supported: an agent's tools are set when it is made",
                       param="toolgroups")
    if body.tool_config is not None and body.tool_config.tool_choice is not None:
        tools, tool_choice = _choosing(config.tools, body.tool_config.tool_choice)  # had been dropped unread
        config = config.model_copy(update={"tools": tools, "tool_choice": tool_choice})
    messages = [m.as_dict() for m in body.messages]
    try:
        agent = _agent(request, config)
    except (ToolError, ValueError) as error:
        raise APIError(400, str(error), param="tool_config.tool_choice") from None
    state = request.app.state.herd
    events = _ending_in_errors(_turn_events(agent, config, session, session_id, messages, state.shields,
                                            state.settings.request_timeout))
    if body.stream is False:
        return await _whole_turn(request, events)
    count_served(request)  # as the other streams: a 200 once it opens, its errors its last events
    return StreamingResponse((f"data: {json.dumps(e, ensure_ascii=False)}\n\n" async for e in _in_thread(events)),
                             media_type="text/event-stream")


async def _in_thread(events: Iterator[dict]) -> AsyncIterator[dict]:
    """A turn's events, taken on a thread of its own (the engine blocks), the turn closed the moment its reader
    stops (a client that hung up): a plain generator had been left to the garbage collector, or run to its end,
    its sequence generating for nobody and its session locked meanwhile. The close waits on that thread for the
    event in flight, which a cancelled await does not stop."""
    loop, end = asyncio.get_running_loop(), object()
    worker = ThreadPoolExecutor(1, thread_name_prefix="herd-agent-turn")
    try:
        while (event := await loop.run_in_executor(worker, next, events, end)) is not end:
            yield event
    finally:
        worker.submit(events.close)
        worker.shutdown(wait=False)


_STATUS = {"context_length_exceeded": 400, "request_timeout": 504}  # a failed turn's, by its error's code


async def _whole_turn(request: Request, events: Iterator[dict]) -> JSONResponse:
    """Llama Stack's non-streaming answer: the Turn, or the error (with its status, as nothing has been sent)."""
    async def last_event():
        last = None
        async for last in _in_thread(events):
            pass
        return last

    last = await unless_disconnected(request, last_event())
    if last is None or "error" in last:
        error = (last or internal_error(RuntimeError("the turn ended without an answer")).body())["error"]
        raise APIError(_STATUS.get(error["code"], 500), error["message"],
                       type=error["type"], param=error["param"], code=error["code"])
    count_served(request)
    return JSONResponse(last["event"]["payload"]["turn"])


def _ending_in_errors(events: Iterator[dict]) -> Iterator[dict]:
    """The stream has begun when a turn fails: the client learns of it as its last event, on an open connection."""
    try:
        yield from events
    except ContextLengthError as error:  # the session's dialog (with this turn's tool results) outgrew the model
        yield APIError(400, f"{error}, or start a new session (an agent's prompt is its session's whole dialog)",
                       code="context_length_exceeded").body()
    except APIError as error:
        yield error.body()
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
    sampling, cap = dict(config.sampling), state.settings.max_tokens  # the operator's --max-tokens, as elsewhere
    if cap is not None:
        sampling["max_tokens"] = min(sampling.get("max_tokens") or cap, cap)
    # The operator's functions get no longer than a whole request may take: the turn's --timeout is checked between
    # steps, and a function of the agent's default 60 s had run it that far past.
    return Agent(state.llm, tools=tools, max_steps=config.max_steps, tool_choice=config.tool_choice,
                 guard=shields.tool_guard() if shields is not None else None,
                 tool_timeout=min(60.0, state.settings.request_timeout), **sampling)


def _turn_events(agent: Agent, config: AgentConfig, session: _Session, session_id: str,
                 messages: list[dict], shields=None, timeout: float = math.inf) -> Iterator[dict]:
    """`timeout`: the server's --timeout, for the whole turn (its wait for the session included), as for any
    request: a turn had run its steps and tools to their end, minutes past it."""
    deadline = time.monotonic() + timeout
    with session.lock:
        if not session.dialog and config.instructions:
            session.dialog.append({"role": "system", "content": config.instructions})
        turn_id, started = str(uuid.uuid4()), time.time()
        yield _event("turn_start", turn_id=turn_id)
        steps: list[dict] = []
        inference, execution, text = None, None, ""
        dialog = session.dialog + messages
        steps_taken = agent.run(dialog) if shields is None else _shielded(agent, shields, dialog)
        for step in steps_taken:
            if time.monotonic() > deadline:
                steps_taken.close()  # its sequence stops now
                raise APIError(504, f"the turn ran past this server's limit of {timeout:g} s (--timeout); ask for "
                                    "fewer tokens or steps", type="server_error", code="request_timeout")
            # A FinalAnswer that is not the dialog's last message is the reply before a result left no room, already
            # reported with its calls: the model ran no further step.
            replied = isinstance(step, FinalAnswer) and bool(step.messages) and step.messages[-1] is step.message
            if (isinstance(step, ModelText) or replied) and inference is None:  # the model's turn begins
                inference, text = _step("inference", turn_id), ""
                yield _event("step_start", step_type="inference", step_id=inference["step_id"])
            if isinstance(step, ModelText):
                text += step.text
                if step.text:
                    yield _event("step_progress", step_type="inference", step_id=inference["step_id"],
                                 delta={"type": "text", "text": step.text})
            elif isinstance(step, _ShieldCall):
                shield = {**_step("shield_call", turn_id), "violation": safety_violation(step.decision)}
                steps.append(shield)
                yield _event("step_start", step_type="shield_call", step_id=shield["step_id"])
                yield _completed_step(shield)
                if step.stops:  # the turn ends with the shield's message as its answer, the model stopped
                    message = {"role": "assistant", "content": step.decision.message, "stop_reason": "end_of_turn",
                               "tool_calls": []}
                    if inference is not None:
                        steps.append({**inference, "model_response": message})
                        yield _completed_step(steps[-1])
                    session.dialog = [*step.dialog, message]
                    yield from _completed(session, turn_id, session_id, messages, steps, message, "end_of_turn",
                                          started)
                    return
            elif isinstance(step, ToolCall):
                if inference is not None:  # the model's turn ended in its calls
                    reply = step.reply or {"content": text, "tool_calls": []}
                    steps.append({**inference, "model_response": _completion(reply)})
                    yield _completed_step(steps[-1])
                    inference = None
                execution = {**_step("tool_execution", turn_id),
                             "tool_calls": [ls_call(step.id, step.name, step.arguments)]}
                yield _event("step_start", step_type="tool_execution", step_id=execution["step_id"])
            elif isinstance(step, ToolResult):
                execution["tool_responses"] = [{"call_id": step.call_id, "tool_name": step.name,
                                                "content": step.content, "error": step.error,
                                                "files": sorted(step.files), "flagged": step.flagged}]
                steps.append(execution)
                yield _completed_step(execution)
            elif isinstance(step, FinalAnswer):
                if inference is not None:
                    steps.append({**inference, "model_response": _completion(step.message)})
                    yield _completed_step(steps[-1])
                session.dialog = step.messages
                yield from _completed(session, turn_id, session_id, messages, steps, step.message, step.stop_reason,
                                      started)


def _completed(session: _Session, turn_id: str, session_id: str, messages: list[dict], steps: list[dict],
               message: dict, stop_reason: str, started: float) -> Iterator[dict]:
    # stop_reason is herd's own (max_steps, context_length_exceeded too); the message's is one llama-stack knows
    echoed = [{**m, "call_id": m["tool_call_id"]} if m.get("tool_call_id") else m for m in messages]
    output = _completion(message)
    # The turn is over: Llama Stack's client reads end_of_message here as a call of its own awaited, and resumes.
    if output["stop_reason"] == "end_of_message":
        output["stop_reason"] = "end_of_turn"
    turn = {"turn_id": turn_id, "session_id": session_id, "input_messages": echoed, "steps": steps,
            "output_message": output, "stop_reason": stop_reason, "started_at": started,
            "completed_at": time.time()}
    session.turns.append(turn)
    yield _event("turn_complete", turn=turn)


def _completion(message: dict) -> dict:
    """A reply as llama-stack's CompletionMessage: its calls as ToolCalls, and a stop_reason it knows."""
    calls = []
    for call in message.get("tool_calls") or ():
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError:
            arguments = call["function"]["arguments"]
        calls.append(ls_call(call["id"], call["function"]["name"], arguments))
    # A reply that calls tools ends its message, not the turn (Llama's <|eom_id|>), however its stream ended.
    reason = "end_of_message" if calls else message.get("stop_reason")
    return {"role": "assistant", "content": message.get("content") or "",
            "stop_reason": reason if reason in _STOP_REASONS else "end_of_turn", "tool_calls": calls}


def _completed_step(details: dict) -> dict:
    return _event("step_complete", step_type=details["step_type"], step_id=details["step_id"], step_details=details)


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
        # a reply's later calls, their results, and a stop after them (no room left) pass as they are
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


def _step(kind: str, turn_id: str) -> dict:
    return {"step_id": str(uuid.uuid4()), "step_type": kind, "turn_id": turn_id}


def _event(event_type: str, **payload) -> dict:
    return {"event": {"payload": {"event_type": event_type, **payload}}}
