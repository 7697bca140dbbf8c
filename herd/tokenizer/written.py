"""The model's own writing of its recent tool calls, so that a conversation sent back re-encodes as it was written.

An OpenAI client sends a call back as {id, name, arguments}, from which the text the model wrote cannot be rebuilt:
its spacing and line breaks, its key order, `"type": "function"` or none, escaped or plain non-ASCII, single or
double quotes, <|python_tag|>, <|eom_id|>. Encoded in herd's own form instead, the history would differ from what
the model saw and wrote (Meta's published JSON call, pretty-printed after <|python_tag|>, becomes one line), and
the prefix cache would recompute the turn. Replies are remembered by their first call's id (a fresh UUID each).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from herd.tokenizer.content import content_texts
from herd.tokenizer.tool_calls import call_arguments, call_name


class WrittenCalls:
    """What the model wrote for each of its last `size` tool-calling replies (ids or text, as the chat format
    keeps them), given back for a message only while the message still says what the reply said."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._replies: OrderedDict[str, tuple[tuple, Any]] = OrderedDict()
        self._lock = threading.Lock()  # the server decodes in its event loop, LLM.chat in the caller's thread

    def remember(self, message: dict[str, Any], written: Any) -> None:
        """`message` (an assistant message with tool_calls, as decode_assistant made it) was written as `written`."""
        entry = (_said(message), written)
        with self._lock:
            self._replies[message["tool_calls"][0]["id"]] = entry
            self._replies.move_to_end(message["tool_calls"][0]["id"])
            while len(self._replies) > self.size:
                self._replies.popitem(last=False)

    def recall(self, message: dict[str, Any]) -> Any:
        """How the model wrote `message`, or None: not one of its remembered replies, or changed since (other
        text, calls, names or arguments; arguments compare as values, which a client may serialise anew)."""
        calls = message.get("tool_calls")
        if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict):
            return None
        with self._lock:
            entry = self._replies.get(calls[0].get("id"))
        if entry is None:
            return None
        try:
            said = _said(message)
        except (ValueError, TypeError, AttributeError):  # a malformed message: the chat format says what is wrong
            return None
        return entry[1] if said == entry[0] else None


def _said(message: dict[str, Any]) -> tuple:
    return ("".join(content_texts(message.get("content"))),
            [(c.get("id"), call_name(c), call_arguments(c)) for c in message["tool_calls"]])
