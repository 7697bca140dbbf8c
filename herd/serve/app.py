"""The OpenAI-compatible HTTP server: FastAPI routes over the one generation engine.

`create_app(llm, settings)` builds the app from routers (the OpenAI API, Llama Stack's inference API in
herd/serve/llama_stack.py, operations, the chat page); `create_app(..., routers=[...])` mounts extra routes beside
the built-in ones.
`create_app(..., shields=...)` puts herd.safety's shields around every chat request (herd/safety/serving.py).
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from herd.bounds import AT_LEAST_ONE, POSITIVE, require
from herd.generate import ContextLengthError, Delta, QueueFullError, SamplingParams
from herd.generate.structured import GrammarError, JsonGrammars
from herd.serve.auth import check_key
from herd.serve.metrics import Metrics
from herd.surrogates import holds_lone_surrogate
from herd.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    internal_error,
    resource,
)
from herd.tokenizer.tool_calls import call_schema

log = logging.getLogger("herd.serve")
T = TypeVar("T")

STATIC = Path(__file__).parent / "static"
_CALL_OPENERS = ("{", "[", "<function", "<|python_tag|>")
_CALL_TAGS = ("<|python_tag|>", "<function=")


@dataclass
class ServeSettings:
    api_keys: tuple[str, ...] = ()
    model_name: str | None = None  # the id clients send; default: the checkpoint's name
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_tokens: int | None = None  # the most tokens one choice may generate (default: what the context allows)
    request_timeout: float = 600.0  # seconds; a request still generating then ends with what it has
    # browser origins whose pages may call the API (CORS), "*" for any; none: same-origin only (the chat page)
    allowed_origins: tuple[str, ...] = ()
    # the host names requests may be addressed to, none: any. A server on loopback names its own: a web page whose
    # name an attacker points at 127.0.0.1 (DNS rebinding) is otherwise of the same origin, and reads the answers.
    allowed_hosts: tuple[str, ...] = ()
    # the agents (/v1/agents) kept, and the sessions each keeps: until deleted they stay in memory, and a client
    # making them without end had grown the server by a megabyte a request
    max_agents: int = 1024
    max_sessions: int = 1024

    def __post_init__(self):
        # A timeout of 0 or less had every reply end empty at once; NaN had none end.
        require(self, POSITIVE, "request_timeout")
        require(self, AT_LEAST_ONE, "max_body_bytes", "max_n", "max_tokens", "max_agents", "max_sessions")
        # `--api-key "$KEY"` with KEY unset gave a server that looked protected and let an empty Bearer in
        for origin in self.allowed_origins:  # a trailing slash or a path never matches what a browser sends
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"allowed_origins: {origin!r} is not an origin; give scheme://host[:port] with no "
                                 "path (https://app.example.com), or * for any")
        if any(not key.strip() or key != key.strip() for key in self.api_keys):
            raise ValueError("api_keys: a key is empty or has spaces around it (an unset variable?); an empty key "
                             "would let any request in and a padded one none: give each key as its text")
        if not all(key.isascii() and key.isprintable() for key in self.api_keys):  # headers arrive as latin-1
            raise ValueError("api_keys: a key holds characters other than printable ASCII, which no client's "
                             "Authorization header would match; give an ASCII key")


@dataclass
class ServerState:
    llm: Any
    settings: ServeSettings
    metrics: Metrics
    grammars: JsonGrammars
    shields: Any = None  # herd.safety.shields.Shields, or None
    tools: dict[str, Any] = field(default_factory=dict)  # the operator's herd.tools.Tool functions, by name

    @property
    def model_name(self) -> str:
        return self.settings.model_name or self.llm.name


def create_app(llm, settings: ServeSettings | None = None, *, routers: list[APIRouter] = (),
               shields=None, tools=()) -> FastAPI:
    """shields: herd.safety's Shields around every chat request, their decisions in this server's /metrics;
    tools: Python functions (or herd.tools.Tool, `pkg.module:function` specs) that agents may call by name, beside
    the built-in tools."""
    settings = settings or ServeSettings()
    engine = llm.generator

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    if shields is not None:
        metrics.registry.register(shields)  # a Prometheus collector of its own decisions and latencies
    from herd.tools import as_tool

    app.state.herd = ServerState(llm, settings, metrics, llm.grammars, shields=shields,
                                 tools={tool.name: tool for tool in map(as_tool, tools)})
    from herd.serve.llama_stack import router as llama_stack_router  # it builds on this module's helpers

    for router in (openai_router, llama_stack_router, ops_router, *routers):
        app.include_router(router)
    _error_handlers(app)
    app.add_middleware(_InternalErrors)
    if settings.allowed_hosts:
        app.add_middleware(_KnownHosts, hosts=settings.allowed_hosts)
    if settings.allowed_origins:  # outermost: a browser's preflight is answered before any key is asked for
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
    return app


def server_state(request: Request) -> ServerState:
    return request.app.state.herd


def route_label(scope) -> str:
    """A request's route as its metrics count it: the route's template (/v1/models/{model_id}), never the path asked
    for, which would make a new series of every URL a client invents."""
    return getattr(scope.get("route"), "path", "unmatched")


def count_served(request: Request) -> None:
    """A 200 in herd_requests_total, whose errors the error handlers count: a route that answers without counting
    this reads as failing every time."""
    server_state(request).metrics.requests.labels(route_label(request.scope), "200").inc()


def _error_handlers(app: FastAPI) -> None:
    def answer(request: Request, error: APIError) -> JSONResponse:
        server_state(request).metrics.requests.labels(route_label(request.scope), str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return answer(request, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return answer(request, APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return answer(request, APIError(400, str(error)))


class _KnownHosts:
    """Requests addressed (Host header) to one of `hosts` only; any other is a 400."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, {host.lower() for host in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = re.sub(r":\d+$", "", Headers(scope=scope).get("host", "")).strip("[]").lower()
            if host not in self.hosts:
                error = APIError(400, f"this server answers requests to {', '.join(sorted(self.hosts))}, not to "
                                      f"{host or 'no host'}; address it by one of those names", code="unknown_host")
                return await JSONResponse(error.body(), status_code=400)(scope, receive, send)
        return await self.app(scope, receive, send)


