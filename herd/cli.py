"""`herd ...`: parse arguments, call the library, print results; bad input ends in one line on stderr."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="herd: run, convert and inspect Llama-3-architecture models.")


def _show_version(asked: bool) -> None:
    if asked:
        from herd import __version__

        print(f"herd {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="print herd's version and exit")) -> None:
    pass


ModelOpt = typer.Option(None, "--model", "-m", help="checkpoint path (Meta, HF or GGUF); default: the built-in model")
QuantOpt = typer.Option("auto", help="auto (a GGUF's own blocks, a `herd quantize` output as stored), none, "
                        "or a scheme: int8, int8-wo, int4[-g64|-g128][-gptq], fp8")


def stdin_text() -> str:
    """Standard input as UTF-8 text. Its bytes had been let through as stray surrogates, which tokenized as U+FFFD
    and ran, where the same bytes in a file are refused."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"standard input is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                         "convert it, e.g. with iconv -t UTF-8") from None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


KvCacheOpt = typer.Option(None, min=1, help="KV-cache memory (MiB; default 512), raised to hold one context of up "
                          "to 8,192 tokens; a longer context is held as far as it goes")


DTYPES = ("auto", "float32", "bfloat16", "float16")
DtypeOpt = typer.Option("auto", help="the precision computed in: auto (bfloat16 on a GPU, float32 on a CPU), "
                        "float32, bfloat16, float16")


def _load(model: Optional[str], quantize: str, device: Optional[str], kv_cache_mib: Optional[int] = None,
          engine=None, dtype: str = "auto"):
    """engine: an EngineConfig, whose KV cache `kv_cache_mib` sizes where given."""
    import dataclasses

    import torch

    import herd
    from herd.generate import EngineConfig

    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    engine = engine or EngineConfig()
    if kv_cache_mib is not None:
        engine = dataclasses.replace(engine, kv_cache_bytes=kv_cache_mib << 20)
    started = time.perf_counter()
    llm = herd.load(model, quantize=None if quantize == "none" else quantize, device=device,
                    dtype=None if dtype == "auto" else getattr(torch, dtype), engine=engine)
    _status(f"loaded {llm.name} on {llm.device} in {time.perf_counter() - started:.1f}s")
    return llm


MinPOpt = typer.Option(0.0, help="drop tokens less likely than this times the likeliest one")
RepetitionOpt = typer.Option(1.0, help="above 1: tokens already in the prompt or reply are made less likely")


def _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop) -> dict:
    """The options as SamplingParams fields, checked before the model loads (a bad value fails at once)."""
    from herd.generate import SamplingParams

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()))
    SamplingParams(**sampling)
    return sampling


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, help="a system prompt"),
    max_tokens: int = typer.Option(512, help="the most tokens per reply"),
    temperature: float = typer.Option(0.2, help="0 for greedy"),
    top_p: float = typer.Option(0.9),
    top_k: int = typer.Option(0),
    min_p: float = MinPOpt,
    repetition_penalty: float = RepetitionOpt,
    seed: Optional[int] = typer.Option(None),
    quantize: str = QuantOpt,
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when present)"),
    dtype: str = DtypeOpt,
    tools: Optional[str] = typer.Option(None, help="brave_search,wolfram_alpha,code_interpreter[,module:function]"),
    prompt_guard: Optional[Path] = typer.Option(None, help="with --tools: a Prompt Guard file; tool results it flags "
                                                "as injections are withheld from the model"),
    kv_cache_mib: Optional[int] = KvCacheOpt,
):
    """Talk with a model. Lines ending in \\ continue; a line of \"\"\" opens and closes a block.
    /reset clears the conversation, /system TEXT sets the system prompt, /exit quits."""
    from herd.generate import ContextLengthError

    if tools or prompt_guard:
        from herd.tools.cli import agent_turn, make_agent, parse_tool_option

        tools = parse_tool_option(tools, prompt_guard)  # bad ones fail before the model loads
    sampling = _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, ())
    llm = _load(model, quantize, device, kv_cache_mib, dtype=dtype)
    agent = make_agent(llm, tools, **sampling) if tools else None
    interactive = sys.stdin.isatty()
    if interactive:
        # line editing, and lines longer than the terminal's 4,095-byte line buffer (a paste had been cut there)
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are no UTF-8 then arrive as stray surrogates, named
        sys.stdin.reconfigure(errors="surrogateescape")  # below, whatever the locale's strictness
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    refused = False
    if interactive:
        _status(f"type a message; {CHAT_COMMANDS}; Ctrl-D quits")
    while (read := _read_message(interactive)) is not None:
        message, one_line = read
        if (byte := _undecodable(message)) is not None:
            _status(f"herd: error: the message is not UTF-8 text (byte 0x{byte:02x}); "
                    + ("type it again" if interactive else "convert the input, e.g. with iconv -t UTF-8"))
            refused = True
            continue
        if one_line and _is_command(message):  # a block or a continued line is text, whatever it starts with
            refused |= message.split()[0] not in _COMMANDS
            if (history := _run_command(message, history)) is None:
                break
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        if agent is not None:
            refused |= not agent_turn(agent, history)  # a script learns of it as without tools
            continue
        reply, whole, left_out = "", list(history), 0
        try:
            while True:
                try:
                    for piece in llm.chat(history, stream=True, **sampling):
                        if left_out:
                            _status(f"(the oldest {left_out} exchange(s) left out: the conversation no longer fits "
                                    "the context)")
                            left_out = 0
                        reply += piece
                        print(piece, end="", flush=True)
                    break
                except ContextLengthError:
                    # The oldest exchanges make room, as ollama drops them: the conversation had been refused turn
                    # after turn until /reset threw all of it away.
                    if not _drop_oldest_exchange(history):
                        raise
                    left_out += 1
        except KeyboardInterrupt:
            _status("\n(interrupted)")
            if not reply:  # nothing came: the message goes unanswered, not answered by an empty turn
                history[:] = whole[:-1]
                continue
        except ContextLengthError as error:
            _status(f"herd: error: {error}")
            history[:] = whole[:-1]  # the conversation as it was: the message alone is past the context
            refused = True
            continue
        else:
            print(flush=True)
        history.append({"role": "assistant", "content": reply})
    if refused and not interactive:  # a script piping messages in learns that one went unanswered
        raise typer.Exit(2)


