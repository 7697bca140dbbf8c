"""`herd serve [MODEL]`: load a model and serve the OpenAI and Llama Stack APIs, metrics and the chat page with
uvicorn."""
from __future__ import annotations

import ipaddress
import logging
import os
import resource
import signal
import socket
from typing import Optional

import typer

from herd.cli import DtypeOpt, KvCacheOpt


def serve_cmd(
    model: Optional[str] = typer.Argument(None, help="checkpoint path (Meta, HF or GGUF); default: the built-in model"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: Optional[list[str]] = typer.Option(None, help="a Bearer key clients must send (repeatable; "
                                                "default: $HERD_API_KEY, else none)"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients send (default: the checkpoint's name)"),
    allowed_origin: Optional[list[str]] = typer.Option(None, help="a browser origin (https://app.example.com) whose "
                                                       "pages may call the API (CORS; repeatable, * for any)"),
    max_batch: int = typer.Option(64, min=1, help="sequences decoded together"),
    max_queue: int = typer.Option(1024, min=1, help="sequences waiting beyond the running batch; more get 429"),
    max_n: int = typer.Option(8, min=1, help="the most choices (n) one request may ask for"),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="the most tokens one choice may generate"),
    kv_cache_mib: Optional[int] = KvCacheOpt,
    kv_cache_dtype: str = typer.Option("auto", help="auto: keys and values in float16 where herd's kernel attends "
                                       "(float32 models on a CPU: half the memory to read), else the model's "
                                       "dtype; model: always the model's dtype"),
    prefix_cache: bool = typer.Option(True, help="reuse the KV cache of shared prompt prefixes (chat history, "
                                      "system prompts)"),
    draft_tokens: int = typer.Option(2, min=0, help="speculative decoding: tokens guessed per step by prompt lookup "
                                     "for greedy requests (0: off); the output is the same either way"),
    timeout: float = typer.Option(600.0, help="seconds a request may run"),
    shutdown_timeout: float = typer.Option(20.0, min=0, help="seconds requests in flight may take to finish after "
                                           "SIGTERM or Ctrl-C before they are cut off (under Kubernetes' 30 s grace)"),
    quantize: str = typer.Option("auto", help="auto (a GGUF's own blocks, a `herd quantize` output as "
                                  "stored), none, or a scheme: int8, int8-wo, int4[-g64|-g128][-gptq], fp8"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when present)"),
    dtype: str = DtypeOpt,
    guard: Optional[str] = typer.Option(None, help="Llama Guard on requests and replies: a guard head (.npz from "
                                        "`herd guard train llama-guard`) or a Llama Guard checkpoint"),
    prompt_guard: Optional[str] = typer.Option(None, help="Prompt Guard on tool results and requests (.npz from "
                                               "`herd guard train prompt-guard`)"),
    code_shield: bool = typer.Option(False, help="Code Shield on generated code blocks"),
    code_shield_mode: str = typer.Option("block", help="block: stop a reply at insecure code; warn: annotate it"),
    tools: str = typer.Option("", help="Python functions agents (/v1/agents) may call besides the built-in tools, "
                              "comma-separated pkg.module:function specs; clients name them, never code"),
    log_level: str = typer.Option("warning", help="what uvicorn and herd log: debug, info, warning, error, critical"),
    access_log: bool = typer.Option(False, help="a line per request (client, method, path, status) on stdout"),
):
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and Llama Stack's
    (/v1/inference/chat-completion, /v1/inference/completion), with /health, Prometheus /metrics and a chat page
    at /; --guard, --prompt-guard and --code-shield shield chat requests."""
    import uvicorn

    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"--log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    sock = _bound_socket(host, port)  # a taken port fails at once, not after the model has loaded

    from herd.cli import _load
    from herd.generate import EngineConfig
    from herd.generate.speculative import SpeculativeConfig
    from herd.serve.agents import router as agents_router
    from herd.safety.serving import load_shields
    from herd.serve.app import ServeSettings, create_app

    if kv_cache_dtype not in ("auto", "model"):
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r}: use auto or model")
    shields = load_shields(guard, prompt_guard, code_shield, code_shield_mode)  # before the model: bad paths fail fast
    from herd.tools import parse_tools

    functions = parse_tools(tools)
    keys = tuple(api_key or ([os.environ["HERD_API_KEY"]] if os.environ.get("HERD_API_KEY") else []))
    try:  # before the model loads: a bad setting fails at once
        settings = ServeSettings(api_keys=keys, model_name=model_name, max_n=max_n, max_tokens=max_tokens,
                                 request_timeout=timeout, allowed_origins=tuple(allowed_origin or ()),
                                 allowed_hosts=_loopback_names(host))
    except ValueError as error:
        raise ValueError(str(error).replace("request_timeout", "--timeout").replace("api_keys", "--api-key")
                         .replace("allowed_origins", "--allowed-origin")) from None  # the rest typer checks
    llm = _load(model, quantize, device, kv_cache_mib, EngineConfig(
        max_batch=max_batch, max_queue=max_queue, kv_cache_dtype=kv_cache_dtype, prefix_caching=prefix_cache,
        speculative=SpeculativeConfig(draft_tokens=draft_tokens)), dtype=dtype)
    app = create_app(llm, settings, routers=[agents_router], shields=shields, tools=functions)
    _listen(sock, host, port)  # connections wait in the backlog from here on: "serving" is true when printed
    print(f"serving {settings.model_name or llm.name} on http://{host}:{sock.getsockname()[1]} (chat page at /)"
          + ("" if keys else "; no API key required"), flush=True)
    _more_open_files()
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                           timeout_graceful_shutdown=shutdown_timeout))
    _log_as_uvicorn(log_level, access_log)
    # uvicorn stops on the first SIGTERM or Ctrl-C and raises it again once its shutdown is over: by default that
    # ends the process there. herd's own handler (an exit unwinding through asyncio) had let every request cut off
    # print a traceback, waited past --shutdown-timeout for an agent's tool call, and made Ctrl-C exit 0.
    # uvicorn takes SIGTERM and Ctrl-C whatever was set (a background job inherits Ctrl-C ignored), so they end
    # the process after it; nohup's ignored SIGHUP stays ignored.
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if stop != signal.SIGHUP or signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, signal.SIG_DFL)
    server.run(sockets=[sock])


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_as_uvicorn(level: str, access_log: bool) -> None:
    """herd's log records (a 500's traceback) on uvicorn's handler, with its level: they had gone to Python's
    last-resort handler, bare. The access log is uvicorn's, at info, which --access-log shows at any level."""
    herd = logging.getLogger("herd")
    herd.handlers, herd.propagate = logging.getLogger("uvicorn").handlers, False
    herd.setLevel(level.upper())
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)


def _more_open_files() -> None:
    """The soft limit on open files raised to the hard one (as vLLM does): at a shell's 1,024, a thousand idle
    connections had used them all, and a client with the right key timed out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # RLIM_INFINITY is -1: no min() with it
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _loopback_names(host: str) -> tuple[str, ...]:
    """The names a server bound to loopback answers to (its guard against DNS rebinding); elsewhere none: any."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return ()
    return ("localhost", "127.0.0.1", "::1", host) if loopback else ()


def _bound_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads and held while it does: a check that let go of the port
    had printed "serving" for one another process had taken meanwhile."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise _cannot_listen(host, port, error) from None
    return sock


def _listen(sock: socket.socket, host: str, port: int) -> None:
    """Where another server bound the port with SO_REUSEADDR too (as Linux lets two do until one listens) and
    listened first, this is where that shows."""
    try:
        sock.listen(2048)
    except OSError as error:
        raise _cannot_listen(host, port, error) from None


def _cannot_listen(host: str, port: int, error: OSError) -> OSError:
    return OSError(f"cannot listen on {host}:{port} ({error.strerror}): choose another --port or --host")