class _InternalErrors:
    """An exception no route expected becomes an OpenAI-style 500 on a connection that stays open. (FastAPI's
    handler for Exception runs in Starlette's outermost middleware, which answers and then raises again: uvicorn
    then drops the connection, and a client's next request on it was reset.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            if started:  # part of an answer is out: only closing the connection tells the client
                raise
            log.exception("internal error answering %s %s", scope["method"], scope["path"])
            request = Request(scope, receive)
            server_state(request).metrics.requests.labels(route_label(scope), "500").inc()
            await JSONResponse(internal_error(error).body(), status_code=500)(scope, receive, send)


# -- reading requests ----------------------------------------------------------------------------------------

async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, once its key is checked and its size is within the limit; else an APIError."""
    request.state.arrived = time.perf_counter()  # what the latency metrics count from
    state = server_state(request)
    check_key(request.headers.get("authorization"), state.settings.api_keys)
    # A web page may send any site a text/plain or form body without asking it first (CORS lets such "simple"
    # requests through); only a JSON body, which needs the server's consent, is read.
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request body must be sent as application/json, not {media_type or 'no type'}; "
                            "set the header Content-Type: application/json", code="unsupported_media_type")
    limit = state.settings.max_body_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    except ClientDisconnect:  # gone before it finished asking: nobody to answer, nothing for the log
        raise APIError(499, "the client closed the connection while sending the request",
                       code="client_closed_request") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if holds_lone_surrogate(body, data):
        raise APIError(400, "the request body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): "
                            "send valid Unicode", code="invalid_json")
    return data


async def validate(request: Request, model: type, data: dict[str, Any], model_id: str | None) -> Any:
    """`data` as a `model`, for this server's model (named by the field `model_id`, if the request names one), past
    the input checks. On a worker thread: a request of a thousand tool schemas had held the event loop, and with it
    every stream and /health, for 14 s."""
    return await asyncio.to_thread(_validated, server_state(request), model, data, model_id)