CHAT_COMMANDS = "/reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def _drop_oldest_exchange(history: list[dict]) -> bool:
    """Leave out the oldest exchange (a user message and what answered it) before the last message, keeping the
    system prompt; False where the last message is all there is."""
    first = next(i for i, m in enumerate(history) if m["role"] != "system")
    following = next((i for i in range(first + 1, len(history)) if history[i]["role"] == "user"), None)
    if following is None:
        return False
    del history[first:following]
    return True


def _is_command(message: str) -> bool:
    """A line is a command when its first word is one /word: a path ("/usr/bin/env ...") or a line that starts with a
    space is text for the model."""
    words = message.split(maxsplit=1)
    return message.startswith("/") and re.fullmatch(r"/[A-Za-z?]+", words[0]) is not None


_COMMANDS = ("/exit", "/quit", "/bye", "/reset", "/system", "/help", "/?")


def _undecodable(message: str) -> Optional[int]:
    """The first byte of `message` that was no UTF-8 (read with surrogateescape), or None."""
    return next((ord(c) - 0xDC00 for c in message if 0xDC80 <= ord(c) <= 0xDCFF), None)


def _run_command(message: str, history: list[dict]) -> Optional[list[dict]]:
    """The history a chat command leaves (None: /exit). A mistyped command is named, never sent to the model."""
    command, *rest = message.split(maxsplit=1)
    text = rest[0].strip() if rest else ""
    if command in ("/exit", "/quit", "/bye"):
        return None
    if command == "/reset":
        _status("(conversation cleared)")
        return [m for m in history if m["role"] == "system"]
    if command == "/system" and text:
        _status("(system prompt set)")
        return [{"role": "system", "content": text}] + [m for m in history if m["role"] != "system"]
    if command == "/system":
        _status("/system needs the prompt's text: /system You are a concise assistant.")
    elif command in ("/help", "/?"):
        _status(f"{CHAT_COMMANDS}; start a line with a space to send text that begins with /")
    else:
        _status(f"unknown command {command}: {CHAT_COMMANDS} (start the line with a space to send it as text)")
    return history


