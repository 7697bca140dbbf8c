"""Llama Stack's inference and safety APIs beside the OpenAI one, on the same engine and shields (request and
response shapes as llama-stack 0.2 defines them):

    POST /v1/inference/chat-completion  {"model_id", "messages", "sampling_params", "tools", "tool_config",
                                         "response_format", "stream", "logprobs"}
    POST /v1/inference/completion       {"model_id", "content", "sampling_params", "response_format", "stream",
                                         "logprobs"}
    POST /v1/inference/batch-chat-completion, /v1/inference/batch-completion   the same for "messages_batch" or
                                         "content_batch", every item in the engine at once, answered together
    GET  /v1/shields, /v1/shields/{id}  the server's shields: llama_guard, prompt_guard, code_shield
    POST /v1/safety/run-shield          {"shield_id", "messages", "params"} -> {"violation": null or {...}}
    GET  /v1/toolgroups, /v1/tools?toolgroup_id=...   the tools an agent may be given, as its toolgroups name them

Messages are Llama Stack's: user, system, tool (`call_id`) and assistant turns with `stop_reason` and `tool_calls`
({"call_id", "tool_name", "arguments"}); tools are built-in names (brave_search, wolfram_alpha, code_interpreter)
or `ToolDefinition`s with `param_type`d parameters, rendered in the `tool_prompt_format` asked for. Replies come
back as a `completion_message` with Llama's own stop reason (end_of_turn, end_of_message: a call awaits its
result, out_of_tokens), or streamed as start / progress / complete events, a tool call as one `tool_call` delta
once it has parsed. A shielded server runs its shields around /v1/chat/completions only, so there the inference
routes answer 403. Errors are the OpenAI API's 4xx bodies, as everywhere on this server.
"""
from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Request
from pydantic import Field, field_validator

from herd.generate import SamplingParams
from herd.serve.app import (
    Run,
    ToolStreamer,
    budget,
    collect,
    count_served,
    grammar_constraints,
    read_json,
    server_state,
    sse_response,
    token_key,
    validate,
)
from herd.serve.auth import check_key
from herd.serve.protocol import APIError, StrictModel, resource
from herd.tokenizer.tool_calls import BUILTIN_TOOLS, call_schema
from herd.tools import ToolError, builtin_tool

router = APIRouter(prefix="/v1")


class TextItem(StrictModel):
    type: Literal["text"]
    text: str


Content = Union[str, TextItem, list[TextItem]]


class UserMessage(StrictModel):
    role: Literal["user"]
    content: Content
    context: Content | None = None


class SystemMessage(StrictModel):
    role: Literal["system"]
    content: Content


class ToolResponseMessage(StrictModel):
    role: Literal["tool"]
    call_id: str
    content: Content


class ToolCall(StrictModel):
    call_id: str
    tool_name: str
    arguments: Union[str, dict[str, Any]]


class CompletionMessage(StrictModel):
    null_means_default = frozenset({"tool_calls"})
    role: Literal["assistant"]
    content: Content = ""
    stop_reason: Literal["end_of_turn", "end_of_message", "out_of_tokens"] = "end_of_turn"
    tool_calls: list[ToolCall] = Field(default_factory=list)


Message = Annotated[Union[UserMessage, SystemMessage, ToolResponseMessage, CompletionMessage],
                   Field(discriminator="role")]


class Strategy(StrictModel):
    type: Literal["greedy", "top_p", "top_k"] = "greedy"
    temperature: float | None = Field(None, gt=0, le=2, strict=False)
    top_p: float | None = Field(0.95, gt=0, le=1, strict=False)
    top_k: int | None = Field(None, ge=1)


class Sampling(StrictModel):
    strategy: Strategy = Field(default_factory=Strategy)
    max_tokens: int | None = Field(0, ge=0)  # 0: as many as the context (and the server's limit) allow
    repetition_penalty: float | None = Field(1.0, gt=0, strict=False)
    stop: list[str] | None = Field(None, max_length=4)


