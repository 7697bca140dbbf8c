"""The engine's KV cache: a fixed pool of blocks, their accounting, the prefix cache and paged attention.

Layout. Each layer keeps one key tensor and one value tensor [kv_heads, num_blocks * block_size, head_dim]: a block
is `block_size` consecutive slots of it. A sequence owns a list of blocks; when they are consecutive (the allocator
tries hard: a new sequence starts at the longest free run, and each next block is the one right after the last),
attention reads the sequence's keys as a *view* of the pool, so a decode step copies nothing but the new token's
key and value. Only a sequence whose blocks are scattered (after preemption, or a prefix hit in another place) is
gathered, and only for as long as that lasts. Gathering every sequence into a padded batch at every step would
move the whole cache through memory once more per token, which on a CPU costs as much as the attention itself.
That is the PyTorch path (GPUs); on a CPU herd's kernel attends every token straight from its sequence's slots.

Prefix caching. A full block is known by a hash chained over every token from the start of the sequence, so equal
hashes mean equal prefixes (a 128-bit BLAKE2b digest: a user cannot forge a collision with another user's prompt).
Blocks are reference-counted; an unreferenced block that holds a hashed prefix stays cached, least recently used
first in line for eviction, until its slots are needed.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from herd.model.config import ModelConfig
from herd.quant.kernel import Sequences, addresses, ops


class OutOfBlocks(RuntimeError):
    pass


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Which blocks are free, in use (with reference counts) or cached; allocation prefers contiguous runs."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = np.zeros(num_blocks, dtype=np.int32)
        self.free = np.ones(num_blocks, dtype=bool)  # unreferenced and holding no cached prefix
        self.num_free = num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recent first

    @property
    def available(self) -> int:
        return self.num_free + len(self.evictable)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of `hashes`."""
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.hash_of[block] is not None:
                self.evictable[block] = None
            else:
                self._set_free(block, True)

    def register(self, block: int, block_hash: bytes) -> None:
        """Remember that `block` (full, computed) holds the prefix `block_hash`, unless another block already does."""
        if block_hash not in self.cached and self.hash_of[block] is None:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash

    def allocate(self, after: int | None = None) -> int:
        """A block for a sequence whose last block is `after`: the next one when it is free, for contiguity, but
        never at the price of a cached prefix while other blocks are free (evicting it for contiguity, two
        system prompts with a common start had evicted each other's blocks with the pool all but empty)."""
        block = None
        if after is not None and after + 1 < self.num_blocks and self.free[after + 1]:
            block = after + 1
        if block is None:
            if self.num_free:
                block = self._longest_free_run()
            elif self.evictable:
                block = self._evict(next(iter(self.evictable)))
            else:
                raise OutOfBlocks("no KV-cache block is free")
        if self.free[block]:
            self._set_free(block, False)
        self.refs[block] = 1
        return block

    def _evict(self, block: int) -> int:
        del self.evictable[block]
        del self.cached[self.hash_of[block]]
        self.hash_of[block] = None
        self._set_free(block, True)
        return block

    def _set_free(self, block: int, free: bool) -> None:
        self.free[block] = free
        self.num_free += 1 if free else -1

    def _longest_free_run(self) -> int:
        edges = np.diff(np.concatenate(([0], self.free.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return int(starts[np.argmax(ends - starts)])


def cache_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """What the paged cache holds keys and values as: float16 where herd's kernel attends (float32 models on the
    CPU), as llama.cpp holds them. Half the bytes to read: a batch of 16 sequences reads every token's keys and
    values in every step, more than the weights at a few hundred tokens of context. Else the model's own dtype."""
    kernel = torch.device(device).type == "cpu" and dtype == torch.float32 and ops() is not None
    return torch.float16 if kernel else dtype


class PagedKVCache:
    """The key and value slots of every layer, `block_size` slots a block."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, device, dtype):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        shape = (config.kv_heads, num_blocks * block_size, config.head_dim)
        # Untouched slots are never read (attention sees a sequence's own filled slots only), so no zeroing.
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.device = device
        self.gqa = config.kv_heads != config.n_heads

    @functools.cached_property
    def addresses(self) -> tuple[ctypes.Array, ctypes.Array]:
        """Every layer's key and value tensor as herd's kernel takes them (they never move)."""
        return addresses(self.k), addresses(self.v)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * config.kv_heads * config.head_dim * torch.finfo(dtype).bits // 8


class Segment:
    """One sequence's part of a step: queries [start, end) of the step's row, keys 0..total of the sequence."""

    __slots__ = ("start", "end", "total", "run", "slots", "mask", "apart")

    def __init__(self, start: int, end: int, cached: int, blocks: list[int], block_size: int, device,
                 apart: bool = False):
        self.start, self.end, self.total = start, end, cached + end - start
        # Drafted tokens (speculative decoding) attend one query at a time, exactly as each would alone: attention
        # over several queries rounds differently, and a quantized model's next layers magnify any difference.
        self.apart = apart
        # In order, not only spanning the right range: after a preemption the pool hands out runs like [0, 1, 6, 5, 4],
        # whose keys a view of blocks 0..4 would have taken from two other sequences.
        contiguous = all(b == blocks[0] + i for i, b in enumerate(blocks))
        self.run = blocks[0] * block_size if contiguous else None
        self.slots = None if contiguous else _slots(blocks, block_size, 0, self.total, device)
        n = end - start
        # One query sees every key; a chunk after cached keys needs an explicit causal mask, offset by the cache.
        self.mask = None
        if n > 1 and cached:
            keys = torch.arange(self.total, device=device)
            self.mask = keys.unsqueeze(0) <= torch.arange(cached, self.total, device=device).unsqueeze(1)


def _slot_array(blocks: list[int], block_size: int, begin: int, end: int) -> np.ndarray:
    """The cache slot of each position begin..end-1 of a sequence that owns `blocks` (int64). In numpy: a decode
    step builds one per sequence, and PyTorch's per-call cost made that about 3% of a 16-sequence step."""
    every = np.asarray(blocks, dtype=np.int64)[:, None] * block_size + np.arange(block_size)
    return every.reshape(-1)[begin:end]


def _slots(blocks: list[int], block_size: int, begin: int, end: int, device) -> torch.Tensor:
    return torch.from_numpy(_slot_array(blocks, block_size, begin, end)).to(device)


class StepAttention:
    """The model's cache for one engine step: several sequences' new tokens laid end to end in one row."""

    def __init__(self, cache: PagedKVCache, parts: list[tuple[list[int], int, int, bool]]):
        """parts: for each sequence, (its blocks, tokens already cached, tokens in this step, whether they are a
        token and its draft)."""
        self.cache, self._parts = cache, parts
        self.scratch: dict = {}  # what layers wrapping the model prepare once per step (herd.quant.decode)
        # A step of several decoding sequences (one query each: a busy server's usual step) attends in one call per
        # layer over their keys gathered into a padded batch; one call per sequence cost a third of such a step.
        # What attention needs is built on first use: a fused decode block (herd.quant.decode) needs none of it.
        self.batched = len(parts) > 1 and all(n == 1 for _, _, n, _ in parts)

    @functools.cached_property
    def key_slots(self) -> list[np.ndarray]:
        """Each sequence's key slots, position by position over its cached and new tokens."""
        return [_slot_array(blocks, self.cache.block_size, 0, cached + n) for blocks, cached, n, _ in self._parts]

    @functools.cached_property
    def decoders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded batch of a batched step: every sequence's key slots [seqs * width], and which are valid."""
        width = max(len(slots) for slots in self.key_slots)
        table = torch.zeros(len(self.key_slots), width, dtype=torch.long)
        valid = torch.zeros(len(self.key_slots), 1, 1, width, dtype=torch.bool)
        for i, slots in enumerate(self.key_slots):
            table[i, :len(slots)] = torch.from_numpy(slots)
            valid[i, ..., :len(slots)] = True
        return table.view(-1).to(self.cache.device), valid.to(self.cache.device)

    @functools.cached_property
    def segments(self) -> list[Segment]:
        segments, start = [], 0
        for blocks, cached, n, drafted in self._parts:
            segments.append(Segment(start, start + n, cached, blocks, self.cache.block_size, self.cache.device,
                                    drafted))
            start += n
        return segments

    @functools.cached_property
    def write_slots(self) -> torch.Tensor:
        writes = [_slots(blocks, self.cache.block_size, cached, cached + n, self.cache.device)
                  for blocks, cached, n, _ in self._parts]
        return writes[0] if len(writes) == 1 else torch.cat(writes)

    @property
    def parts(self) -> list[tuple[list[int], int, int]]:
        """(blocks, tokens cached, tokens in this step) of each sequence, in the step's order: where a fused decode
        block reads and writes keys itself."""
        return [(blocks, cached, n) for blocks, cached, n, _ in self._parts]

    @functools.cached_property
    def sequences(self) -> Sequences:
        """The step's sequences as herd's kernel reads them."""
        return Sequences.of(self.parts, self.key_slots)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(1, self.write_slots, k[0].to(keys.dtype))
        values.index_copy_(1, self.write_slots, v[0].to(values.dtype))
        kernel = ops() if keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.float16) else None
        if kernel is not None:
            # Each token over its own keys, as the fused decode block attends: a token's numbers then do not depend
            # on how its prompt was chunked or what else shares the step, so a reply is the same in any batch.
            out = kernel.attention(q[0].transpose(0, 1).contiguous(), self.sequences, keys, values)
            return out.transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, dim]
        if self.batched:
            slots, valid = self.decoders
            batch = (valid.shape[0], valid.shape[-1])
            k_all = keys.index_select(1, slots).unflatten(1, batch).transpose(0, 1)  # [seqs, kv_heads, keys, dim]
            v_all = values.index_select(1, slots).unflatten(1, batch).transpose(0, 1)
            out = F.scaled_dot_product_attention(q[0].transpose(0, 1).unsqueeze(2), k_all, v_all, attn_mask=valid,
                                                 enable_gqa=self.cache.gqa)
            return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, heads, seqs, dim], as the step's row
        outs = []
        for seg in self.segments:
            if seg.run is not None:
                k_seq, v_seq = keys[:, seg.run:seg.run + seg.total], values[:, seg.run:seg.run + seg.total]
            else:
                k_seq, v_seq = keys.index_select(1, seg.slots), values.index_select(1, seg.slots)
            k_seq, v_seq = k_seq.unsqueeze(0), v_seq.unsqueeze(0)
            if seg.apart:
                first = seg.total - (seg.end - seg.start)
                outs += [F.scaled_dot_product_attention(q[:, :, i:i + 1], k_seq[:, :, :first + j + 1],
                                                        v_seq[:, :, :first + j + 1], enable_gqa=self.cache.gqa)
                         for j, i in enumerate(range(seg.start, seg.end))]
                continue
            outs.append(F.scaled_dot_product_attention(
                q[:, :, seg.start:seg.end], k_seq, v_seq, attn_mask=seg.mask,
                is_causal=seg.mask is None and seg.end - seg.start > 1,
                enable_gqa=self.cache.gqa,
            ))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
