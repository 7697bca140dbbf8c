"""A message's content as texts: OpenAI's and Llama Stack's messages carry a string or a list of typed parts."""
from __future__ import annotations

import json
from typing import Any


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
