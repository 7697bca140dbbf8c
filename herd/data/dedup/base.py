"""Two-phase de-duplication: `keys` per batch in workers, one global `plan` in order, `apply` per batch.

The plan step sees signatures only (64-bit ints, MinHash bytes), never texts: its memory grows with the documents,
not their length (measured: MinHash's about 7.5 KB a document, in datasketch's LSH tables and the kept signatures,
so about 7.5 GB per million; line de-dup about 2 KB at its peak). The plan names documents by id, unique
within a run (Document.id).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

from herd.data.document import Document, Dropped, StageResult


def hash64(text: str) -> int:
    """A stable 64-bit hash; Python's hash() differs between worker processes."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def drop_planned(docs: list[Document], plan: dict[str, str], stage: str, reason: str) -> StageResult:
    """Drop the documents the plan maps to their first occurrence; the reason names that occurrence."""
    kept, dropped = [], []
    for doc in docs:
        first = plan.get(doc.id)
        if first is None:
            kept.append(doc)
        else:
            dropped.append(Dropped(doc.id, stage, f"{reason}:{first}", doc.url))
    return StageResult(kept, dropped)


class FirstOccurrenceDedup:
    """Keeps the first document of each signature; later ones are duplicates of it.

    Subclasses (dataclasses with a `name`) define `signature`; None means "never a duplicate".
    """

    name: str
    reason: str

    def signature(self, doc: Document) -> int | None:
        raise NotImplementedError

    def keys(self, docs: list[Document]) -> list[tuple[str, int | None]]:
        return [(doc.id, self.signature(doc)) for doc in docs]

    def plan(self, keyed: Iterable[tuple[str, int | None]]) -> dict[str, str]:
        first: dict[int, str] = {}
        dups: dict[str, str] = {}
        for did, sig in keyed:
            if sig is None:
                continue
            if sig in first:
                dups[did] = first[sig]
            else:
                first[sig] = did
        return dups

    def apply(self, docs: list[Document], plan: dict[str, str]) -> StageResult:
        return drop_planned(docs, plan, self.name, self.reason)
