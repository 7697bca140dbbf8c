"""Chat templates that checkpoints bring (Jinja, as Hugging Face renders them), e.g. ChatML for SmolLM2."""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from herd.tokenizer import TokenizerError
from herd.tokenizer.content import content_texts
from herd.tokenizer.tool_calls import call_texts, parse_custom_calls, text_before_calls
from herd.tokenizer.tool_prompts import with_tool_prompts
from herd.tokenizer.written import WrittenCalls

if TYPE_CHECKING:
    from herd.tokenizer.hf import HFTokenizer

Message = dict[str, Any]


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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the checkpoint's chat template does not parse (line {e.lineno}: {e.message})") from None


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's tokens for a training mask
    (TRL's assistant-only loss); its content renders as written, in a block of its own as transformers makes it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _content(caller: Any) -> str:
        return caller()


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Hugging Face's override: Jinja's own filter escapes HTML characters, which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _masked(value: Any, pattern: re.Pattern) -> Any:
    """`value` (strings in dicts and lists, keys too: templates write arguments and schemas whole with tojson) with
    every match of `pattern` replaced by as many private-use characters."""
    if isinstance(value, str):
        return pattern.sub(lambda match: "\ue000" * len(match.group()), value)
    if isinstance(value, dict):
        return {_masked(k, pattern): _masked(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v, pattern) for v in value]
    return value


def _with_object_arguments(message: Message) -> Message:
    """`message` with each tool call's arguments that are a JSON object in a string (OpenAI's shape) as that object,
    which templates write with `tojson`, as transformers asks for them and vLLM and SGLang hand them over."""
    calls = message.get("tool_calls")
    return message | {"tool_calls": [_object_arguments(c) for c in calls]} if isinstance(calls, list) else message


def _object_arguments(call: Any) -> Any:
    """A tool call, in OpenAI's {"function": {...}} shape or flat, with arguments given as JSON object text parsed."""
    if not isinstance(call, dict):
        return call
    if isinstance(call.get("function"), dict):
        return call | {"function": _object_arguments(call["function"])}
    if not isinstance(arguments := call.get("arguments"), str):
        return call
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):  # not JSON: the text it is
        return call
    return call | {"arguments": parsed} if isinstance(parsed, dict) else call


def _unused_private_character(value: Any) -> str:
    """A private-use character that no string in `value` (in dicts and lists, keys too) holds."""
    used = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            used.update(item)
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += item
    planes = itertools.chain(range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))
    unused = next((c for c in map(chr, planes) if c not in used), None)
    if unused is None:
        raise ValueError("the dialog holds every private-use character, one of which must mark where the model's own "
                         "tool calls go: remove some")
    return unused


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _with_context(message: Message) -> str:
    text = "".join(content_texts(message.get("content")))
    if message.get("role") == "user" and message.get("context") is not None:
        text += "\n\n" + "".join(content_texts(message["context"]))
    return text


class TemplateChatFormat:
    """The chat format of a tokenizer that carries its own chat template; same interface as `ChatFormat`."""

    def __init__(self, tokenizer: HFTokenizer):
        if not tokenizer.chat_template:
            raise TokenizerError("this tokenizer carries no chat template; use ChatFormat for Llama 3 checkpoints")
        self.tokenizer = tokenizer
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)  # the longest first where one holds another
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._stop_texts = {tokenizer.decode([i]): i for i in tokenizer.stop_ids}
        # A token the checkpoint lacks stays undefined, as transformers leaves it: `{{ bos_token }}` writes nothing.
        self._variables = {
            name: tokenizer.decode([i])
            for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if i is not None
        }
        self.written = WrittenCalls()  # the ids of the model's recent tool-calling replies

    def encode_dialog(
        self, messages: Sequence[Message], tool_prompt_format: str = "json", tools: list[Any] | None = None
    ) -> list[int]:
        """The prompt for the assistant's next turn. The template decides the layout, so
        `tool_prompt_format` is not used; `tools` is passed to the template, which may show them. A template that
        knows nothing of tools (SmolLM2's) gets Llama 3.1's tool instructions as messages, and earlier calls
        written into the assistant's text: in prompts and training targets alike."""
        template = self.template_for(tools)
        if tools and "tools" not in template:
            messages, tools = with_tool_prompts(list(messages), tools, "json"), None
        if "tool_calls" not in template:  # the model's own replies go back as it wrote them (below)
            messages = [{**m, "content": "".join(content_texts(m.get("content")) + call_texts(m["tool_calls"], "json"))}
                        if m.get("tool_calls") and self.written.recall(m) is None else m
                        for m in messages]
        # Content reaches the template as one string (parts joined, none as ""): a text-only template (SmolLM2's)
        # adds it to its own strings. A user turn's retrieved `context` (Llama Stack's) follows its content, as
        # Llama 3's own format writes it: no template knows the field, and it had been left out.
        messages = [_with_object_arguments(m if isinstance(m.get("content"), str) and m.get("context") is None
                                           else m | {"content": _with_context(m)})
                    for m in messages]
        # A tool-calling reply of the model's own goes back as the ids it wrote, where the template puts its text:
        # it is marked there by a private-use character that no template changes and no message or tool holds.
        recalled = {n: ids for n, m in enumerate(messages) if m.get("tool_calls")
                    and (ids := self.written.recall(m)) is not None}
        tag = _unused_private_character([template, messages, tools]) if recalled else None
        written = {}
        for n, ids in recalled.items():
            mark = f"{tag}{n}{tag}"
            written[mark], messages[n] = ids, {"role": messages[n]["role"], "content": mark}
        text = render_template(template, messages, tools=tools or None, **self._variables)
        # As transformers: the template writes any BOS itself, and its special-token text is meant as such.
        pattern = self._special_text
        hidden = (_masked(messages, pattern), _masked(tools, pattern)) if pattern else (messages, tools)
        masked = None
        if hidden != (messages, tools):
            # But special-token text inside a message (a pasted transcript, a fetched web page in a tool result) is
            # text, as Llama 3's own format reads it: else a tool result could close its turn and open a system
            # one. Rendered again with that text masked, the template's own special tokens are those left in place.
            masked = render_template(template, hidden[0], tools=hidden[1] or None, **self._variables)
            if len(masked) != len(text):  # a template that measures what it is given: cannot tell the two apart
                raise ValueError("a message holds special-token text, which this checkpoint's chat template cannot "
                                 "keep apart from its own: remove it from the message")
        ids, start, end = [], 0, None
        for mark in re.finditer(f"{tag}[0-9]+{tag}", text) if written else ():
            ids += self._ended(self._encode(text[start:mark.start()], masked and masked[start:mark.start()]), end)
            reply, end = written[mark.group()]
            ids += reply
            start = mark.end()
        return ids + self._ended(self._encode(text[start:], masked and masked[start:]), end)

    def template_for(self, tools: list[Any] | None) -> str:
        """The template a dialog renders with: the checkpoint's "tool_use" one when tools are given and it names one
        (Hermes 2 Pro's, Hermes 3's; as transformers and llama.cpp choose), else its default one."""
        return (tools and self.tokenizer.tool_use_template) or self.tokenizer.chat_template

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
            "content": text_before_calls(text) if calls else text,
            "tool_calls": calls,
            "stop_reason": stop_reason or "out_of_tokens",
        }
        if calls:  # remembered as generated (a grammar may have chosen other tokens than the text's own), and its end
            written = ids if ids is not None else self.tokenizer.encode(text, bos=False)
            self.written.remember(message, (written, end))
        return message
