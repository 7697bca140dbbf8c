"""The one error every checkpoint problem becomes."""
from __future__ import annotations

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or disagrees with itself. Its message is one line: what and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`, or a CheckpointError naming the file and `what` it must be."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are no UTF-8
        raise CheckpointError(f"{path}: unreadable ({e}); {what}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; {what}")
    return data
