"""Verifiers: scores of a reply that need no judge, because the truth is known.

A verifier is any function `(row, reply_text) -> float`; `load_verifier("module:function")` imports one.
Built in: `answer` (the reply's last number equals the row's "answer"), `only_answer` (it is the reply's only
number) and `python_tests` (the reply's code passes the row's "tests", run in a separate, isolated Python process
with a time and a memory limit).
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

Verifier = Callable[[dict, str], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def last_number(text: str) -> float | None:
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def answer(row: dict, reply: str) -> float:
    """1 if the last number in the reply is the row's "answer", else 0."""
    found = last_number(reply)
    return float(found is not None and abs(found - float(row["answer"])) < 1e-9)


def only_answer(row: dict, reply: str) -> float:
    """1 if the reply's only number is the row's "answer" (for prompts that ask for just the number: a reply that
    also repeats the question's numbers, right or wrong, does not count)."""
    return float(len(_NUMBER.findall(reply)) == 1 and answer(row, reply) == 1.0)


def python_tests(row: dict, reply: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """1 if the reply's code (its first ```python block, else the whole reply) passes the row's "tests"."""
    block = _CODE_BLOCK.search(reply)
    code = (block.group(1) if block else reply) + "\n\n" + row["tests"] + "\n"
    with tempfile.TemporaryDirectory(prefix="herd-verify-") as workdir:
        script = Path(workdir) / "check.py"
        script.write_text(code)
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", str(script)], cwd=workdir, capture_output=True, timeout=timeout_s,
                preexec_fn=lambda: _limit_memory(memory_mb), stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return 0.0
    return float(done.returncode == 0)


def _limit_memory(memory_mb: int) -> None:
    import resource

    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))


BUILTIN = {"answer": answer, "only_answer": only_answer, "python_tests": python_tests}
# the row field each built-in verifier reads
NEEDS = {"answer": "answer", "only_answer": "answer", "python_tests": "tests"}


def load_verifier(spec: str) -> Verifier:
    """A built-in verifier by name, or any function as "package.module:function"."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"unknown verifier {spec!r}: use {', '.join(BUILTIN)} or module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load the verifier {spec!r} ({error})") from None
