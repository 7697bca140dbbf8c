"""JSON may hold half of a UTF-16 pair ("\ud800", or its bytes where a decoder lets them through), which parses to
a str that no file, tokenizer, log or reply can encode as UTF-8."""
from __future__ import annotations

import json
import re
from typing import Any

# An escaped surrogate (\uD800-\uDFFF), or one's UTF-8-like bytes (ED A0-BF ..), which json.loads(bytes) lets pass.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def holds_lone_surrogate(raw: bytes | bytearray, value: Any) -> bool:
    """Whether `value`, parsed from the JSON text `raw`, holds a surrogate without its pair. Only a `raw` that has a
    surrogate at all is re-encoded to find out (a pair is fine)."""
    if not _SURROGATE.search(raw):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False
