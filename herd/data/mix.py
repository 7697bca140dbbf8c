"""The data mix: how many copies of each document go into the shards so domains meet target token shares.

Selection is by a seeded hash of the document's text, not by position, by a random stream or by its id (which
names the input file as it was typed), so a document's fate does not depend on which worker saw it, how the
input was split or its path spelled, or whether the run was resumed.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from herd.data.config import MixConfig


@dataclass(frozen=True)
class MixItem:
    id: str
    domain: str
    tokens: int
    key: str  # what the seeded choice hashes: content_key of the text


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# A mix kept under this share of its tokens has been shrunk far enough that a user must hear of it: most often a
# domain of a few (misclassified) documents, which keeps its whole target at max_repeats copies and so sets the size.
SHRUNK_WARNING = 0.5


@dataclass
class MixPlan:
    repeats: dict[str, int]  # document id -> copies in the shards (0 = dropped by the mix)
    targets: dict[str, float]  # the targets actually aimed at: renormalised over domains that have documents
    before: dict[str, int]  # tokens per domain going in
    after: dict[str, int]  # tokens per domain coming out
    limited_by: str | None = None  # the domain too scarce for its target that shrank the output; None: none did

    def achieved(self) -> dict[str, float]:
        total = sum(self.after.values()) or 1
        return {d: self.after.get(d, 0) / total for d in self.targets}

    def shrunk_warning(self, max_repeats: int) -> str | None:
        """One line when a scarce domain left the mix under SHRUNK_WARNING of its tokens: the domain, its tokens and
        target, and what to do; None otherwise."""
        given, kept = sum(self.before[d] for d in self.targets), sum(self.after.values())
        domain = self.limited_by
        if domain is None or kept >= SHRUNK_WARNING * given:
            return None
        return (f"the mix keeps {kept:,} of {given:,} tokens ({kept / given:.1%}): domain {domain!r} holds "
                f"{self.before[domain]:,} tokens for a {self.targets[domain]:.0%} share, met by at most {max_repeats} "
                f"copies, and the others shrink to match; lower its target in [mix], or add {domain} documents")


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def plan_mix(items: Iterable[MixItem], config: MixConfig) -> MixPlan:
    """Up- and down-sample whole documents so each domain's token share meets its target.

    The output size is the input size (of the domains with a target) when every domain can reach its
    share with at most `max_repeats` copies; otherwise it shrinks to the largest size at which all can,
    since a share that cannot be met is a worse mix than a smaller one.
    """
    by_domain: dict[str, list[MixItem]] = defaultdict(list)
    for item in items:
        by_domain[item.domain].append(item)
    before = {d: sum(i.tokens for i in docs) for d, docs in by_domain.items()}
    # a target for a domain with no documents cannot be met by sampling; the others share its weight
    present = {d: t for d, t in config.targets.items() if before.get(d, 0) > 0 and t > 0}
    norm = sum(present.values())
    targets = {d: t / norm for d, t in present.items()} if norm else {}
    total_in = sum(before[d] for d in targets)
    # the largest output in which a domain meets its target with max_repeats copies; the smallest below the input binds
    reachable = {d: config.max_repeats * before[d] / t for d, t in targets.items()}
    limited_by = min((d for d in reachable if reachable[d] < total_in), key=reachable.get, default=None)
    total_out = total_in if limited_by is None else reachable[limited_by]

    repeats: dict[str, int] = {}
    after: dict[str, int] = {}
    for domain, docs in by_domain.items():
        budget = targets.get(domain, 0.0) * total_out
        weight = budget / before[domain] if before[domain] else 0.0
        base = int(weight)
        remaining = budget - base * before[domain]
        got = base * before[domain]
        # stable: copies of one text keep the input's order, itself independent of how paths are spelled
        for item in sorted(docs, key=lambda i: _rank(config.seed, i.key)):
            # one more copy only if it lands nearer the budget than leaving it out
            extra = 1 if remaining > item.tokens / 2 else 0
            repeats[item.id] = base + extra
            remaining -= extra * item.tokens
            got += extra * item.tokens
        after[domain] = got
    return MixPlan(repeats=repeats, targets=targets, before=before, after=after, limited_by=limited_by)