def _read_message(interactive: bool) -> Optional[tuple[str, bool]]:
    """The next message, and whether it was typed as one line (only such a line can be a /command); None at the
    end of the input."""
    lines: list[str] = []
    block = False
    while True:
        try:
            line = input((">>> " if not (lines or block) else "... ") if interactive else "").removesuffix("\r")
        except EOFError:
            if interactive and not lines:
                print()  # the shell's prompt on a line of its own
            return ("\n".join(lines), False) if lines else None
        except KeyboardInterrupt:
            if not interactive:
                raise
            # What was being typed is dropped and the chat goes on, as in Python's prompt: Ctrl-C had ended the
            # session, conversation and all (and a mistyped """ block could be left no other way).
            _status("\n(discarded)" if lines or block else "\n(Ctrl-D or /exit quits)")
            lines, block = [], False
            continue
        if line.strip() == '"""':
            if block:
                return "\n".join(lines), False
            block = True
            continue
        if block:
            lines.append(line)
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines), len(lines) == 1


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt text, or - to read it from stdin"),
    model: Optional[str] = ModelOpt,
    chat_turn: bool = typer.Option(False, "--chat", help="send the prompt as a user message in the chat format"),
    max_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.6, help="0 for greedy"),
    top_p: float = typer.Option(0.9),
    top_k: int = typer.Option(0),
    min_p: float = MinPOpt,
    repetition_penalty: float = RepetitionOpt,
    seed: Optional[int] = typer.Option(None),
    stop: Optional[list[str]] = typer.Option(None, help="a stop string (repeatable)"),
    logprobs: Optional[int] = typer.Option(None, min=0, help="print JSON with each token's log-probability and N "
                                           "alternatives"),
    quantize: str = QuantOpt,
    device: Optional[str] = typer.Option(None),
    dtype: str = DtypeOpt,
    kv_cache_mib: Optional[int] = KvCacheOpt,
):
    """Complete a prompt, streaming the text (or print JSON with log-probabilities)."""
    sampling = _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
    text = stdin_text() if prompt == "-" else prompt
    llm = _load(model, quantize, device, kv_cache_mib, dtype=dtype)
    ids = llm.chat_format.encode_dialog([{"role": "user", "content": text}]) if chat_turn else llm.encode(text)
    if logprobs is None:
        for piece in llm.generate(ids, stream=True, **sampling):
            print(piece, end="", flush=True)
        print()
        return
    done = llm.generate(ids, logprobs=logprobs, **sampling)
    print(json.dumps({
        "text": done.text, "finish_reason": done.finish_reason, "tokens": done.tokens,
        "logprobs": [{"token": t.token, "logprob": t.logprob, "top": t.top} for t in done.logprobs],
    }, ensure_ascii=False))


@app.command()
def batch(
    requests: Path = typer.Argument(..., help="OpenAI batch input: JSONL, one {custom_id, method, url, body} a line"),
    out: Path = typer.Option(..., "--out", "-o", help="OpenAI batch output: one line per request, in input order"),
    model: Optional[str] = ModelOpt,
    model_name: Optional[str] = typer.Option(None, help="the model id the bodies name (default: the checkpoint's "
                                             "name)"),
    max_batch: int = typer.Option(64, min=1, help="sequences decoded together"),
    max_n: int = typer.Option(128, min=1, help="the most choices (n) one request may ask for (OpenAI's limit)"),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="the most tokens one choice may generate"),
    timeout: float = typer.Option(86400.0, help="seconds one request may run (OpenAI's batch window is 24 h)"),
    quantize: str = QuantOpt,
    device: Optional[str] = typer.Option(None),
    dtype: str = DtypeOpt,
    kv_cache_mib: Optional[int] = KvCacheOpt,
):
    """Answer a file of /v1/chat/completions and /v1/completions requests as `herd serve` would, all at once."""
    from herd.atomic import prepare_output
    from herd.generate import EngineConfig
    from herd.serve.app import ServeSettings
    from herd.serve.batch import read_batch, run_batch

    lines = read_batch(requests)  # a bad file fails before the model loads
    out = prepare_output(out, "file", "--out")
    if out.resolve() == requests.resolve():
        raise typer.BadParameter(f"--out is the input file {requests}, which writing would destroy; give another path")
    try:
        settings = ServeSettings(model_name=model_name, max_n=max_n, max_tokens=max_tokens, request_timeout=timeout)
    except ValueError as error:
        raise ValueError(str(error).replace("request_timeout", "--timeout")) from None
    # Twice the batch at once keeps it full as requests end. The queue is left unbounded: nobody retries a 429 in a
    # batch, and a request's sequences (prompts x n) have no bound but the file, whose requests are in flight
    # `concurrency` at a time.
    concurrency = 2 * max_batch
    llm = _load(model, quantize, device, kv_cache_mib, EngineConfig(max_batch=max_batch, max_queue=sys.maxsize),
                dtype=dtype)
    summary = run_batch(llm, lines, out, settings, concurrency=concurrency)
    _status(f"{summary}; wrote {out}")