def _validated(state: ServerState, model: type, data: dict[str, Any], model_id: str | None) -> Any:
    try:
        parsed = model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if _is_field(p)) or None
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value") from None
    if model_id is not None and getattr(parsed, model_id) != state.model_name:
        raise APIError(404, f"the model '{getattr(parsed, model_id)}' does not exist; this server has "
                            f"'{state.model_name}'", param=model_id, code="model_not_found")
    return parsed


def _is_field(part: int | str) -> bool:
    """Whether a part of a pydantic error's location names a field or an index, not the branch of a union it was
    tried as ("str", "literal['none','auto']", "NamedToolChoice"), which means nothing to a client."""
    return isinstance(part, int) or bool(re.fullmatch(r"[a-z_][a-z0-9_]*", part)) and part not in _TYPE_NAMES


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


async def _parse(request: Request, model: type) -> Any:
    parsed = await validate(request, model, await read_json(request), "model")
    limit = server_state(request).settings.max_n
    if parsed.n > limit:
        raise APIError(400, f"n is at most {limit}", param="n", code="invalid_value")
    return parsed


def budget(state: ServerState, prompts: list[list[int]], asked: int | None, prompt_field: str = "messages") -> int:
    capacity = state.llm.generator.capacity
    longest = max(len(p) for p in prompts)
    if longest >= capacity:
        raise APIError(400, state.llm.generator.context_error(longest),
                       param=prompt_field, code="context_length_exceeded")
    room = capacity - longest
    if asked is not None and asked > room:
        raise APIError(400, f"max_tokens is {asked} but only {room} tokens fit after the prompt "
                       f"(context {capacity})", param="max_tokens", code="context_length_exceeded")
    limit = min(room, state.settings.max_tokens or room)
    return min(asked or limit, limit)


# -- running the engine from asyncio ------------------------------------------------------------------------

async def grammar_constraints(state: ServerState, schema: dict[str, Any] | None, count: int,
                              param: str = "response_format"):
    """`count` matchers of `schema` ({} for any JSON object), or None without one. Compiled on a worker thread
    (xgrammar lets go of the GIL): other streams go on meanwhile, and the first compile builds the vocabulary's
    tables."""
    if schema is None:
        return None
    try:
        return await asyncio.to_thread(lambda: [state.grammars.constraint(schema or None) for _ in range(count)])
    except GrammarError as error:
        raise APIError(400, str(error), param=param) from None