# Llama Stack's examples name parameter types as Python does ("str", "int") as often as JSON Schema does ("string").
_PARAM_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
                "dict": "object", **{kind: kind for kind in ("string", "integer", "number", "boolean", "array",
                                                              "object", "null")}}


class ToolParam(StrictModel):
    null_means_default = frozenset({"required"})
    param_type: str
    description: str | None = None
    required: bool = True
    default: Any = None

    @field_validator("param_type")
    @classmethod
    def _known(cls, value: str) -> str:
        # Checked whatever the tool_choice: an unknown type had gone into the tool prompt unchecked under "auto".
        if value not in _PARAM_TYPES:
            raise ValueError(f"unknown param_type {value!r}: use one of {', '.join(_PARAM_TYPES)}")
        return value


class ToolDefinition(StrictModel):
    tool_name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")  # as OpenAI's function names
    description: str | None = None
    parameters: dict[str, ToolParam] | None = None


class ToolConfig(StrictModel):
    null_means_default = frozenset({"tool_choice", "system_message_behavior"})
    tool_choice: str = "auto"  # auto, required, none or a tool's name
    tool_prompt_format: Literal["json", "function_tag", "python_list"] | None = None
    system_message_behavior: Literal["append", "replace"] = "append"


class ResponseFormat(StrictModel):
    type: Literal["json_schema", "grammar"]
    json_schema: dict[str, Any] | None = None


class LogProbConfig(StrictModel):
    null_means_default = frozenset({"top_k"})
    top_k: int = Field(0, ge=0, le=20)


class _Inference(StrictModel):
    # As llama-stack's own request types have them: null is each one's default.
    null_means_default = frozenset({"sampling_params", "stream"})
    model_id: str
    sampling_params: Sampling = Field(default_factory=Sampling)
    response_format: ResponseFormat | None = None
    stream: bool = False
    logprobs: LogProbConfig | None = None


class _Chat(_Inference):
    null_means_default = _Inference.null_means_default | {"tools"}
    tools: list[ToolDefinition] = Field(default_factory=list)
    tool_config: ToolConfig | None = None

    @field_validator("tools")
    @classmethod
    def _distinct(cls, tools: list[ToolDefinition]) -> list[ToolDefinition]:
        names = [tool.tool_name for tool in tools]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"tool {twice[0]!r} is defined twice: a call of it would be ambiguous")
        return tools

    def config(self) -> ToolConfig:
        return self.tool_config or ToolConfig()


class ChatCompletionRequest(_Chat):
    messages: list[Message] = Field(min_length=1)
    tool_choice: str | None = None  # the older place for tool_config's fields
    tool_prompt_format: Literal["json", "function_tag", "python_list"] | None = None

    def config(self) -> ToolConfig:
        return self.tool_config or ToolConfig(tool_choice=self.tool_choice or "auto",
                                              tool_prompt_format=self.tool_prompt_format)


class CompletionRequest(_Inference):
    content: Content


class BatchChatCompletionRequest(_Chat):
    messages_batch: list[Annotated[list[Message], Field(min_length=1)]] = Field(min_length=1)


class BatchCompletionRequest(_Inference):
    content_batch: list[Content] = Field(min_length=1)


class RunShieldRequest(StrictModel):
    shield_id: str
    messages: list[Message] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


# -- requests to the engine ----------------------------------------------------------------------------------

def _text(content: Content | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(item.text for item in (content if isinstance(content, list) else [content]))


def _message(message: Message) -> dict[str, Any]:
    """A Llama Stack message as herd's chat format takes it."""
    if isinstance(message, CompletionMessage):
        calls = [{"id": c.call_id, "type": "function", "function": {
            "name": c.tool_name, "arguments": c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments)}}
            for c in message.tool_calls]
        return {"role": "assistant", "content": _text(message.content), "tool_calls": calls,
                "stop_reason": message.stop_reason}
    out = {"role": message.role, "content": _text(message.content)}
    if isinstance(message, UserMessage) and message.context is not None:
        out["context"] = _text(message.context)
    return out


