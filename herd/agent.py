"""The agent loop: the model answers or calls tools; herd runs the calls and hands the results back, until the
model answers without a call or the step limit is reached.

    for step in Agent(llm, tools=["brave_search", "wolfram_alpha", "code_interpreter", my_function]).run(messages):
        ...   # ModelText (streamed pieces), ToolCall, ToolResult, FinalAnswer

The model decides whether to call a tool, unless `tool_choice` says it must: "required" (some tool) or a tool's
name. Then its first reply is decoded under the grammar of a JSON call to that tool (what vLLM and the server do
for the same tool_choice): a small model that would never write a well-formed call by itself makes one whose
arguments follow the schema. Once a tool has been called the choice is the model's again, or it would be made to
call tools for ever (the OpenAI Agents SDK resets its tool_choice the same way).

Built-in tools go into the system prompt as Llama 3.1 expects them (`Environment: ipython`, `Tools: ...`; LLM.chat
does that, also for a checkpoint's template that knows nothing of tools) and their results come back as `ipython`
messages; custom functions' results come back as `tool` messages. Every
tool result can pass a `guard` (a callable scoring text as a prompt injection, e.g. Prompt Guard) first.

A custom function gets `tool_timeout` seconds (60 by default; a Tool's own `timeout` comes first): one that runs
longer is left running in a daemon thread and the model reads an error naming it and the limit. The built-ins keep
their own limits (the sandbox's, the HTTP clients').
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from herd.generate.sampling import SamplingParams
from herd.tokenizer.tool_calls import QUERY_TOOLS, call_arguments, parse_calls
from herd.tools.functions import Tool, as_tool, check_timeout, result_text
from herd.tools.http import ToolError

Message = dict[str, Any]
# What the model reads of a result for which its context has no room: the turn ends there.
_NO_ROOM = "[tool result dropped: the dialog leaves no room for it in the model's context]"


@dataclass(frozen=True)
class ModelText:
    """A piece of the model's reply as it is generated."""

    text: str
    kind: str = "model_text"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]
    kind: str = "tool_call"
    # The model's message the call is part of (all its calls, its stop_reason): what a server reports the reply as.
    reply: Message | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    name: str
    content: str  # what the model reads
    error: bool = False
    files: dict[str, bytes] = field(default_factory=dict)  # files the code interpreter wrote
    flagged: float | None = None  # the guard's score when it flagged the result
    kind: str = "tool_result"


@dataclass(frozen=True)
class FinalAnswer:
    message: Message  # the assistant's last message
    messages: list[Message]  # the whole dialog, tool calls and results included
    steps: int
    # end_of_turn, out_of_tokens, max_steps when the limit cut the loop short, or context_length_exceeded when a
    # tool result left the model no room to read it and answer
    stop_reason: str
    kind: str = "final_answer"

    @property
    def text(self) -> str:
        return self.message.get("content") or ""


Step = ModelText | ToolCall | ToolResult | FinalAnswer


@dataclass
class Guard:
    """Passes tool results through `score` (text -> probability of an injection); at `threshold` or above the
    result is flagged, and with `block` replaced by a notice so the model never reads it."""

    score: Callable[[str], float]
    threshold: float = 0.5
    block: bool = True

    @classmethod
    def prompt_guard(cls, guard, threshold: float = 0.5, block: bool = True) -> Guard:
        """Prompt Guard (herd.safety.PromptGuard, or the path of its classifier file) on tool results: scored as
        Meta scores third-party data, injection and jailbreak together (1 - benign, the least benign window)."""
        if not hasattr(guard, "score"):
            from herd.safety.prompt_guard import PromptGuard

            guard = PromptGuard(guard)
        return cls(lambda text: 1.0 - guard.score(text)["benign"], threshold, block)