class Run:
    """One request's sequences in the engine, their deltas delivered to this event loop."""

    def __init__(self, request: Request, prompts, params, n, constraints=None, scoring: bool = False):
        """`scoring`: the prompts alone are wanted (max_tokens 0 with echo): the engine's one token counts nowhere.
        Times run from the request's arrival (templates, grammars and shields take time the client waits too)."""
        state = server_state(request)
        self.state, self.scoring = state, scoring
        self.started = getattr(request.state, "arrived", time.perf_counter())
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        try:
            self.request = state.llm.generator.submit(
                prompts, params, lambda d: loop.call_soon_threadsafe(self.queue.put_nowait, d), n=n,
                timeout=state.settings.request_timeout, constraints=constraints)
        except QueueFullError as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ContextLengthError as error:
            raise APIError(400, str(error), code="context_length_exceeded") from None
        except ValueError as error:  # what the engine refuses to run (an empty prompt, a token it does not have)
            raise APIError(400, str(error), code="invalid_value") from None
        self.prompt_tokens, self.n = sum(len(p) for p in prompts), n
        self.last: dict[int, float] = {}

    async def deltas(self) -> AsyncIterator[Delta]:
        left = len(self.request.seqs)
        try:
            while left:
                delta = await self.queue.get()
                if delta.finish_reason == "error":
                    raise APIError(500, delta.text, type="server_error")
                if delta.finish_reason == "timeout":
                    # The server's limit, not the reply's end: read as "length", a retry asking for more tokens
                    # would have failed alike (and a queued request came back empty, as if it were complete).
                    if delta.text:  # what was held back reaches a stream before the error does
                        yield replace(delta, finish_reason=None)
                    raise APIError(504, f"the request ran past this server's limit of "
                                        f"{self.state.settings.request_timeout:g} s (--timeout), time queued "
                                        "included; ask for fewer tokens, or retry when the server is less busy",
                                   type="server_error", code="request_timeout")
                self._timing(delta)
                left -= delta.finish_reason is not None
                yield delta
        finally:
            self.request.cancel()  # a client gone (or done): the sequences free their blocks now
            self._count()

    def _timing(self, delta: Delta) -> None:
        """Each sequence's first token (every choice's, every prompt's: as vLLM counts them) and the times between
        its tokens."""
        if not delta.tokens or self.scoring:
            return
        now = time.perf_counter()
        metrics = self.state.metrics
        if delta.index in self.last:
            metrics.itl.observe(now - self.last[delta.index])
        else:
            metrics.ttft.observe(now - self.started)
        self.last[delta.index] = now

    def cached_tokens(self) -> int:
        # Each prompt's first choice: its other choices share that prompt, which prompt_tokens counts once too.
        return sum(s.cached_tokens for s in self.request.seqs[::self.n])

    def usage(self) -> dict[str, Any]:
        completion = sum(len(s.generated) for s in self.request.seqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens()}}

    def _count(self) -> None:
        metrics = self.state.metrics
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.cached_tokens.inc(self.cached_tokens())
        if not self.scoring:
            metrics.generated_tokens.inc(sum(len(s.generated) for s in self.request.seqs))
        metrics.e2e.observe(time.perf_counter() - self.started)


async def collect(run: Run, request: Request, count: int) -> list[dict[str, Any]]:
    """Every choice's text, tokens and logprobs; stops early (cancelling) when the client disconnects."""
    choices = [{"text": "", "tokens": [], "logprobs": [], "prompt_logprobs": [], "finish_reason": None,
                "stop_token": None} for _ in range(count)]

    async def gather():
        async for d in run.deltas():
            choice = choices[d.index]
            choice["prompt_logprobs"] = d.prompt_logprobs or choice["prompt_logprobs"]
            choice["text"] += d.text
            choice["tokens"] += d.tokens
            choice["logprobs"] += d.logprobs
            choice["finish_reason"] = d.finish_reason or choice["finish_reason"]
            choice["stop_token"] = d.stop_token if d.stop_token is not None else choice["stop_token"]

    await unless_disconnected(request, gather())
    return choices


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """What `work` returns; cancelled when the client hangs up first, which a 499 then tells the server."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Nobody reads this answer; it ends the request without an exception for the server to log.
        raise APIError(499, "the client closed the connection before the reply was ready",
                       code="client_closed_request")
    return await task


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up. Its body has been read, so the next ASGI message is the disconnect: the
    moment it comes, not at a poll's next tick (a poll every 0.5 s had generated ~90 tokens for nobody)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "content_filter") else "length"


def _sampling(body, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    # Token ids past the vocabulary (logit_bias) are the engine's to refuse: a 400 from Run.
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), min_p=body.min_p, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                              logit_bias=body.logit_bias or {}, seed=body.seed, stop=tuple(body.stop or ()),
                              stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as error:  # what the request's checks let through and the sampler's refuse: a 400 still
        raise APIError(400, str(error), code="invalid_value") from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_response(request: Request, events: AsyncIterator[dict[str, Any]], *, done: bool = True
                 ) -> StreamingResponse:
    """Server-sent events, an error as a last event; done: end with OpenAI's `data: [DONE]`. Counted as a 200 when
    it opens, as the client sees it: a stream whose client left before its end had been counted under no status."""
    async def body():
        count_served(request)
        try:
            async for event in events:
                yield _sse(event)
        except APIError as error:
            yield _sse(error.body())
        except Exception as error:  # the stream has begun: the client learns of it as its last event
            log.exception("internal error while streaming")
            yield _sse(internal_error(error).body())
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- the OpenAI API ------------------------------------------------------------------------------------------

openai_router = APIRouter()


@openai_router.api_route("/v1/models", methods=["GET", "HEAD"])
async def list_models(request: Request):
    state = server_state(request)
    check_key(request.headers.get("authorization"), state.settings.api_keys)
    count_served(request)
    return {"object": "list", "data": [_model(state)]}


@openai_router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str):
    state = server_state(request)
    check_key(request.headers.get("authorization"), state.settings.api_keys)
    if model_id != state.model_name:
        raise APIError(404, f"the model '{model_id}' does not exist; this server has '{state.model_name}'",
                       param="model", code="model_not_found")
    count_served(request)
    return _model(state)


def _model(state: ServerState) -> dict[str, Any]:
    """The model as both APIs on /v1/models describe one: OpenAI's fields, then Llama Stack's (a client of either
    ignores the other's)."""
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "herd",
            **resource(state.model_name, "model"), "model_type": "llm", "metadata": {}}