def _tool(tool: ToolDefinition, json_types: bool = False) -> str | dict[str, Any]:
    """A built-in's name, or a custom tool as the OpenAI function herd's tool prompts render: its types as given
    (the prompt Meta's reference renders), or, for the grammar that enforces a call, as JSON Schema names them."""
    if tool.tool_name in BUILTIN_TOOLS:
        return tool.tool_name
    params = tool.parameters or {}
    properties = {name: {"type": _PARAM_TYPES[p.param_type] if json_types else p.param_type,
                         **({"description": p.description} if p.description else {}),
                         **({"default": p.default} if p.default is not None else {})} for name, p in params.items()}
    return {"type": "function", "function": {
        "name": tool.tool_name, "description": tool.description or "",
        "parameters": {"type": "object", "properties": properties,
                       "required": [name for name, p in params.items() if p.required]}}}


def _sampling(body: _Inference, max_tokens: int) -> SamplingParams:
    s, strategy = body.sampling_params, body.sampling_params.strategy
    try:
        return SamplingParams(max_tokens=max_tokens,
                              temperature=0.0 if strategy.type == "greedy" else strategy.temperature or 1.0,
                              top_p=(strategy.top_p or 1.0) if strategy.type == "top_p" else 1.0,
                              top_k=(strategy.top_k or 0) if strategy.type == "top_k" else 0,
                              repetition_penalty=s.repetition_penalty or 1.0, stop=tuple(s.stop or ()),
                              logprobs=body.logprobs.top_k if body.logprobs else None)
    except ValueError as error:  # what SamplingParams itself refuses (an empty stop string)
        raise APIError(400, str(error), param="sampling_params", code="invalid_value") from None


def _schema_of(body: _Inference) -> dict[str, Any] | None:
    form = body.response_format
    if form is None:
        return None
    if form.type == "grammar":
        raise APIError(400, "BNF grammars are not supported: use a json_schema response format",
                       param="response_format")
    return form.json_schema or {}


async def _parse(request: Request, model: type) -> Any:
    data = await read_json(request)
    if server_state(request).shields is not None:
        # The shields screen the OpenAI chat route only: a guarded server keeps no unguarded door open.
        raise APIError(403, "this server runs with safety shields, which screen /v1/chat/completions only",
                       type="permission_error", code="shielded_server")
    return await validate(request, model, data, "model_id")


# -- replies -------------------------------------------------------------------------------------------------

def _logprobs(tok, logprobs) -> list[dict[str, Any]]:
    """Each token's log-probability and its alternatives', by their text (TokenLogProbs)."""
    return [{"logprobs_by_token": {token_key(tok, lp.token): lp.logprob,
                                   **{token_key(tok, t): v for t, v in lp.top.items()}}} for lp in logprobs]


def _ls_call(call: dict[str, Any]) -> dict[str, Any]:
    return ls_call(call["id"], call["function"]["name"], json.loads(call["function"]["arguments"]))


