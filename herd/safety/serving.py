"""The shields inside herd's server (`herd serve --guard --prompt-guard --code-shield`).

Per chat request: tool results are scanned by Prompt Guard and withheld when flagged, before the prompt is
built; the request is checked (Prompt Guard for jailbreaks, Llama Guard on the last user turn) and, when unsafe,
answered with an OpenAI-shaped refusal (finish_reason "content_filter", the message in `content` and `refusal`,
naming the categories); each choice's reply passes a ReplyFilter, so blocked code never reaches the client and
an unsafe reply is replaced. What the shields decided comes back in a "shields" field (a last chunk of its own
when streaming). The checks run in worker threads: a guard model or semgrep never stalls the event loop.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from herd.safety.shields import Decision, ReplyFilter, Shields


def load_shields(guard: str | None = None, prompt_guard: str | None = None, code_shield: bool = False,
                 code_shield_mode: str = "block") -> Shields | None:
    """The shields a server's options name (None when none is switched on), warmed up. Files are checked first,
    so a wrong path is a one-line error before any model loads."""
    if code_shield_mode not in ("block", "warn"):
        raise ValueError(f"--code-shield-mode is block or warn, not {code_shield_mode!r}")
    for option, path in (("--guard", guard), ("--prompt-guard", prompt_guard)):
        if path is not None and str(path).endswith(".npz") and not Path(path).is_file():
            raise FileNotFoundError(f"{option} {path}: no such file (train one with `herd guard train`)")
    if guard is None and prompt_guard is None and not code_shield:
        return None
    llama_guard = pg = cs = None
    if prompt_guard is not None:
        from herd.safety.prompt_guard import PromptGuard

        pg = PromptGuard(prompt_guard)
    if code_shield:
        from herd.safety.code_shield import CodeShield

        cs = CodeShield()
    if guard is not None:
        from herd.safety.llama_guard import load_guard

        llama_guard = load_guard(guard)
    return Shields(llama_guard, pg, cs, code_action=code_shield_mode).warm()


class RequestShields:
    """The shields around one chat request: screen() first, then feed() for every piece of every choice."""

    def __init__(self, shields: Shields, n: int):
        self.shields, self.n = shields, n
        self.flags: list[Decision] = []  # tool results withheld
        self.refused: Decision | None = None
        self.filters: list[ReplyFilter] = []
        self.held_logprobs: list[list] = [[] for _ in range(n)]

    async def screen(self, messages: list[dict]) -> list[dict]:
        """The messages the model may read (flagged tool results withheld); sets `refused` for an unsafe request."""
        cleaned, self.flags = await asyncio.to_thread(self.shields.screen_tool_results, messages)
        verdict = await asyncio.to_thread(self.shields.check_input, cleaned)
        self.refused = None if verdict.allowed else verdict
        self.filters = [self.shields.reply_filter(cleaned) for _ in range(self.n)]
        return cleaned

    def ended(self, index: int) -> bool:
        return self.filters[index].stopped is not None

    async def feed(self, index: int, text: str, final: bool) -> str:
        """What choice `index` may send of its next piece (see ReplyFilter); a check runs only when one is due."""
        f = self.filters[index]
        if not final and not text:
            return ""
        return await asyncio.to_thread(f.feed, text, final)

    def note(self, index: int) -> str:
        """The warning appended to choice `index`'s reply at its end ("" when none): no part of what the model
        wrote, so a tool call is read from the reply without it."""
        return self.filters[index].note

    def beside(self, index: int, content: str) -> str:
        """A tool call's content for choice `index`, its warning after it (ReplyFilter.beside)."""
        return self.filters[index].beside(content)

    def logprobs(self, index: int, logprobs: list, final: bool) -> list:
        """Streaming: a choice's logprobs go out with its last chunk (they would spell out held text), and not
        at all when the shields ended it."""
        self.held_logprobs[index] += logprobs
        if not final:
            return []
        return [] if self.ended(index) else self.held_logprobs[index]

    async def filter_choices(self, choices: list[dict]) -> None:
        """Non-streaming: each whole choice replaced, annotated or left as it is."""
        for i, c in enumerate(choices):
            c["text"] = await self.feed(i, c["text"], True)
            if self.ended(i):
                c["finish_reason"], c["logprobs"] = "content_filter", []

    def report(self) -> dict[str, Any]:
        """{"shields": [...]} when any shield acted on this request, else {}."""
        decisions = self.flags + ([self.refused] if self.refused else []) + [d for f in self.filters
                                                                             for d in f.decisions]
        return {"shields": [d.as_dict() for d in decisions]} if decisions else {}

    def refusal(self, model: str, stream: bool, include_usage: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        """The answer to a refused request (the model never ran: no tokens): a chat.completion, or its chunks."""
        text = self.refused.message
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if not stream:
            return {**head, "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": text, "refusal": text},
                 "finish_reason": "content_filter", "logprobs": None} for i in range(self.n)],
                "usage": usage, **self.report()}
        head["object"] = "chat.completion.chunk"
        return [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": text, "refusal": text},
                                      "finish_reason": "content_filter", "logprobs": None}]} for i in range(self.n)] \
            + [{**head, "choices": [], **self.report(), **({"usage": usage} if include_usage else {})}]