@openai_router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = server_state(request)
    body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    llm = state.llm
    messages = [m.as_dict() for m in body.messages]
    shields = None
    if state.shields is not None:
        from herd.safety.serving import RequestShields

        shields = RequestShields(state.shields, body.n)
        messages = await shields.screen(messages)  # tool results Prompt Guard flags are withheld from the model
        if shields.refused is not None:
            return _refused(request, shields, body)
    use_tools = bool(body.tools) and body.tool_choice != "none"
    calls_allowed = None if body.parallel_tool_calls else 1
    tools = [t.model_dump() for t in body.tools] if use_tools else None
    try:
        prompt = await asyncio.to_thread(llm.chat_prompt, messages, tools)  # as validate: off the event loop
    except (ValueError, KeyError, TypeError) as error:
        raise APIError(400, f"the messages cannot be encoded: {error}", param="messages") from None
    max_tokens = budget(state, [prompt], body.max_completion_tokens or body.max_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    schema, source = _output_schema(body) if use_tools or body.response_format else (None, None)
    constraints = await grammar_constraints(state, schema, body.n, source)
    run = Run(request, [prompt], _sampling(body, max_tokens, logprobs), body.n, constraints)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name}
    tok = llm.tokenizer
    if not body.stream:
        choices = await collect(run, request, body.n)
        if shields is not None:
            await shields.filter_choices(choices)
        out = []
        for i, c in enumerate(choices):
            message = {"role": "assistant", "content": c["text"]}
            finish = _finish_reason(c["finish_reason"])
            if use_tools:
                note = shields.note(i) if shields is not None else ""
                text = c["text"][:len(c["text"]) - len(note)]
                parsed = llm.reply_message(text, c["tokens"], c["finish_reason"], c["stop_token"])
                if parsed["tool_calls"]:
                    content = shields.beside(i, parsed["content"]) if shields is not None else parsed["content"]
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": parsed["tool_calls"][:calls_allowed]}
                    finish = "tool_calls"
            out.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": {"content": _chat_logprobs(tok, c["logprobs"])} if logprobs is not None else None})
        count_served(request)
        return {**head, "choices": out, "usage": run.usage(), **(shields.report() if shields else {})}

    head["object"] = "chat.completion.chunk"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if include_usage:  # OpenAI's chunks then all say "usage": null, but the last, which has it
        head["usage"] = None

    async def events():
        streamers = [ToolStreamer() if use_tools else None for _ in range(body.n)]
        for i in range(body.n):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
        async for d in run.deltas():
            text, finish, lps = d.text, d.finish_reason and _finish_reason(d.finish_reason), d.logprobs
            if shields is not None:
                if shields.ended(d.index):
                    continue
                text = await shields.feed(d.index, text, final=bool(finish))
                if shields.ended(d.index):  # blocked code or an unsafe reply: this choice stops here
                    finish = "content_filter"
                    run.request.seqs[d.index].cancelled = True
                lps = shields.logprobs(d.index, lps, final=bool(finish))
            streamer = streamers[d.index]
            note = shields.note(d.index) if shields is not None and streamer and finish else ""
            text = streamer.feed(text[:len(text) - len(note)], d.tokens) if streamer else text
            choice = {"index": d.index, "delta": {"content": text} if text else {}, "finish_reason": None,
                      "logprobs": {"content": _chat_logprobs(tok, lps)} if logprobs is not None else None}
            if finish:
                choice["finish_reason"] = finish
                if streamer:
                    rest, calls = streamer.finish(llm, d.finish_reason, d.stop_token)
                    rest = (note if streamer.sent else note.lstrip()) if calls else rest + note
                    if rest:
                        choice["delta"]["content"] = choice["delta"].get("content", "") + rest
                    if calls:
                        choice["delta"]["tool_calls"] = [{**c, "index": k} for k, c in enumerate(calls[:calls_allowed])]
                        choice["finish_reason"] = "tool_calls"
            if choice["delta"] or choice["finish_reason"] or lps:
                yield {**head, "choices": [choice]}
        if shields is not None and shields.report():
            yield {**head, "choices": [], **shields.report()}
        if include_usage:
            yield {**head, "choices": [], "usage": run.usage()}

    return sse_response(request, events())