class Agent:
    def __init__(self, llm, tools: Sequence[Tool | str | dict | Callable[..., Any]] = (), *, max_steps: int = 8,
                 guard: Guard | Callable[[str], float] | None = None, tool_prompt_format: str = "json",
                 tool_choice: str = "auto", stream: bool = True, tool_timeout: float | None = 60.0, **sampling):
        self.llm = llm
        self.tools = {tool.name: tool for tool in map(as_tool, tools)}
        if tool_choice not in ("auto", "required", *self.tools):
            raise ValueError(f"tool_choice must be auto, required or one of the tools ({', '.join(self.tools)}), "
                             f"not {tool_choice!r}")
        if tool_choice != "auto" and not self.tools:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools to call")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer of at least 1, not {max_steps!r}")
        check_timeout("tool_timeout", tool_timeout)
        self.tool_choice = tool_choice
        self.max_steps = max_steps
        self.tool_timeout = tool_timeout
        self.guard = guard if isinstance(guard, Guard) or guard is None else Guard(guard)
        self.tool_prompt_format, self.stream, self.sampling = tool_prompt_format, stream, sampling

    def run(self, messages: Sequence[Message]) -> Iterator[Step]:
        """Steps as they happen; the last one is always a FinalAnswer."""
        dialog = list(messages)
        reply: Message = {"role": "assistant", "content": ""}
        tool_choice = self.tool_choice
        for step in range(1, self.max_steps + 1):
            reply = yield from self._reply(dialog, tool_choice)
            dialog.append(reply)
            calls = reply.get("tool_calls") or []
            if not calls:
                yield FinalAnswer(reply, dialog, step, reply.get("stop_reason") or "end_of_turn")
                return
            if step == self.max_steps:
                # The last reply allowed is the answer, its calls not run, as Llama Stack ends a turn at
                # max_infer_iters: their results had been fetched for no reply to read.
                yield FinalAnswer(reply, dialog, step, "max_steps")
                return
            tool_choice = "auto"
            for index, call in enumerate(calls):
                request = ToolCall(call["id"], call["function"]["name"], _arguments(call), reply=reply)
                yield request
                # Each result gets its share of the room left, so that the calls after it still get some.
                result = self._fitted(dialog, self._execute(request), share=len(calls) - index)
                if result.content != _NO_ROOM:
                    result = self._guarded(result)
                yield result
                dialog.append(self._message(result))
                if result.content == _NO_ROOM:
                    yield FinalAnswer(reply, dialog, step, "context_length_exceeded")
                    return

    def _reply(self, dialog: list[Message], tool_choice: str):
        """The model's next message, its text streamed as ModelText steps (a generator returning the message)."""
        specs = [tool.spec() for tool in self.tools.values()] or None
        options = dict(tools=specs, tool_prompt_format=self.tool_prompt_format, **self.sampling)
        if tool_choice != "auto":
            options["tool_choice"] = tool_choice
        if self.stream:
            reply = yield from _model_text(self.llm.chat(dialog, stream=True, **options))
        else:
            reply = self.llm.chat(dialog, **options)
            if reply.get("content"):
                yield ModelText(reply["content"])
        if not reply.get("tool_calls") and self.tools:
            # Formats that read only JSON calls still see a built-in called Llama's way (brave_search.call(...)).
            found = [c for c in parse_calls((reply.get("content") or "").strip(), python_tag=False)
                     if c["function"]["name"] in self.tools]
            if found:
                reply = {**reply, "content": "", "tool_calls": found}
        if any(self._is_builtin(c["function"]["name"]) for c in reply.get("tool_calls") or ()):
            reply["stop_reason"] = "end_of_message"  # as Llama 3.1 ends a built-in call: <|eom_id|>
        return reply

    def _is_builtin(self, name: str) -> bool:
        return name in self.tools and self.tools[name].builtin

    def _execute(self, call: ToolCall) -> ToolResult:
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return ToolResult(call.id, call.name, f"error: there is no tool {call.name!r} (tools: {known})", True)
        try:
            # The built-ins end their own work (the sandbox kills its process), better than a thread left behind.
            value = tool(call.arguments) if tool.builtin else tool(call.arguments, timeout=self.tool_timeout)
        except ToolError as error:
            return ToolResult(call.id, call.name, f"error: {error}", True)
        files = value.get("files", {}) if isinstance(value, dict) and call.name == "code_interpreter" else {}
        failed = isinstance(value, dict) and call.name == "code_interpreter" and value.get("error") is not None
        return ToolResult(call.id, call.name, result_text(value), failed, files)

    def _guarded(self, result: ToolResult) -> ToolResult:
        if self.guard is None:
            return result
        score = float(self.guard.score(result.content))
        if score < self.guard.threshold:
            return result
        content = (f"[tool result withheld: it looks like a prompt injection (score {score:.2f})]"
                   if self.guard.block else result.content)
        return ToolResult(result.call_id, result.name, content, result.error, result.files, flagged=score)

    def _fitted(self, dialog: list[Message], result: ToolResult, share: int) -> ToolResult:
        """The result, its middle cut where the model could not read it whole and still answer within its context
        (_NO_ROOM where even a cut one leaves no room)."""
        capacity = getattr(getattr(self.llm, "generator", None), "capacity", None)
        if capacity is None:
            return result
        tokenizer = self.llm.chat_format.tokenizer
        reserve = min(self.sampling.get("max_tokens", SamplingParams.max_tokens) or capacity, capacity // 4)
        empty = self._prompt_length([*dialog, self._message(replace(result, content=""))])
        room = (capacity - empty - reserve) // share

        def length(text: str) -> int:
            return len(tokenizer.encode(text, bos=False))

        content = result.content
        if len(content) <= room or length(content) <= room:
            return result
        keep = len(content) * room // length(content)
        while keep > 0:
            cut = len(content) - keep
            text = (f"{content[:keep - keep // 2]}\n[... {cut} characters cut: the result was too long for the "
                    f"model's context ...]\n{content[len(content) - keep // 2:]}")
            if length(text) <= room:
                return replace(result, content=text)
            keep = keep * 9 // 10
        return replace(result, content=_NO_ROOM)

    def _prompt_length(self, dialog: list[Message]) -> int:
        specs = [tool.spec() for tool in self.tools.values()] or None
        if hasattr(self.llm, "chat_prompt"):  # an LLM's own template can differ from encode_dialog's
            return len(self.llm.chat_prompt(dialog, specs, self.tool_prompt_format))
        return len(self.llm.chat_format.encode_dialog(dialog, tool_prompt_format=self.tool_prompt_format,
                                                      tools=specs))

    def _message(self, result: ToolResult) -> Message:
        if self._is_builtin(result.name):
            return {"role": "ipython", "content": result.content}
        return {"role": "tool", "tool_call_id": result.call_id, "content": result.content}


def _model_text(stream):
    """A streamed chat's pieces as ModelText steps; returns the reply message the stream returns."""
    while True:
        try:
            piece = next(stream)
        except StopIteration as done:
            return done.value
        yield ModelText(piece)


def _arguments(call: dict) -> dict[str, Any]:
    """A call's arguments; a built-in called in JSON form with another argument name still gets its query."""
    try:
        arguments = call_arguments(call)
    except ValueError:
        return {}
    name = call["function"]["name"]
    if name in QUERY_TOOLS and "query" not in arguments and len(arguments) == 1:
        return {"query": next(iter(arguments.values()))}
    if name == "code_interpreter" and "code" not in arguments and len(arguments) == 1:
        return {"code": next(iter(arguments.values()))}
    return arguments
