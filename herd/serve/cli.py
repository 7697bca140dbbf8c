"""`herd serve [MODEL]`: load a model and serve the OpenAI and Llama Stack APIs, metrics and the chat page with
uvicorn."""
from __future__ import annotations

import ipaddress
import os
import resource
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
):
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and Llama Stack's
    (/v1/inference/chat-completion, /v1/inference/completion), with /health, Prometheus /metrics and a chat page
    at /; --guard, --prompt-guard and --code-shield shield chat requests."""
    import uvicorn
    _check_port(host, port)  # a taken port fails at once, not after the model has loaded

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
    print(f"serving {settings.model_name or llm.name} on http://{host}:{port} (chat page at /)"
          + ("" if keys else "; no API key required"), flush=True)
    _more_open_files()
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)


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


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port} ({error.strerror}): choose another --port or --host") \
                from None