@app.command()
def convert(
    src: str = typer.Argument(..., help="a Meta, HF or GGUF checkpoint, or default"),
    out: Path = typer.Argument(..., help="where to write the converted checkpoint"),
    format: str = typer.Option(..., "--format", "-f", help="meta, hf or gguf"),
    gguf_type: str = typer.Option("F16", help="GGUF tensor type: F32, F16, BF16, Q8_0, ..."),
    shards: int = typer.Option(1, min=1, help="Meta format: model-parallel shards to write"),
):
    """Convert a checkpoint to another format (written to a temporary path, then renamed)."""
    from herd.checkpoint import convert as convert_checkpoint
    from herd.llm import resolve_model_path

    if format not in ("meta", "hf", "gguf"):
        raise typer.BadParameter(f"unknown format {format!r}: use meta, hf or gguf")
    kwargs = {"gguf_type": gguf_type} if format == "gguf" else {"shards": shards} if format == "meta" else {}
    written = convert_checkpoint(resolve_model_path(src), out, format, **kwargs)
    _status(f"wrote {written}")


@app.command()
def info(model: str = typer.Argument("default", help="a checkpoint path, a named config (e.g. llama3.1-405b), "
                                                      "or default")):
    """Shapes, parameter count, dtype and a memory estimate, without loading the weights."""
    from collections import Counter

    from herd.model import CONFIGS
    from herd.model.summary import summarize

    if model in CONFIGS:
        config, details = CONFIGS[model], {"source": "named configuration"}
    else:
        from herd.checkpoint import load_checkpoint
        from herd.llm import resolve_model_path

        ckpt = load_checkpoint(resolve_model_path(model))
        meta = dict(ckpt.meta)
        stored = Counter(meta.pop("tensor_types", {}).values())
        details = {"source": f"{ckpt.format} checkpoint {ckpt.source}",
                   "tokenizer": type(ckpt.tokenizer).__name__ if ckpt.tokenizer else "none", **meta}
        if stored:
            details["stored tensor types"] = ", ".join(f"{kind} x{n}" for kind, n in stored.most_common())
        config = ckpt.config
    for key, value in {**summarize(config), **details}.items():
        print(f"{key:>24}: {value}")


@app.command()
def verify(model: str = typer.Argument(..., help="a checkpoint directory")):
    """Check a checkpoint's files against the checksums that came with them: a Meta download's checklist.chk (MD5
    per file), a Hugging Face download's recorded digests (SHA-256 of the weights), a `herd quantize` directory's
    SHA-256 per tensor."""
    from herd.checkpoint import CheckpointError
    from herd.checkpoint.checksums import verify as verify_checksums
    from herd.llm import resolve_model_path
    from herd.quant.store import FILE, load_quantized

    path = resolve_model_path(model)
    if not path.is_dir():
        raise CheckpointError(f"{path}: holds no checksums to check against (a GGUF file carries none)")
    if (path / FILE).is_file():
        load_quantized(path / FILE, None)
        _status(f"every tensor of {FILE} matches its SHA-256")
        return
    files, size, source = verify_checksums(path, progress=sys.stderr.isatty())
    _status(f"{files} files ({size / 2**30:.2f} GiB) match {source}")


@app.command()
def tokenize(
    text: str = typer.Argument(..., help="the text, or - to read it from stdin"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="use this checkpoint's tokenizer"),
    tokenizer: Optional[Path] = typer.Option(None, help="a tokenizer.model / tokenizer.json (default: Llama 3's)"),
    chat_turn: bool = typer.Option(False, "--chat", help="encode the text as a user message in the chat format"),
    special: bool = typer.Option(False, help="read special-token text (<|eot_id|>) as special tokens"),
):
    """Print the token ids and pieces of a text."""
    from herd.tokenizer import chat_format_for, load_tokenizer

    if model is not None and tokenizer is not None:  # the second had been ignored, even a broken one
        raise typer.BadParameter("give --model or --tokenizer, not both: each names the tokenizer to use")
    if chat_turn and special:  # it had been dropped without a word
        raise typer.BadParameter("--special reads a raw text's special tokens; with --chat the text is a message, "
                                 "whose special-token text stays text (as in every chat request)")
    text = stdin_text() if text == "-" else text
    if model is not None:
        from herd.checkpoint import load_checkpoint
        from herd.llm import checkpoint_tokenizer, resolve_model_path

        tok = checkpoint_tokenizer(load_checkpoint(resolve_model_path(model)))
    else:
        tok = load_tokenizer(tokenizer)
    if chat_turn:
        ids = chat_format_for(tok).encode_dialog([{"role": "user", "content": text}])
    else:
        ids = tok.encode(text, bos=True, allowed_special="all" if special else ())
    print(json.dumps(ids))
    print(json.dumps([tok.decode([i]) for i in ids], ensure_ascii=False))
    _status(f"{len(ids)} tokens")


