"""Verifiers: scores of a reply that need no judge, because the truth is known.

A verifier is any function `(row, reply_text) -> float`; `load_verifier("module:function")` imports one.
Built in: `answer` (the reply's last number equals the row's "answer"), `only_answer` (it is the reply's only
number) and `python_tests` (the reply's code passes the row's "tests", run in herd's code sandbox,
herd.tools.sandbox, with a time and a memory limit).
"""
from __future__ import annotations

import importlib
import math
import re
import secrets
from collections.abc import Callable

Verifier = Callable[[dict, str], float]

# A number as a reply writes it: "1,000" (commas only between groups of three digits: "3,4" is two numbers), "2.5",
# ".5", "1e5" and "2.5E-3" (an exponent only where no letter follows: "3eggs" is 3), a simple fraction "1/2", and a
# minus (a hyphen, or U+2212 as typeset maths writes it) only where it starts a number ("2-5" is 2 and 5, not -5).
_NUMBER = re.compile(r"""
    (?P<sign>(?<![\w)\]])[-\u2212])?
    (?: (?P<numerator>\d+)/(?P<denominator>0*[1-9]\d*)(?!\d|\.\d)
      | (?P<value>(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+(?!\w))?) )
""", re.VERBOSE)
# A fenced block: its fences start lines (so that a block's closing fence never opens the next one), its tag is the
# opening line's first word, its lines end in \n or \r\n.
_CODE_BLOCK = re.compile(r"^```[ \t]*(?P<tag>[^\s`]*)[^\n]*\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def numbers(text: str) -> list[float]:
    found = []
    for match in _NUMBER.finditer(text):
        if match["value"] is not None:
            value = float(match["value"].replace(",", ""))
        else:
            value = int(match["numerator"]) / int(match["denominator"])
        found.append(-value if match["sign"] else value)
    return found


def last_number(text: str) -> float | None:
    found = numbers(text)
    return found[-1] if found else None


def expected_answer(value) -> float:
    """A row's "answer": a number, or text holding exactly one number as `numbers` reads it ("1,000", "$5", "1/2")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        found = [float(value)]
    else:
        found = numbers(value) if isinstance(value, str) else []
    if len(found) != 1 or not math.isfinite(found[0]):
        raise ValueError(f'"answer" must be one number (like 12, "1,000" or "1/2"), not {value!r}')
    return found[0]


def answer(row: dict, reply: str) -> float:
    """1 if the last number in the reply is the row's "answer", else 0."""
    found = last_number(reply)
    return float(found is not None and abs(found - expected_answer(row["answer"])) < 1e-9)


def only_answer(row: dict, reply: str) -> float:
    """1 if the reply's only number is the row's "answer" (for prompts that ask for just the number: a reply that
    also repeats the question's numbers, right or wrong, does not count)."""
    return float(len(numbers(reply)) == 1 and answer(row, reply) == 1.0)


def python_tests(row: dict, reply: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """1 if the reply's code (see `reply_code`) passes the row's "tests": run with them in herd's code sandbox, it
    exits 0 and leaves a random word in a file the run writes after the tests (code that ends the process before
    them, with sys.exit(0) or an atexit os._exit(0), exits 0 too). The sandbox kills the code's whole process tree
    at the timeout and shows it no host file; where none can be made, ValueError."""
    from herd.tools.sandbox import WORK_DIR, Limits, run_python

    _require_sandbox()
    done_word = secrets.token_hex(16)
    # A file, not a line printed last: the sandbox keeps only the start of stdout. Builtins' open, since the reply
    # may define an `open` of its own; an absolute path, since it may have changed directory.
    done = f"__import__('builtins').open({f'{WORK_DIR}/{_DONE_FILE}'!r}, 'w').write({done_word!r})"
    code = f"{reply_code(reply)}\n\n{row['tests']}\n{done}\n"
    # The CPU limit a second above the wall clock's, as the code interpreter sets it, so a busy loop times out.
    limits = Limits(timeout=timeout_s, cpu_seconds=math.ceil(timeout_s) + 1, memory_mb=memory_mb)
    run = run_python(code, limits=limits)
    return float(run["exit_code"] == 0 and run["files"].get(_DONE_FILE) == done_word.encode())


# The sandbox returns the files in name order up to Limits.returned_files: a leading "." comes before the names code
# usually writes.
_DONE_FILE = ".herd-tests-done"


def reply_code(reply: str) -> str:
    """The code in a reply: its first block tagged python (or py, python3, py3), else its first untagged block (never
    another language's), else the whole reply."""
    untagged = None
    for block in _CODE_BLOCK.finditer(reply):
        tag = block["tag"].lower()
        if tag in _PYTHON_TAGS:
            return block["code"]
        if not tag and untagged is None:
            untagged = block["code"]
    return reply if untagged is None else untagged


def _require_sandbox() -> None:
    from herd.tools.sandbox import sandbox_problem

    problem = sandbox_problem()
    if problem:
        raise ValueError(f"the python_tests verifier runs code only in a sandbox, and none can be made here: {problem}")


def _check_answer(row: dict) -> None:
    expected_answer(row["answer"])


BUILTIN = {"answer": answer, "only_answer": only_answer, "python_tests": python_tests}
# the row field each built-in verifier reads
NEEDS = {"answer": "answer", "only_answer": "answer", "python_tests": "tests"}
# what a built-in verifier checks of each prompt row when the prompts are read, before any sampling (ValueError)
ROW_CHECKS = {"answer": _check_answer, "only_answer": _check_answer}


def load_verifier(spec: str) -> Verifier:
    """A built-in verifier by name, or any function as "package.module:function"."""
    if spec == "python_tests":
        _require_sandbox()
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"unknown verifier {spec!r}: use {', '.join(BUILTIN)} or module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load the verifier {spec!r} ({error})") from None
