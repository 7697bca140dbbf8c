"""Near-duplicate removal: MinHash signatures of word n-gram shingles, banded by datasketch's MinHashLSH.

Signatures are computed with numpy (multiply-shift hashing of 64-bit shingle hashes) rather than
datasketch's per-shingle SHA-1, which is the slow part; the LSH index is datasketch's.

Two steps decide, and both are set from theory rather than tuned: LSH makes a pair of similarity s a
candidate with probability 1 - (1 - s^r)^b; a candidate counts when its
estimated similarity (the share of equal signature values, binomial around s with num_perm trials)
reaches `threshold`. With b=21 bands of r=6 rows and a threshold of 0.7 on 128 values, a pair at
s = 0.8 is found with probability 0.998 * 0.997, while one at s = 0.6 is a candidate with 0.63 but
passes the threshold with under 0.01: recall >= 95% from 0.8, pairs below 0.6 kept (measured by the
tests on planted pairs; `bench/data.py --curves` draws the S-curve).
"""
from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from herd.bounds import AT_LEAST_ONE, FRACTION, Bounds, require
from herd.data.dedup.base import drop_planned
from herd.data.document import Document, StageResult
from herd.data.filters.base import UNSPACED

# Words: runs of letters and digits, except that in scripts written without spaces each letter is one (as the
# filters count them): there a clause is one run, and a one-character edit changed every shingle over it.
WORDS = re.compile(rf"[{UNSPACED}]|(?:(?![{UNSPACED}])\w)+")
_BLOCK = 2048  # shingles per step, bounding the (shingles x permutations) matrix of a long document


@dataclass
class MinHashDedup:
    name: str = "minhash_dedup"
    threshold: float = 0.7  # on the estimated Jaccard similarity of a candidate pair
    num_perm: int = 128
    bands: int = 21
    rows: int = 6
    ngram: int = 5
    seed: int = 1

    def __post_init__(self):
        require(self, FRACTION, "threshold")
        require(self, AT_LEAST_ONE, "rows")
        require(self, Bounds(1, 1 << 16), "num_perm")  # 2 x 8 bytes of hash parameters each, and as many minima
        require(self, Bounds(1, 100), "ngram")  # a table of that many powers; shingles are a few words
        require(self, Bounds(2), "bands")  # datasketch's LSH takes two at least
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows ({self.bands} * {self.rows}) exceeds num_perm ({self.num_perm})")
        rng = np.random.default_rng(self.seed)
        # odd multipliers make x -> (a*x + b) >> 32 a universal hash family over 64-bit keys
        self._a = rng.integers(1, 1 << 63, self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 1 << 63, self.num_perm, dtype=np.uint64)
        self._powers = np.array([pow(0x100000001B3, i, 1 << 64) for i in range(self.ngram)], dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray | None:
        """num_perm uint32 minima over the document's shingles; None for a text without words."""
        toks = WORDS.findall(text.lower())
        if not toks:
            return None
        wh = np.fromiter((zlib.crc32(t.encode()) for t in toks), dtype=np.uint64, count=len(toks))
        wh = wh | (wh << np.uint64(32))  # spread each word's 32 bits over the word
        n = min(self.ngram, len(toks))  # a text shorter than one shingle is one shingle
        count = len(toks) - n + 1
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
            shingles = sum(wh[i : i + count] * self._powers[i] for i in range(n))
            sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
            for start in range(0, count, _BLOCK):
                block = shingles[start : start + _BLOCK, None]
                hashed = (block * self._a + self._b) >> np.uint64(32)
                np.minimum(sig, hashed.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def keys(self, docs: list[Document]) -> list[tuple[str, bytes | None]]:
        out = []
        for doc in docs:
            sig = self.signature(doc.text)
            out.append((doc.id, None if sig is None else sig.tobytes()))
        return out

    def plan(self, keyed: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
        from datasketch import LeanMinHash, MinHashLSH

        lsh = MinHashLSH(num_perm=self.num_perm, params=(self.bands, self.rows))
        # signatures of first occurrences (and their order), to verify LSH candidates
        kept: dict[str, tuple[int, np.ndarray]] = {}
        dups: dict[str, str] = {}
        for did, sig in keyed:
            if sig is None:
                continue
            hv = np.frombuffer(sig, dtype=np.uint32)
            # 32-bit affine permutations, as datasketch's "affine32"; the name only guards against mixing
            mh = LeanMinHash(seed=self.seed, hashvalues=hv, scheme="affine32")
            best, best_sim = None, 0.0
            for cand in sorted(lsh.query(mh), key=lambda c: kept[c][0]):  # ties go to the earliest
                sim = float(np.mean(kept[cand][1] == hv))
                if sim >= self.threshold and sim > best_sim:
                    best, best_sim = cand, sim
            if best is None:
                lsh.insert(did, mh, check_duplication=False)
                kept[did] = (len(kept), hv)
            else:
                dups[did] = best
        return dups

    def apply(self, docs: list[Document], plan: dict[str, str]) -> StageResult:
        return drop_planned(docs, plan, self.name, "near_duplicate_of")

    def detection_probability(self, s: float) -> float:
        """Theory: the chance a pair of Jaccard similarity s is dropped, LSH banding times the binomial
        chance its estimate reaches the threshold."""
        n = self.num_perm
        lsh = 1 - (1 - s**self.rows) ** self.bands
        need = math.ceil(self.threshold * n - 1e-9)
        return lsh * sum(math.comb(n, k) * s**k * (1 - s) ** (n - k) for k in range(need, n + 1))