def ls_call(call_id: str, name: str, arguments: Any) -> dict:
    """A call as llama-stack's ToolCall, its arguments also as JSON text (arguments_json)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"call_id": call_id, "tool_name": name, "arguments": arguments if _shallow(arguments) else text,
            "arguments_json": text}


def _shallow(arguments: Any) -> bool:
    """Whether llama-stack's ToolCall takes `arguments` as an object: values nested one level at most (its
    RecursiveType); deeper ones (a matrix) go as text, which it takes too."""
    def primitive(value):
        return value is None or isinstance(value, (str, int, float, bool))

    return isinstance(arguments, dict) and all(
        primitive(v) or isinstance(v, list) and all(map(primitive, v))
        or isinstance(v, dict) and all(map(primitive, v.values())) for v in arguments.values())


def _metrics(prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any]]:
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens}
    return [{"metric": name, "value": value, "unit": None} for name, value in counts.items()]


def _event(kind: str, delta: dict[str, Any], **extra) -> dict[str, Any]:
    return {"event": {"event_type": kind, "delta": delta, **extra}}


class _Chats:
    """Conversations of one chat request (one, or a batch), as prompts with the request's tools, and their
    replies (`await _Chats(...).start(request)` puts them in the engine)."""

    def __init__(self, request: Request, body: _Chat, conversations: list[list[Message]]):
        self.state, self.llm = server_state(request), server_state(request).llm
        config = body.config()
        if config.system_message_behavior == "replace":
            raise APIError(400, "system_message_behavior 'replace' is not supported: the tool instructions are "
                                "added to the system prompt (append)", param="tool_config")
        if not body.tools and config.tool_choice not in ("auto", "none"):
            raise APIError(400, f"tool_choice {config.tool_choice!r} needs tools", param="tool_config.tool_choice")
        self.tools = [_tool(t) for t in body.tools] if body.tools and config.tool_choice != "none" else []
        try:
            self.prompts = [self.llm.chat_prompt([_message(m) for m in messages], self.tools or None,
                                                 config.tool_prompt_format or "json") for messages in conversations]
        except (ValueError, KeyError, TypeError) as error:
            raise APIError(400, f"the messages cannot be encoded: {error}", param="messages") from None
        schema, self.schema_param = _schema_of(body), "response_format"
        if self.tools and config.tool_choice not in ("auto", "none"):
            self.schema_param = "tools"
            try:
                schema = call_schema([_tool(t, json_types=True) for t in body.tools],
                                     None if config.tool_choice == "required" else config.tool_choice)
            except ValueError as error:
                raise APIError(400, str(error), param="tool_config.tool_choice") from None
        self.schema, self.body = schema, body
        self.max_tokens = budget(self.state, self.prompts, body.sampling_params.max_tokens or None)
        self.logprobs = body.logprobs is not None

    async def start(self, request: Request) -> _Chats:
        constraints = await grammar_constraints(self.state, self.schema, len(self.prompts), self.schema_param)
        self.run = Run(request, self.prompts, _sampling(self.body, self.max_tokens), 1, constraints)
        return self

    async def replies(self, request: Request) -> list[dict[str, Any]]:
        """Every conversation's ChatCompletionResponse."""
        out = []
        for prompt, choice in zip(self.prompts, await collect(self.run, request, len(self.prompts))):
            stop = self.llm.stop_reason(choice["finish_reason"], choice["stop_token"])
            message = {"role": "assistant", "content": choice["text"], "stop_reason": stop, "tool_calls": []}
            if self.tools:
                parsed = self.llm.reply_message(choice["text"], choice["tokens"], choice["finish_reason"],
                                                choice["stop_token"])
                if parsed["tool_calls"]:
                    message.update(content=parsed["content"], tool_calls=[_ls_call(c) for c in parsed["tool_calls"]])
            out.append({"completion_message": message,
                        "logprobs": _logprobs(self.llm.tokenizer, choice["logprobs"]) if self.logprobs else None,
                        "metrics": _metrics(len(prompt), len(choice["tokens"]))})
        count_served(request)
        return out

    async def events(self):
        llm, tok, seq = self.llm, self.llm.tokenizer, self.run.request.seqs[0]
        streamer = ToolStreamer() if self.tools else None
        yield _event("start", {"type": "text", "text": ""})
        async for d in self.run.deltas():
            text = streamer.feed(d.text, d.tokens) if streamer else d.text
            logprobs = {"logprobs": _logprobs(tok, d.logprobs)} if self.logprobs and d.logprobs else {}
            if d.finish_reason:
                stop = llm.stop_reason(d.finish_reason, d.stop_token)
                rest, calls = streamer.finish(llm, d.finish_reason, d.stop_token) if streamer else ("", [])
                if text + rest or logprobs:
                    yield _event("progress", {"type": "text", "text": text + rest}, **logprobs)
                for call in calls:
                    yield _event("progress", {"type": "tool_call", "tool_call": _ls_call(call),
                                              "parse_status": "succeeded"}, stop_reason=stop)
                yield {**_event("complete", {"type": "text", "text": ""}, stop_reason=stop),
                       "metrics": _metrics(seq.prompt_len, len(seq.generated))}
            elif text or logprobs:
                yield _event("progress", {"type": "text", "text": text}, **logprobs)


