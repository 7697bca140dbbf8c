"""The one error every checkpoint problem becomes."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or disagrees with itself. Its message is one line: what and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