# Modules whose distribution is named otherwise.
_DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn", "docstring_parser": "docstring-parser",
                  "prometheus_client": "prometheus-client", "lxml_html_clean": "lxml-html-clean"}


def extra_providing(module: str) -> str | None:
    """The first of herd's extras that installs `module` (a command run without it had said only "No module named
    'uvicorn'"), or None."""
    from importlib.metadata import PackageNotFoundError, requires

    top = module.split(".")[0]
    wanted = _DISTRIBUTIONS.get(top, top).replace("_", "-").lower()
    try:
        required = requires("herd") or []
    except PackageNotFoundError:
        return None
    for requirement in required:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].replace("_", "-").lower()
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)", requirement)
        if name == wanted and extra and extra.group(1) not in ("dev", "bench"):
            return extra.group(1)
    return None


def _terminate(signum, frame) -> None:
    """SIGTERM (`kill`, `timeout`, a scheduler ending a job) unwinds as an exit, through every `finally` that removes
    a half-written output; by default it ended the process where it stood and left them behind."""
    raise SystemExit(128 + signum)


def _add_commands() -> None:
    from herd.data.cli import app as data_app  # imports its heavy dependencies only when a command runs

    app.add_typer(data_app, name="data", help="the pretraining data pipeline")
    from herd.train import cli as train_cli  # light: imports torch only when a command runs

    app.command("train", context_settings=train_cli.CONTEXT)(train_cli.train_cmd)
    app.command("report")(train_cli.report_cmd)
    app.command("scaling", context_settings=train_cli.CONTEXT)(train_cli.scaling_cmd)
    from herd.serve.cli import serve_cmd  # noqa: E402 - typer only; the server's own imports wait for the command
    app.command("serve")(serve_cmd)
    from herd.quant.cli import quantize

    app.command("quantize")(quantize)
    from herd.posttrain import cli as posttrain_cli  # light: imports torch only when a command runs

    app.command("finetune", context_settings=train_cli.CONTEXT)(posttrain_cli.finetune_cmd)
    app.command("sample")(posttrain_cli.sample_cmd)
    from herd.safety.cli import eval_security, guard_app  # light: the shields load inside the commands

    app.add_typer(guard_app, name="guard", help="Llama Guard, Prompt Guard and Code Shield (JSON out)")
    app.command("eval-security")(eval_security)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup a closed terminal stops nothing
        signal.signal(signal.SIGHUP, _terminate)  # otherwise it cleans up too: half-written outputs had stayed
    # Text the terminal's encoding lacks is escaped (as Python's stderr does): the first such character of a reply
    # had ended the command, the rest of it lost.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        _add_commands()  # seconds of imports, in which a Ctrl-C had printed a traceback
        # Without standalone mode click hands back a typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as error:  # noqa: BLE001 - the one place where any failure becomes a one-line message
        # A Rust library's panic (tokenizers, safetensors) is no Exception, but a failure all the same.
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        import click

        if isinstance(error, (click.exceptions.Exit, typer.Exit)):
            sys.exit(error.exit_code)
        # Newer typer raises its own vendored click's exceptions (subclasses of TyperException), not click's.
        if isinstance(error, (click.ClickException, typer.exceptions.TyperException)) and hasattr(error, "exit_code"):
            if error.format_message():  # a group run without its command has printed its help, and says no more
                print(f"herd: error: {error.format_message()}", file=sys.stderr)
            sys.exit(error.exit_code)
        if isinstance(error, (click.exceptions.Abort, typer.Abort)):
            if isinstance(error.__context__, EOFError):  # click makes a file's EOFError an Abort, as if Ctrl-D
                print(f"herd: error: a file ended early: it is empty or truncated ({error.__context__})",
                      file=sys.stderr)
                sys.exit(2)
            sys.exit(130)
        if os.environ.get("HERD_DEBUG"):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, ModuleNotFoundError) and (extra := extra_providing(error.name or "")):
            message = f"{error.name} is not installed; this command needs herd's {extra} extra: pip install " \
                      f"'herd[{extra}]'"
        known = isinstance(error, (ValueError, OSError, KeyError, MemoryError, ModuleNotFoundError))
        print(f"herd: error: {message}" + ("" if known else f" ({type(error).__name__}; HERD_DEBUG=1 shows where)"),
              file=sys.stderr)
        sys.exit(2 if known else 1)


if __name__ == "__main__":
    main()