def _refused(request: Request, shields, body: ChatCompletionRequest):
    state = server_state(request)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    answer = shields.refusal(state.model_name, body.stream, usage)
    if not body.stream:
        count_served(request)
        return answer

    async def events():
        for chunk in answer:
            yield {"usage": None, **chunk} if usage else chunk

    return sse_response(request, events())


def _output_schema(body: ChatCompletionRequest) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON schema decoding must follow ({} for any object; None for free text), and the field it came from."""
    choice = body.tool_choice
    if body.tools and (choice == "required" or not isinstance(choice, (str, type(None)))):
        wanted = choice.function.name if not isinstance(choice, str) else None
        try:
            return call_schema([t.model_dump() for t in body.tools], wanted), "tools"
        except ValueError as error:
            raise APIError(400, str(error), param="tool_choice") from None
    return _format_schema(body), "response_format"


def _format_schema(body) -> dict[str, Any] | None:
    """The JSON schema a request's `response_format` asks for ({} for any object; None for free text)."""
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_schema":
        if form.json_schema is None or not form.json_schema.schema_:
            raise APIError(400, "response_format json_schema needs a schema", param="response_format")
        return form.json_schema.schema_
    return {}


class ToolStreamer:
    """Streams a reply's text until it turns out to be a tool call; the call is sent whole at the end."""

    def __init__(self):
        self.text, self.sent, self.holding, self.tokens = "", 0, False, []

    def feed(self, piece: str, tokens: list[int]) -> str:
        self.text += piece
        self.tokens += tokens
        head = self.text.lstrip()
        if self.sent == 0 and (not head or any(o.startswith(head) or head.startswith(o) for o in _CALL_OPENERS)):
            self.holding = self.holding or any(head.startswith(o) for o in _CALL_OPENERS)
            return ""
        if self.holding:
            return ""
        # A call may also follow text: after <|python_tag|>, or in a `<function=...>` tag, which the message reads
        # as a call wherever it stands (and a tag's start may be the end of what has come so far).
        tags = [at for at in (self.text.find(tag, self.sent) for tag in _CALL_TAGS) if at >= 0]
        end = min(tags) if tags else len(self.text) - max(_partial_suffix(self.text, tag) for tag in _CALL_TAGS)
        self.holding = bool(tags)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self, llm, finish_reason: str, stop_token: int | None) -> tuple[str, list[dict]]:
        parsed = llm.reply_message(self.text, self.tokens, finish_reason, stop_token)
        if parsed["tool_calls"]:
            return "", parsed["tool_calls"]
        return self.text[self.sent:], []


def _partial_suffix(text: str, token: str) -> int:
    """The length of the longest end of `text` that begins `token` (it might be completed by what follows)."""
    return next((n for n in range(min(len(token) - 1, len(text)), 0, -1) if token.startswith(text[-n:])), 0)


