"""Chat templates that checkpoints bring (Jinja, as Hugging Face renders them), e.g. ChatML for SmolLM2."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from herd.tokenizer import TokenizerError
from herd.tokenizer.tool_calls import parse_custom_calls

if TYPE_CHECKING:
    from herd.tokenizer.hf import HFTokenizer

Message = dict[str, Any]


def content_texts(content: str | list[dict[str, Any]] | None) -> list[str]:
    """The texts of a message's content: a string, None, or a list of OpenAI-style parts ({"type": "text", "text":
    ...}; other kinds carry no text). Anything else is a ValueError saying what was given."""
    if content is None or isinstance(content, str):
        return [content] if content else []
    if isinstance(content, list) and all(isinstance(part, dict) and (part.get("type") != "text" or isinstance(
            part.get("text"), str)) for part in content):
        return [part["text"] for part in content if part.get("type") == "text"]
    raise ValueError("a message's content must be a string or a list of parts such as {'type': 'text', 'text': "
                     f"'...'}}, not {json.dumps(content, default=repr)[:60]}")


def render_template(
    template: str, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any
) -> str:
    """The text of `messages` under a Jinja chat template, with transformers' `apply_chat_template` semantics.

    `extra` becomes template variables (bos_token, eos_token, tools, ...). A template that rejects the
    dialog through `raise_exception` raises ValueError with its message.
    """
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template rejected the dialog: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come with downloaded checkpoints, so they run sandboxed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the checkpoint's chat template does not parse (line {e.lineno}: {e.message})") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Hugging Face's override: Jinja's own filter escapes HTML characters, which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _masked(value: Any, pattern: re.Pattern) -> Any:
    """`value` (strings in dicts and lists) with every match of `pattern` replaced by as many private-use characters."""
    if isinstance(value, str):
        return pattern.sub(lambda match: "\ue000" * len(match.group()), value)
    if isinstance(value, dict):
        return {k: _masked(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v, pattern) for v in value]
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class TemplateChatFormat:
    """The chat format of a tokenizer that carries its own chat template; same interface as `ChatFormat`."""

    def __init__(self, tokenizer: HFTokenizer):
        from herd.tokenizer.written import WrittenCalls  # which reads messages with this module's content_texts

        if not tokenizer.chat_template:
            raise TokenizerError("this tokenizer carries no chat template; use ChatFormat for Llama 3 checkpoints")
        self.tokenizer = tokenizer
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)  # the longest first where one holds another
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._stop_texts = {tokenizer.decode([i]): i for i in tokenizer.stop_ids}
        self._variables = {
            name: tokenizer.decode([i]) if i is not None else None
            for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
        }
        self.written = WrittenCalls()  # the ids of the model's recent tool-calling replies

    def encode_dialog(
        self, messages: Sequence[Message], tool_prompt_format: str = "json", tools: list[Any] | None = None
    ) -> list[int]:
        """The prompt for the assistant's next turn. The template decides the layout, so
        `tool_prompt_format` is not used; `tools` is passed to the template, which may show them."""
        # Content reaches the template as one string (parts joined, none as ""): a text-only template (SmolLM2's)
        # adds it to its own strings.
        messages = [m if isinstance(m.get("content"), str)
                    else m | {"content": "".join(content_texts(m.get("content")))} for m in messages]
        # A tool-calling reply of the model's own goes back as the ids it wrote, where the template puts its text.
        written = {}
        for n, message in enumerate(messages):
            if message.get("tool_calls") and (ids := self.written.recall(message)) is not None:
                mark = f"\ue000{n}\ue001"  # private-use characters: no template changes them, no message holds them
                written[mark], messages[n] = ids, {"role": message["role"], "content": mark}
        text = render_template(self.tokenizer.chat_template, messages, tools=tools or None, **self._variables)
        # As transformers: the template writes any BOS itself, and its special-token text is meant as such.
        pattern = self._special_text
        hidden = (_masked(messages, pattern), _masked(tools, pattern)) if pattern else (messages, tools)
        masked = None
        if hidden != (messages, tools):
            # But special-token text inside a message (a pasted transcript, a fetched web page in a tool result) is
            # text, as Llama 3's own format reads it: else a tool result could close its turn and open a system
            # one. Rendered again with that text masked, the template's own special tokens are those left in place.
            masked = render_template(self.tokenizer.chat_template, hidden[0], tools=hidden[1] or None,
                                     **self._variables)
            if len(masked) != len(text):  # a template that measures what it is given: cannot tell the two apart
                raise ValueError("a message holds special-token text, which this checkpoint's chat template cannot "
                                 "keep apart from its own: remove it from the message")
        ids, start, end = [], 0, None
        for mark in re.finditer("\ue000[0-9]+\ue001", text) if written else ():
            ids += self._ended(self._encode(text[start:mark.start()], masked and masked[start:mark.start()]), end)
            reply, end = written[mark.group()]
            ids += reply
            start = mark.end()
        return ids + self._ended(self._encode(text[start:], masked and masked[start:]), end)

    def _ended(self, ids: list[int], end: int | None) -> list[int]:
        """The ids after a remembered reply: the template's end of its turn is the stop token the model wrote
        (Llama 3.1's template writes <|eot_id|> where the model may have ended a call with <|eom_id|>)."""
        if end is not None and ids and ids[0] in self.tokenizer.stop_ids:
            ids[0] = end
        return ids

    def _encode(self, text: str, masked: str | None) -> list[int]:
        """Rendered text to ids: special-token text is the token where `masked` (the text rendered with the
        messages' own special-token text masked) still holds it, and everywhere when there is no such text."""
        if masked is None:
            return self.tokenizer.encode(text, bos=False, allowed_special="all")
        ids, start = [], 0
        for match in self._special_text.finditer(text):
            if masked[match.start():match.end()] == match.group():
                ids += self.tokenizer.encode(text[start:match.start()], bos=False)
                ids.append(self.tokenizer.special_tokens[match.group()])
                start = match.end()
        return ids + self.tokenizer.encode(text[start:], bos=False)

    def decode_assistant(self, reply: str | Sequence[int], stop_reason: str | None = None) -> Message:
        """The assistant message in a model reply (text, or ids as generated). Never raises on model output."""
        end = None  # the stop token that ended the reply
        if isinstance(reply, str):
            text, ids = reply, None
        else:
            ids = list(reply)
            stop = next((n for n, i in enumerate(ids) if i in self.tokenizer.stop_ids), None)
            if stop is not None:
                ids, end = ids[:stop], ids[stop]
            text = self.tokenizer.decode(ids)
        for token, i in self._stop_texts.items():
            if end is None and text.endswith(token):
                text, ids, end = text.removesuffix(token), None, i
        if end is not None:  # Llama 3.1's <|eom_id|> where a checkpoint's template speaks Llama's tokens
            stop_reason = "end_of_message" if self.tokenizer.decode([end]) == "<|eom_id|>" else "end_of_turn"
        calls = parse_custom_calls(text.strip())
        message = {
            "role": "assistant",
            "content": "" if calls else text,
            "tool_calls": calls,
            "stop_reason": stop_reason or "out_of_tokens",
        }
        if calls:  # remembered as generated (a grammar may have chosen other tokens than the text's own), and its end
            written = ids if ids is not None else self.tokenizer.encode(text, bos=False)
            self.written.remember(message, (written, end))
        return message
