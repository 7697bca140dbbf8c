"""Exact de-duplication on normalised text: whitespace runs collapsed and, by default, case folded."""
from __future__ import annotations

from dataclasses import dataclass

from herd.data.dedup.base import FirstOccurrenceDedup, hash64
from herd.data.document import Document


@dataclass
class ExactDedup(FirstOccurrenceDedup):
    name: str = "exact_dedup"
    reason: str = "exact_duplicate_of"
    casefold: bool = True

    def signature(self, doc: Document) -> int | None:
        text = " ".join(doc.text.split())
        if not text:
            return None
        return hash64(text.casefold() if self.casefold else text)
