"""Prompt-lookup drafting for speculative decoding: guess a sequence's next tokens from its own earlier text.

A reply that quotes, edits or summarises its context (code, a document, a RAG passage) often continues with tokens
that already follow the same few tokens somewhere earlier. The engine feeds such a guess through the model
together with the sequence's next token, in one forward; under greedy decoding it keeps the guessed tokens the
model would have chosen itself, so the output is exactly that of plain decoding, in fewer forwards. No second
model is needed: the draft is a lookup.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np

from herd.bounds import AT_LEAST_ONE, NON_NEGATIVE, ordered, require, require_kind


@dataclass(frozen=True)
class SpeculativeConfig:
    """draft_tokens: tokens guessed per step (0: off). ngram: the longest suffix looked up; shorter ones are tried
    down to min_ngram (a single token matches too often to be worth a forward). max_batch: sequences decoding at
    once above which nobody drafts: a busy step already keeps the cores on full weight reuse."""

    draft_tokens: int = 2  # measured on the default model: 2 gained most on prose and code alike (README)
    ngram: int = 4
    min_ngram: int = 2
    max_batch: int = 4

    def __post_init__(self):
        # A draft length of 2.5 had reached a slice's bounds mid-generation.
        require_kind(self, Integral, "draft_tokens", "ngram", "min_ngram", "max_batch")
        require(self, NON_NEGATIVE, "draft_tokens", "max_batch")
        require(self, AT_LEAST_ONE, "min_ngram", "ngram")
        ordered(self, "min_ngram", "ngram")


def ngram_draft(tokens: list[int], limit: int, ngram: int, min_ngram: int) -> list[int]:
    """Up to `limit` tokens that followed the most recent earlier occurrence of the longest suffix of `tokens`
    (from `ngram` tokens down to `min_ngram`); [] when no suffix recurs."""
    if limit <= 0 or len(tokens) <= min_ngram:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    for n in range(min(ngram, length - 1), min_ngram - 1, -1):
        # Starts of every earlier window equal to the last n tokens (the suffix itself excluded).
        hit = seq[:length - n] == seq[length - n]
        for j in range(1, n):
            hit &= seq[j:length - n + j] == seq[length - n + j]
        found = np.flatnonzero(hit)
        if found.size:
            begin = int(found[-1]) + n
            return seq[begin:begin + limit].tolist()
    return []