@router.post("/inference/chat-completion")
async def chat_completion(request: Request):
    body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    chats = await _Chats(request, body, [body.messages]).start(request)
    if not body.stream:
        return (await chats.replies(request))[0]
    return sse_response(request, chats.events(), done=False)


@router.post("/inference/batch-chat-completion")
async def batch_chat_completion(request: Request):
    """Every conversation in the engine at once: continuous batching does the rest."""
    body: BatchChatCompletionRequest = await _parse(request, BatchChatCompletionRequest)
    _no_stream(body)
    chats = await _Chats(request, body, body.messages_batch).start(request)
    return {"batch": await chats.replies(request)}


def _no_stream(body: _Inference) -> None:
    if body.stream:
        raise APIError(400, "the batch routes answer once, with every reply: they do not stream", param="stream")


async def _completion_run(request: Request, body: CompletionRequest | BatchCompletionRequest,
                          contents: list[Content]) -> tuple[list[list[int]], Run]:
    state = server_state(request)
    prompts = [state.llm.encode(_text(content)) for content in contents]
    field = "content_batch" if isinstance(body, BatchCompletionRequest) else "content"
    max_tokens = budget(state, prompts, body.sampling_params.max_tokens or None, field)
    constraints = await grammar_constraints(state, _schema_of(body), len(prompts))
    return prompts, Run(request, prompts, _sampling(body, max_tokens), 1, constraints)


async def _completions(request: Request, body, prompts: list[list[int]], run: Run) -> list[dict[str, Any]]:
    llm = server_state(request).llm
    out = [{"content": choice["text"],
            "stop_reason": llm.stop_reason(choice["finish_reason"], choice["stop_token"]),
            "logprobs": _logprobs(llm.tokenizer, choice["logprobs"]) if body.logprobs else None,
            "metrics": _metrics(len(prompt), len(choice["tokens"]))}
           for prompt, choice in zip(prompts, await collect(run, request, len(prompts)))]
    count_served(request)
    return out


@router.post("/inference/completion")
async def completion(request: Request):
    body: CompletionRequest = await _parse(request, CompletionRequest)
    prompts, run = await _completion_run(request, body, [body.content])
    if not body.stream:
        return (await _completions(request, body, prompts, run))[0]
    llm, seq = server_state(request).llm, run.request.seqs[0]

    async def events():
        async for d in run.deltas():
            stop = llm.stop_reason(d.finish_reason, d.stop_token) if d.finish_reason else None
            if d.text or stop or body.logprobs and d.logprobs:
                yield {"delta": d.text, "stop_reason": stop,
                       "logprobs": _logprobs(llm.tokenizer, d.logprobs) if body.logprobs else None,
                       **({"metrics": _metrics(seq.prompt_len, len(seq.generated))} if stop else {})}

    return sse_response(request, events(), done=False)


@router.post("/inference/batch-completion")
async def batch_completion(request: Request):
    body: BatchCompletionRequest = await _parse(request, BatchCompletionRequest)
    _no_stream(body)
    prompts, run = await _completion_run(request, body, body.content_batch)
    return {"batch": await _completions(request, body, prompts, run)}


# -- safety: the server's shields, one at a time -------------------------------------------------------------

def _shield(name: str) -> dict[str, Any]:
    return {**resource(name, "shield"), "params": {}}


def _names(request: Request) -> list[str]:
    """The server's shields, once the request's key is checked."""
    state = server_state(request)
    check_key(request.headers.get("authorization"), state.settings.api_keys)
    return state.shields.names if state.shields is not None else []


@router.get("/shields")
async def list_shields(request: Request):
    names = _names(request)
    count_served(request)
    return {"data": [_shield(name) for name in names]}


@router.get("/shields/{identifier}")
async def get_shield(request: Request, identifier: str):
    names = _names(request)
    if identifier not in names:
        raise APIError(404, f"no shield '{identifier}' on this server; it has {names or 'none'}",
                       param="identifier", code="shield_not_found")
    count_served(request)
    return _shield(identifier)