def text_vocab(llm) -> int:
    """How many token ids have text: a model's vocabulary may be padded past its tokenizer's, and a padded id in a
    prompt had been a 500 where its text was wanted (echo, detokenize), as vLLM refuses it."""
    return min(llm.model.config.vocab_size, llm.generator.vocab or llm.model.config.vocab_size)


def token_text(tok, token: int) -> str:
    """A token's own text as the logprobs of every route show it (a piece of a UTF-8 character shows as U+FFFD)."""
    return tok.decode_bytes([token]).decode("utf-8", errors="replace")


def token_key(tok, token: int) -> str:
    """A token's text where a text alone names it (the legacy logprobs' tokens and keys): a piece of a UTF-8
    character as OpenAI writes one, "bytes:\\xe6\\x97", so that two such pieces stay two keys, not one U+FFFD."""
    raw = tok.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextOffsets:
    """Where each token's text starts in a choice's text, in characters: a token holding part of a UTF-8 character
    starts where that character does, and the character is counted once it is whole."""

    def __init__(self):
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, raw: bytes) -> int:
        at = self.chars
        self.chars += len(self._decoder.decode(raw))
        return at


def _chat_logprobs(tok, logprobs) -> list[dict[str, Any]]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tok, token), "logprob": logprob, "bytes": list(tok.decode_bytes([token]))}

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
            for lp in logprobs]


