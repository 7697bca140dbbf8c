"""The Llama 3 / 3.1 chat format: dialogs of OpenAI-shaped messages to ids, and replies back to messages.

<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...<|eot_id|>
<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>
<|start_header_id|>assistant<|end_header_id|>\\n\\n            <- the model continues here
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from herd.tokenizer import TokenizerError
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.llama3 import Llama3Tokenizer
from herd.tokenizer.content import content_texts
from herd.tokenizer.template import TemplateChatFormat
from herd.tokenizer.tool_calls import (BUILTIN_TOOLS, TOOL_PROMPT_FORMATS, call_name, call_texts, parse_calls,
                                       text_before_calls)
from herd.tokenizer.tool_prompts import with_tool_prompts
from herd.tokenizer.written import WrittenCalls

Message = dict[str, Any]
Tokenizer = Llama3Tokenizer | HFTokenizer

_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}


class ChatFormat:
    """Encodes dialogs as Llama 3 instruct models were tuned to read them, and parses their replies."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.special_tokens
        self._start_header, self._end_header = special["<|start_header_id|>"], special["<|end_header_id|>"]
        # Llama 3.0's vocabulary has neither of the last two (its ids are reserved tokens): no tool calls then.
        self._eot, self._eom, self._python_tag = (special["<|eot_id|>"], special.get("<|eom_id|>"),
                                                  special.get("<|python_tag|>"))
        self._stop_reasons = {i: "end_of_turn" for i in {*tokenizer.stop_ids, self._eot}} | (
            {self._eom: "end_of_message"} if self._eom is not None else {})
        self.written = WrittenCalls()  # the ids of the model's recent tool-calling replies, and why each ended

    def encode_dialog(
        self,
        messages: Sequence[Message],
        tool_prompt_format: str = "json",
        tools: list[Any] | None = None,
        *,
        today: datetime.date | None = None,
    ) -> list[int]:
        """The prompt for the assistant's next turn: <|begin_of_text|>, each message, the assistant header.

        With `tools`, the system prompt and tool instructions for `tool_prompt_format` ("json",
        "function_tag" or "python_list") are generated first, dated `today` (default: the real today).
        """
        if tool_prompt_format not in TOOL_PROMPT_FORMATS:
            raise ValueError(
                f"unknown tool prompt format {tool_prompt_format!r}; expected one of {TOOL_PROMPT_FORMATS}"
            )
        messages = list(messages)
        if tools:
            messages = with_tool_prompts(messages, tools, tool_prompt_format, today)
        ids = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in messages:
            ids += self.encode_message(message, tool_prompt_format)
        return ids + self._header("assistant")

    def encode_message(self, message: Message, tool_prompt_format: str = "json") -> list[int]:
        """One message: header, content (then retrieved `context`, then tool calls), <|eot_id|> or <|eom_id|>.

        Message text is never read as special tokens, so content cannot forge headers or stops.
        """
        role = message["role"]
        if role not in _ROLES:
            raise ValueError(f"unknown message role {role!r}; expected one of {sorted(_ROLES)}")
        calls = (message.get("tool_calls") or []) if role == "assistant" else []
        if calls and (written := self.written.recall(message)) is not None:
            ids, stop_reason = written
            eom = (message.get("stop_reason") or stop_reason) == "end_of_message"  # a message's own word first
            return self._header("assistant") + ids + [self._end(eom)]
        content = self._content(message.get("content"))
        ids = self._header(_ROLES[role]) + content
        if role == "user" and message.get("context") is not None:
            ids += self._text("\n\n") + self._content(message["context"])
        builtin = any(call_name(c) in BUILTIN_TOOLS for c in calls)
        if calls:
            # The model opens a built-in call with <|python_tag|>, after any text it writes first (Meta's 3.1
            # prompt-format pages); custom calls (JSON, <function=...>, a Python list) go without, as in
            # llama-models, unless text comes first: only the tag tells the call from the text then, as
            # decode_assistant reads it, so that history re-encodes as the model wrote it.
            if builtin or content:
                ids.append(self._special(self._python_tag, "<|python_tag|>"))
            for text in call_texts(calls, tool_prompt_format):
                ids += self._text(text)
        # A message that does not say why it ended (an OpenAI client's) ended as the model ends a built-in call:
        # with <|eom_id|>, the environment's turn to run it.
        stop_reason = message.get("stop_reason") or ("end_of_message" if builtin else None)
        eom = role == "assistant" and stop_reason == "end_of_message"
        return ids + [self._end(eom)]

    def decode_assistant(self, reply: str | Sequence[int], stop_reason: str | None = None) -> Message:
        """The assistant message in a model reply (text, or ids as generated). Never raises on model output.

        Ids are read up to the first stop token, which sets `stop_reason` (else the given one, else
        "out_of_tokens"); text may end in "<|eot_id|>" or "<|eom_id|>". A well-formed tool call becomes
        `tool_calls`, the content being any text before it (before <|python_tag|> or a `<function=...>` tag);
        anything else stays content.
        """
        ids = None
        if isinstance(reply, str):
            text = reply.strip(" ")
        else:
            ids = list(reply)
            stop = next((n for n, i in enumerate(ids) if i in self._stop_reasons), None)
            if stop is not None:
                stop_reason = self._stop_reasons[ids[stop]]
                ids = ids[:stop]
            text = self.tokenizer.decode(ids).strip(" ")
        header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if text.startswith(header):
            text, ids = text.removeprefix(header), None
        for token, reason in (("<|eot_id|>", "end_of_turn"), ("<|eom_id|>", "end_of_message")):
            if text.endswith(token):
                text, stop_reason = text.removesuffix(token), reason
        # Text the model writes before <|python_tag|> stays the message's content; the call follows the tag.
        before, python_tag, body = text.partition("<|python_tag|>") if self._python_tag is not None else (text, "", "")
        calls = parse_calls(body, True) if python_tag else parse_calls(text, False)
        message = {
            "role": "assistant",
            "content": before if python_tag else text_before_calls(text) if calls else text,
            "tool_calls": calls,
            "stop_reason": stop_reason or "out_of_tokens",
        }
        if calls:  # remembered as generated (a grammar may have chosen other tokens than the text's own) or read
            written = ids if ids is not None else (
                self._text(before) + [self._python_tag] + self._text(body) if python_tag else self._text(text))
            self.written.remember(message, (written, message["stop_reason"]))
        return message

    def _end(self, eom: bool) -> int:
        return self._special(self._eom, "<|eom_id|>") if eom else self._eot

    @staticmethod
    def _special(token: int | None, name: str) -> int:
        if token is None:
            raise ValueError(f"this tokenizer has no {name} (a Llama 3.0 vocabulary): tool calls need Llama 3.1's")
        return token

    def _header(self, role: str) -> list[int]:
        return [self._start_header, *self._text(role), self._end_header, *self._text("\n\n")]

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _content(self, content: str | list[dict[str, Any]] | None) -> list[int]:
        # Each part is encoded on its own, as the reference does; that decides the ids at part boundaries.
        return [i for text in content_texts(content) for i in self._text(text)]


# Llama 3's chat format as a Jinja template, written into exported checkpoints: transformers' apply_chat_template
# and vLLM refuse to chat without one, and llama.cpp recognises this one as Llama 3's. It renders what ChatFormat
# encodes for dialogs without tools; herd reading it back chats with ChatFormat itself, tools included.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}{{- raise_exception('this template has no tool prompt: use herd for tools') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.get('tool_calls') %}{{- raise_exception('this template writes no tool calls') }}{%- endif %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    # content as a list of parts (OpenAI's), whose text transformers users send too: it had raised a TypeError
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + content + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat | TemplateChatFormat:
    """The chat format a tokenizer's checkpoint expects: its own template if it brings one, else Llama 3's."""
    if isinstance(tokenizer, Llama3Tokenizer):
        return ChatFormat(tokenizer)
    if tokenizer.chat_template and tokenizer.chat_template != LLAMA3_CHAT_TEMPLATE:
        return TemplateChatFormat(tokenizer)
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= tokenizer.special_tokens.keys():
        return ChatFormat(tokenizer)
    raise TokenizerError(
        "this tokenizer has no chat template and is not Llama 3's; use a checkpoint that brings a chat_template"
    )
