"""Llama 3's line-level de-duplication: within each bucket of consecutive documents, lines found in
more than `max_count` documents are removed (boilerplate: navigation, cookie banners, newsletter
prompts). Like Llama 3 this also removes some frequent good lines; the bucket bounds the memory.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from herd.bounds import AT_LEAST_ONE, NON_NEGATIVE, require
from herd.data.dedup.base import hash64
from herd.data.document import Document, Dropped, StageResult
from herd.data.filters.base import evolve


def _normal(line: str) -> str:
    return " ".join(line.split()).casefold()


@dataclass
class LineDedup:
    name: str = "line_dedup"
    max_count: int = 6  # a line in more documents than this (per bucket) goes
    bucket_size: int = 30_000_000  # documents, in input order
    min_chars: int = 10  # shorter lines ("Note", "}") are never counted or removed

    def __post_init__(self):
        require(self, AT_LEAST_ONE, "max_count", "bucket_size")
        require(self, NON_NEGATIVE, "min_chars")

    def _hashes(self, doc: Document) -> list[tuple[str, int | None]]:
        """Each line and its hash, None for lines too short to count."""
        out = []
        for line in doc.text.split("\n"):
            norm = _normal(line)
            out.append((line, hash64(norm) if len(norm) >= self.min_chars else None))
        return out

    def keys(self, docs: list[Document]) -> list[tuple[str, bytes]]:
        # a line repeated inside one document counts once: repetition within a page is GopherRepetition's job
        return [
            (doc.id, np.unique(np.array([h for _, h in self._hashes(doc) if h is not None], dtype=np.uint64)).tobytes())
            for doc in docs
        ]

    def plan(self, keyed: Iterable[tuple[str, bytes]]) -> dict[str, frozenset[int]]:
        """For each document holding a frequent line, the hashes of its lines to remove."""
        plan: dict[str, frozenset[int]] = {}
        bucket: list[tuple[str, np.ndarray]] = []
        for did, sig in keyed:
            bucket.append((did, np.frombuffer(sig, dtype=np.uint64)))
            if len(bucket) == self.bucket_size:
                self._close(bucket, plan)
                bucket = []
        self._close(bucket, plan)
        return plan

    def _close(self, bucket: list[tuple[str, np.ndarray]], plan: dict[str, frozenset[int]]) -> None:
        if not bucket:
            return
        uniq, counts = np.unique(np.concatenate([h for _, h in bucket]), return_counts=True)
        frequent = uniq[counts > self.max_count]
        if not len(frequent):
            return
        for did, hashes in bucket:
            hit = hashes[np.isin(hashes, frequent, assume_unique=True)]
            if len(hit):
                plan[did] = frozenset(int(h) for h in hit)

    def apply(self, docs: list[Document], plan: dict[str, frozenset[int]]) -> StageResult:
        kept, dropped = [], []
        for doc in docs:
            remove = plan.get(doc.id)
            if not remove:
                kept.append(doc)
                continue
            lines = [line for line, h in self._hashes(doc) if h not in remove]
            text = "\n".join(lines)
            if not text.strip():
                dropped.append(Dropped(doc.id, self.name, "lines:empty_after_dedup", doc.url))
                continue
            out = evolve(doc, text=text)
            out.meta["lines_removed"] = len(doc.text.split("\n")) - len(lines)
            kept.append(out)
        return StageResult(kept, dropped)