@router.post("/safety/run-shield")
async def run_shield(request: Request):
    body: RunShieldRequest = await validate(request, RunShieldRequest, await read_json(request), None)
    names = _names(request)
    if body.shield_id not in names:
        raise APIError(404, f"no shield '{body.shield_id}' on this server; it has {names or 'none'} "
                            "(herd serve --guard, --prompt-guard, --code-shield)", param="shield_id",
                       code="shield_not_found")
    shields = server_state(request).shields
    decision = await asyncio.to_thread(shields.run_shield, body.shield_id, [_message(m) for m in body.messages])
    count_served(request)
    if decision.allowed and not decision.findings:
        return {"violation": None}
    return {"violation": safety_violation(decision)}


def safety_violation(decision) -> dict:
    """A shield's decision as llama-stack's SafetyViolation, as run-shield answers it and an agent's shield_call step
    carries it. Llama Stack's own shields answer an unsafe verdict, an attack or insecure code with an error; a Code
    Shield warning (code that is let through) is a warning."""
    metadata = {"violation_type": ",".join(decision.categories)}
    if decision.scores:
        metadata["scores"] = decision.scores
    if decision.findings:
        metadata["findings"] = decision.findings
    return {"violation_level": "error" if not decision.allowed else "warn", "user_message": decision.message or None,
            "metadata": metadata}


# -- tools: those an agent may be given (herd.serve.agents) ---------------------------------------------------

# llama-stack's built-in tool groups, as herd's built-ins; `builtin::NAME` for herd's own names too.
TOOLGROUPS = {"builtin::websearch": "brave_search", **{f"builtin::{name}": name for name in BUILTIN_TOOLS}}
GROUPS_OF = {"brave_search": "builtin::websearch", "wolfram_alpha": "builtin::wolfram_alpha",
             "code_interpreter": "builtin::code_interpreter"}


def _offered(request: Request) -> dict[str, Any]:
    """The server's tools by name, once the request's key is checked: the built-ins it can run (brave_search needs
    a key or a collection) and the operator's functions, each its own toolgroup as agents name them."""
    state = server_state(request)
    check_key(request.headers.get("authorization"), state.settings.api_keys)
    tools = {}
    for name in GROUPS_OF:
        try:
            tools[name] = builtin_tool(name)
        except (ToolError, ValueError):
            continue
    return {**tools, **state.tools}


def _ls_tool(tool) -> dict[str, Any]:
    """A herd Tool as llama-stack's Tool, its JSON schema as ToolParameters."""
    required = tool.parameters.get("required") or []
    parameters = [{"name": name, "parameter_type": spec["type"] if isinstance(spec.get("type"), str) else "any",
                   "description": spec.get("description") or "", "required": name in required,
                   "default": spec.get("default")}
                  for name, spec in (tool.parameters.get("properties") or {}).items()]
    return {**resource(tool.name, "tool"), "toolgroup_id": GROUPS_OF.get(tool.name, tool.name),
            "description": tool.description, "parameters": parameters, "metadata": None}


@router.get("/toolgroups")
async def list_toolgroups(request: Request):
    tools = await asyncio.to_thread(_offered, request)
    count_served(request)
    return {"data": [{**resource(GROUPS_OF.get(name, name), "tool_group"), "args": None, "mcp_endpoint": None}
                     for name in tools]}


@router.get("/tools")
async def list_tools(request: Request, toolgroup_id: str | None = None):
    """Llama Stack's client lists each toolgroup's tools as it makes an agent with any: a 404 here had failed it."""
    tools = await asyncio.to_thread(_offered, request)
    if toolgroup_id is not None:
        name = TOOLGROUPS.get(toolgroup_id, toolgroup_id)
        if name not in tools:
            groups = [GROUPS_OF.get(n, n) for n in tools]
            raise APIError(404, f"no toolgroup '{toolgroup_id}' on this server; it has {groups or 'none'}",
                           param="toolgroup_id", code="toolgroup_not_found")
        tools = {name: tools[name]}
    count_served(request)
    return {"data": [_ls_tool(tool) for tool in tools.values()]}
