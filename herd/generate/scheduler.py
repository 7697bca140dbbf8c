"""Continuous batching: which sequences run in the next step, and with how many tokens each.

Every step decodes one token for each running sequence that has finished its prompt, then spends what is left of
the step's token budget on prompts (chunked prefill): first those already admitted, then new ones from the queue.
A new sequence is admitted only when blocks for its whole prompt are free (after the prefix cache's share), and
gets them at once, so prompts in progress never wait for blocks. Decoding grows a sequence a block at a time; when
none is left, the most recently admitted sequence is preempted: its blocks go back (their full ones stay cached),
and it waits at the head of the queue to be recomputed, usually from its own cached prefix.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from herd.generate.kv_cache import PagedKVCache
from herd.generate.sequence import Sequence
from herd.generate.speculative import SpeculativeConfig, ngram_draft


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0  # prompt tokens admitted
    cached_tokens: int = 0  # of them, found in the prefix cache
    computed_tokens: int = 0  # tokens run through the model (prefill, recompute and decode)
    preemptions: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens guessed
    accepted_tokens: int = 0  # of them, the ones the model chose too


class Scheduler:
    def __init__(self, cache: PagedKVCache, *, max_batch: int, max_step_tokens: int, prefix_caching: bool = True,
                 speculative: SpeculativeConfig | None = None):
        self.cache, self.pool, self.block_size = cache, cache.pool, cache.block_size
        self.max_batch, self.max_step_tokens = max_batch, max_step_tokens
        self.prefix_caching = prefix_caching
        self.speculative = speculative or SpeculativeConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_step_tokens
        batch = []
        for seq in [s for s in self.running if s.to_compute == 1 and s.num_computed >= s.prompt_len]:
            if seq in self.running and self._grow_or_preempt(seq):
                batch.append((seq, 1))
                budget -= 1
        if self.speculative.draft_tokens and len(batch) <= self.speculative.max_batch:
            for i, (seq, _) in enumerate(batch):
                seq.draft = self._draft(seq, budget)
                batch[i] = (seq, 1 + len(seq.draft))
                budget -= len(seq.draft)
        decoding = {id(s) for s, _ in batch}
        for seq in self.running:
            if seq.to_compute and id(seq) not in decoding and budget > 0:
                n = self._chunk(seq, budget)
                batch.append((seq, n))
                budget -= n
        pending = None
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_batch:
                break
            hits = self.pool.lookup([seq.block_hash(i) for i in range(seq.cacheable_blocks())]) \
                if self.prefix_caching else []
            if self.prefix_caching and len(hits) < seq.cacheable_blocks():
                # Another sequence is computing the next block right now (the other choices of an `n` request, a
                # shared system prompt): wait a step or two and take it from the cache instead.
                pending = self._pending_hashes() if pending is None else pending
                if seq.block_hash(len(hits)) in pending:
                    continue
            need = -(-len(seq.tokens) // self.block_size) - len(hits)
            if need > self.pool.available - sum(1 for b in hits if self.pool.refs[b] == 0):
                break
            self.waiting.remove(seq)
            self._admit(seq, hits, need)
            pending = None  # what `seq` computes now is pending too, for the choices and prompts after it
            n = self._chunk(seq, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """How many of `seq`'s tokens to compute in this step. A recompute after preemption stops at the end of the
        prompt: quantized layers compute prompt and generated tokens differently, and a forward holding both kinds
        takes another path than either kind alone, so the recomputed keys of generated tokens would differ from
        their first ones, and so might the rest of the reply."""
        n = min(seq.to_compute, budget)
        return min(n, seq.prompt_len - seq.num_computed) if seq.num_computed < seq.prompt_len else n

    def _draft(self, seq: Sequence, budget: int) -> list[int]:
        """A guess at the tokens after `seq`'s next one (greedy sequences only: only there is a guess checkable
        without changing what is sampled), with blocks for their keys while free ones remain: a guess never preempts
        anyone."""
        if not seq.params.greedy or seq.constraint is not None:
            return []
        spec = self.speculative
        room = min(spec.draft_tokens, seq.max_tokens - len(seq.generated) - 1, budget)
        draft = ngram_draft(seq.tokens, room, spec.ngram, spec.min_ngram)
        while draft and seq.num_computed + 1 + len(draft) > len(seq.blocks) * self.block_size:
            if not self.pool.num_free:
                return draft[:len(seq.blocks) * self.block_size - seq.num_computed - 1]
            seq.blocks.append(self.pool.allocate(seq.blocks[-1]))
        return draft

    def _admit(self, seq: Sequence, hits: list[int], need: int) -> None:
        for block in hits:
            self.pool.acquire(block)
        seq.blocks = list(hits)
        for _ in range(need):
            seq.blocks.append(self.pool.allocate(seq.blocks[-1] if seq.blocks else None))
        seq.num_computed = len(hits) * self.block_size
        seq.num_registered = len(hits)
        if seq.admitted_at is None:  # the first admission; a recompute after preemption is not a prompt
            seq.admitted_at = time.monotonic()
            seq.cached_tokens = seq.num_computed
            self.stats.prompt_tokens += seq.prompt_len
            self.stats.cached_tokens += seq.num_computed
        self.running.append(seq)

    def _pending_hashes(self) -> set[bytes]:
        return {s.block_hash(i) for s in self.running if s.num_computed < s.prompt_len
                for i in range(s.num_registered, s.cacheable_blocks())}

    def _grow_or_preempt(self, seq: Sequence) -> bool:
        """Room for one more token of `seq`; preempts newer sequences (or `seq` itself) when there is none."""
        if seq.num_computed < len(seq.blocks) * self.block_size:
            return True
        while not self.pool.available:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.blocks.append(self.pool.allocate(seq.blocks[-1]))
        return True

    def preempt(self, seq: Sequence) -> None:
        self.stats.preemptions += 1
        self.release(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def computed(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` are in the cache: enter its newly full blocks in the prefix cache."""
        seq.num_computed += n
        self.stats.computed_tokens += n
        if not self.prefix_caching or not seq.shares_cache:
            return
        full = seq.num_computed // self.block_size
        for i in range(seq.num_registered, full):
            self.pool.register(seq.blocks[i], seq.block_hash(i))
        seq.num_registered = full

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks (the last first, so that a prefix outlives its continuations)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        for block in reversed(seq.blocks):
            self.pool.release(block)
        seq.blocks = []