@openai_router.post("/v1/completions")
async def completions(request: Request):
    state = server_state(request)
    body: CompletionRequest = await _parse(request, CompletionRequest)
    if state.shields is not None:
        # Raw text has no roles for Llama Guard to judge and no turns to withhold: a guarded server would otherwise
        # have an unguarded door.
        raise APIError(403, "this server runs with safety shields, which screen chat requests only: "
                            "use /v1/chat/completions", type="permission_error", code="shielded_server")
    llm = state.llm
    raw = body.prompt
    texts = [raw] if isinstance(raw, str) else raw if isinstance(raw[0], str) else None
    if texts is not None:
        prompts = [llm.encode(t) for t in texts]
    else:
        prompts = [raw] if isinstance(raw[0], int) else raw
        vocab = text_vocab(llm)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, "a prompt token id is outside the vocabulary", param="prompt")
    # max_tokens 0 (with echo): the prompt scored as OpenAI's legacy API did; the engine's one token is dropped.
    generating = body.max_tokens != 0
    if not generating and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: set echo (and logprobs) to score the prompt",
                       param="max_tokens", code="invalid_value")
    max_tokens = budget(state, prompts, body.max_tokens if generating else 1, "prompt")
    echo_logprobs = body.logprobs if body.echo else None
    schema = _format_schema(body) if generating else None
    constraints = await grammar_constraints(state, schema, len(prompts) * body.n)
    run = Run(request, prompts, _sampling(body, max_tokens, body.logprobs, echo_logprobs), body.n, constraints,
              scoring=not generating)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    tok = llm.tokenizer
    # echo: each choice starts with its prompt (as sent, or its ids' text) and, with logprobs, the prompt's tokens
    # (the first without a log-probability: nothing comes before it).
    echoes = [(texts[i] if texts is not None else tok.decode(p)) if body.echo else "" for i, p in enumerate(prompts)]

    def opening(index: int, prompt_logprobs) -> tuple[str, list]:
        prompt = prompts[index // body.n]
        entries = [prompt[0], *(prompt_logprobs or [])] if echo_logprobs is not None else []
        return echoes[index // body.n], entries

    def usage() -> dict[str, Any]:
        counts = run.usage()
        return counts if generating else {**counts, "completion_tokens": 0, "total_tokens": counts["prompt_tokens"]}

    if not body.stream:
        choices = await collect(run, request, len(prompts) * body.n)
        count_served(request)
        out = []
        for i, c in enumerate(choices):
            echo, entries = opening(i, c["prompt_logprobs"])
            text, reply = (c["text"], c["logprobs"]) if generating else ("", [])
            logprobs = _completion_logprobs(tok, entries + reply, TextOffsets())
            out.append({"index": i, "text": echo + text,
                        "finish_reason": _finish_reason(c["finish_reason"]) if generating else "length",
                        "logprobs": logprobs if body.logprobs is not None else None})
        return {**head, "choices": out, "usage": usage()}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if include_usage:  # OpenAI's chunks then all say "usage": null, but the last, which has it
        head["usage"] = None

    async def events():
        offsets: dict[int, TextOffsets] = {}  # each choice's text so far, for text_offset
        async for d in run.deltas():
            echo, entries = opening(d.index, d.prompt_logprobs) if d.index not in offsets else ("", [])
            text, reply = (d.text, d.logprobs) if generating else ("", [])
            finish = (_finish_reason(d.finish_reason) if generating else "length") if d.finish_reason else None
            logprobs = _completion_logprobs(tok, entries + reply, offsets.setdefault(d.index, TextOffsets()))
            if echo + text or finish or body.logprobs is not None and reply:
                yield {**head, "choices": [{"index": d.index, "text": echo + text, "finish_reason": finish,
                                            "logprobs": logprobs if body.logprobs is not None else None}]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage()}

    return sse_response(request, events())


def _completion_logprobs(tok, entries: list, offsets: TextOffsets) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for TokenLogprobs (a bare token id: a token with no log-probability, a
    prompt's first), its text offsets carried on by `offsets`."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        token = entry if isinstance(entry, int) else entry.token
        out["tokens"].append(token_key(tok, token))
        out["text_offset"].append(offsets.advance(tok.decode_bytes([token])))
        out["token_logprobs"].append(None if isinstance(entry, int) else entry.logprob)
        # The token itself too, where it is not among the most likely: OpenAI's legacy API "will always return the
        # logprob of the sampled token, so there may be up to logprobs+1 elements" (vLLM does so too).
        out["top_logprobs"].append(None if isinstance(entry, int) else {
            token_key(tok, t): v for t, v in {**entry.top, entry.token: entry.logprob}.items()})
    return out


@openai_router.post("/tokenize")
async def tokenize(request: Request):
    """vLLM's token counting: the ids a completion's prompt or a chat's messages (and tools) become here."""
    state = server_state(request)
    body: TokenizeRequest = await validate(request, TokenizeRequest, await read_json(request), "model")
    llm = state.llm
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either a prompt or messages", param="prompt", code="invalid_value")
    if body.prompt is not None:
        ids = llm.encode(body.prompt, bos=body.add_special_tokens)
    else:
        try:  # off the event loop, as chat completions build theirs: a slow template had held every stream
            ids = await asyncio.to_thread(llm.chat_prompt, [m.as_dict() for m in body.messages],
                                          [t.model_dump() for t in body.tools] if body.tools else None)
        except (ValueError, KeyError, TypeError) as error:
            raise APIError(400, f"the messages cannot be encoded: {error}", param="messages") from None
    count_served(request)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.llm.generator.capacity}


@openai_router.post("/detokenize")
async def detokenize(request: Request):
    state = server_state(request)
    body: DetokenizeRequest = await validate(request, DetokenizeRequest, await read_json(request), "model")
    vocab = text_vocab(state.llm)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"a token id is outside the vocabulary (0..{vocab - 1})", param="tokens",
                       code="invalid_value")
    count_served(request)
    return {"prompt": state.llm.tokenizer.decode(body.tokens)}


# -- operations and the chat page ----------------------------------------------------------------------------

ops_router = APIRouter()


@ops_router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers, uptime checks
async def health(request: Request):
    engine = server_state(request).llm.generator
    return {"status": "ok", "running": len(engine.scheduler.running), "waiting": engine.waiting}


@ops_router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(request: Request):
    return Response(server_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


@ops_router.api_route("/", methods=["GET", "HEAD"])
async def chat_page():
    return FileResponse(STATIC / "index.html")


@ops_router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static_file(name: str):
    # A NUL byte is in no file's name (and had failed resolve(): a 500).
    path = None if "\0" in name else (STATIC / name).resolve()
    if path is None or path.parent != STATIC.resolve() or not path.is_file():
        raise APIError(404, f"no file {name}", type="not_found_error")
    return FileResponse(path)
