"""Seeded generators of labelled cases planted into real text, to measure a stage rather than trust it.

- `near_duplicate`: an edited copy of a text at a chosen word 5-gram Jaccard similarity;
- `plant_terms`: a text with a chosen density of given terms inserted.

The tests assert on them (with seeds the settings were not tuned on) and `bench/data.py --curves` draws
the curves in docs/.
"""
from __future__ import annotations

import random

from herd.data.dedup.minhash import WORDS


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of the lower-cased text, as MinHashDedup sees it (a short text is one shingle)."""
    toks = WORDS.findall(text.lower())
    n = min(n, len(toks))
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)} if toks else set()


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def near_duplicate(text: str, target: float, rng: random.Random, vocab: list[str], n: int = 5) -> tuple[str, float]:
    """`text` with random word edits (substitutions, insertions, deletions of words from `vocab`) until its
    n-gram Jaccard similarity to `text` is as close to `target` as whole edits allow; returns it and its
    similarity."""
    words = text.split(" ")
    # a fixed random sequence of edits, of which the first k are applied: similarity falls as k grows
    edits = [(rng.random(), rng.randrange(len(words)), rng.choice(vocab)) for _ in range(len(words))]

    def apply(k: int) -> str:
        out = list(words)
        for kind, pos, word in edits[:k]:
            pos = min(pos, len(out) - 1)
            if kind < 0.6:
                out[pos] = word
            elif kind < 0.8:
                out.insert(pos, word)
            elif len(out) > 1:
                del out[pos]
        return " ".join(out)

    base = shingles(text, n)

    def similarity(k: int) -> float:
        other = shingles(apply(k), n)
        return len(base & other) / len(base | other) if base or other else 1.0

    lo, hi = 0, len(edits)  # the smallest k whose similarity is at or below the target
    while lo < hi:
        mid = (lo + hi) // 2
        if similarity(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((lo, max(lo - 1, 0)), key=lambda k: abs(similarity(k) - target))
    return apply(best), similarity(best)


def plant_terms(text: str, terms: list[str], density: float, rng: random.Random) -> str:
    """`text` with terms inserted at random places until they are `density` of its whitespace words."""
    words = text.split()
    k = max(1, round(density * len(words) / (1 - density)))
    for _ in range(k):
        words.insert(rng.randrange(len(words) + 1), rng.choice(terms))
    return " ".join(words)
