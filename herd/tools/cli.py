"""`herd chat --tools ...`: one turn of the agent loop, its tool calls and results shown as they happen.

The model's text streams to stdout; each call and result is a line on stderr; files the code interpreter
writes are saved under ./herd-files/ (written whole, then renamed).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from herd.atomic import atomic_output

FILES_DIR = Path("herd-files")
_SHOWN = 300  # characters of a tool result shown


@dataclass
class AgentTools:
    """What `--tools` and `--prompt-guard` ask for."""

    tools: list
    guard: object = None  # herd.agent.Guard


def parse_tool_option(tools: str | None, prompt_guard: Path | None = None) -> AgentTools:
    """The tools of `--tools brave_search,wolfram_alpha,code_interpreter[,module:function]`, and the Prompt Guard
    their results pass (`--prompt-guard PATH`)."""
    from herd.agent import Guard
    from herd.tools import ToolError, parse_tools

    if not tools:
        raise ValueError("--prompt-guard screens what tools return: give --tools as well")
    try:
        found = parse_tools(tools)
    except ToolError as error:  # a built-in without its configuration: bad input, as a bad spec is
        raise ValueError(f"--tools: {error}") from None
    try:
        guard = Guard.prompt_guard(prompt_guard) if prompt_guard else None
    except (OSError, ValueError) as error:
        raise ValueError(f"--prompt-guard {prompt_guard}: {str(error).splitlines()[0]}") from None
    return AgentTools(found, guard)


def make_agent(llm, tools: AgentTools, **sampling):
    from herd.agent import Agent

    return Agent(llm, tools=tools.tools, guard=tools.guard, **sampling)


def agent_turn(agent, history: list[dict]) -> bool:
    """Answer the last user message in `history`, appending the calls, results and answer to it; False where it went
    unanswered (over the context: the message is taken back)."""
    from herd.agent import FinalAnswer, ModelText, ToolCall, ToolResult
    from herd.generate import ContextLengthError

    try:
        for step in agent.run(history):
            if isinstance(step, ModelText):
                print(step.text, end="", flush=True)
            elif isinstance(step, ToolCall):
                arguments = ", ".join(f"{k}={v!r}" for k, v in step.arguments.items())
                _status(f"\n[{step.name}({_short(arguments)})]")
            elif isinstance(step, ToolResult):
                flag = f" (flagged {step.flagged:.2f})" if step.flagged is not None else ""
                _status(f"[{step.name} {'error' if step.error else 'result'}{flag}: {_short(step.content)}]")
                for name, data in step.files.items():
                    _status(f"[saved {_save(name, data)}]")
            elif isinstance(step, FinalAnswer):
                print(flush=True)
                if step.stop_reason == "max_steps":
                    _status(f"(stopped after {step.steps} steps)")
                history[:] = step.messages
    except KeyboardInterrupt:
        # The message is taken back, as the plain chat takes back one not yet answered: the calls and text of the
        # turn are not in the history, and the message had stayed there as if still waiting for its answer.
        _status("\n(interrupted: the message is taken back)")
        history.pop()
    except ContextLengthError as error:
        _status(f"herd: error: {error} (or /reset the conversation)")
        history.pop()
        return False
    return True


def _save(name: str, data: bytes) -> Path:
    """Under herd-files/ at the path the code gave it there, never over a file already saved (r.txt, r-2.txt...): a
    file of the same name in another folder, or from an earlier turn, had replaced the one before it unsaid."""
    parts = [part for part in PurePosixPath(name).parts if part not in ("/", ".", "..")] or ["file"]
    wanted = FILES_DIR.joinpath(*parts)
    if any(parent.exists() and not parent.is_dir() for parent in wanted.parents):  # a file saved as `out` before
        wanted = FILES_DIR / "-".join(parts)
    path = wanted
    for n in itertools.count(2):
        if not path.exists():
            break
        path = wanted.with_name(f"{wanted.stem}-{n}{wanted.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
