"""The unit every data stage works on, and the record of why a document was dropped."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """`id` is unique within a run (stages and de-duplication plans name documents by it); `name` is the input
    record's own id, which inputs need not keep unique (two shards of one dataset both counting from 0)."""

    id: str
    text: str
    source: str = ""  # the input file (and member/record) it came from
    url: str | None = None
    lang: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # e.g. lang confidence, quality, domain probabilities
    meta: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    @property
    def public_id(self) -> str:
        """The id outputs show: the record's own where it had one."""
        return self.id if self.name is None else self.name


@dataclass(frozen=True)
class Dropped:
    id: str
    stage: str  # the stage's name, as in the pipeline config
    reason: str  # short machine-readable reason, e.g. "min_words", "near_duplicate_of:<id>"
    url: str | None = None
    # where the record is in the input: "FILE:LINE" (JSONL lines and Parquet rows, 1-based), "FILE@OFFSET" (WARC,
    # bytes), "FILE"
    source: str | None = None


@dataclass
class StageResult:
    kept: list[Document]
    dropped: list[Dropped]
