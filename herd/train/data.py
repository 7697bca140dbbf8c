"""Packed, document-masked batches from `TokenShards`, in a deterministic order that resumes exactly.

The training documents (all but a held-out fraction, chosen by a seeded draw) are shuffled once per epoch (seed,
epoch) and read as one endless stream of tokens. An optimizer step takes the next `batch_size` windows of
`seq_len + 1` tokens (stride `seq_len`): inputs are a window's first `seq_len` tokens, labels its last, and a label
that belongs to another document than its input is ignored (-100), as is attention across documents
(`document_ids`). Every data-parallel rank computes the same global windows and takes its own slice, so the
global batch does not depend on how it is split, and the whole position is one integer per stream: a checkpoint
stores it (`state_dict`) and a resumed run continues with the very next window.

Batch sources are what the Trainer consumes: `next(source)` gives the rank's micro-batches for one optimizer step
(a list of dicts of tensors), `state_dict()` / `load_state_dict()` save and restore the position. Post-training
recipes bring their own sources with the same three methods.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from herd.data.shards import TokenShards
from herd.train.config import ConfigError, TrainingSection

IGNORE = -100


def open_shards(path: str | Path, verify: bool = False) -> TokenShards:
    """The shard directory, or a ConfigError saying why it cannot be read."""
    if not str(path):
        raise ConfigError("data.shards is not set: give a `herd data run` output directory")
    if not Path(path).is_dir():
        raise ConfigError(f"data.shards: {path} is not a directory; give a `herd data run` output directory")
    try:
        shards = TokenShards(path, verify=verify)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.shards: {e}") from None
    if shards.num_tokens == 0:
        raise ConfigError(f"data.shards: {path} holds no tokens")
    return shards


def split_documents(shards: TokenShards, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document indices: a seeded draw, at least one document on each side when there are two.

    The copies of one document (the data mix repeats documents to meet its targets) go where its first copy goes:
    drawn one by one, a third to half of a mixed corpus's held-out set had been copies of training documents."""
    if held_out == 0:  # every document trains, and no rank need read a corpus's worth of ids to say so
        return np.arange(len(shards)), np.arange(0)
    ids = [shards.doc_id(i) for i in range(len(shards))]
    draw = np.random.default_rng([seed, 0x5EED]).random(len(ids))
    first: dict[str, int] = {}
    copy_of = np.array([first.setdefault(key, i) for i, key in enumerate(ids)], dtype=np.int64)
    originals = np.unique(copy_of)
    held = draw[originals] < held_out
    if held_out > 0 and len(originals) >= 2 and not held.any():
        held[int(np.argmin(draw[originals]))] = True
    if held.all():
        held[int(np.argmax(draw[originals]))] = False
    held_entries = np.isin(copy_of, originals[held])
    return np.flatnonzero(~held_entries), np.flatnonzero(held_entries)


def _not_held_out(anneal: TokenShards, shards: TokenShards, held: np.ndarray) -> np.ndarray:
    """The anneal documents that are none of `shards`' held-out ones: an anneal set drawn from the same corpus holds
    held-out documents too, and they stay held out. One is the same id and the same tokens (another corpus's "doc-7"
    is another document); every held-out document of an id counts, since inputs may repeat ids (two shards of one
    dataset both numbering from 0), where the last of them alone had let the others anneal."""
    if not len(held):  # nothing held out: no id of a whole anneal set to read
        return np.arange(len(anneal))
    held_by_id: dict[str, list[int]] = {}
    for i in held:
        held_by_id.setdefault(shards.doc_id(int(i)), []).append(int(i))
    return np.array([i for i in range(len(anneal))
                     if not any(np.array_equal(anneal[i], shards[j]) for j in held_by_id.get(anneal.doc_id(i), ()))],
                    dtype=np.int64)


class TokenStream:
    """The documents `docs` of `shards`, reshuffled every epoch, as one endless token stream."""

    def __init__(self, shards: TokenShards, docs: np.ndarray, seed: int, shuffle: bool = True):
        self.shards, self.docs, self.seed, self.shuffle = shards, docs, seed, shuffle
        self.vocab = shards.tokenizer.get("vocab_size")
        self.lengths = np.array([len(shards[int(i)]) for i in docs], dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        if self.epoch_tokens == 0:
            raise ConfigError("data.shards: the selected documents hold no tokens")
        # Per stream: a cache on the method is one for every stream (main, anneal, held-out), which evicted each
        # other's epochs and kept every stream ever made alive.
        self._epoch = lru_cache(maxsize=2)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs)) if self.shuffle else \
            np.arange(len(self.docs))
        ends = np.cumsum(self.lengths[order])
        return order, ends

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) of the stream and, for each, a number unique to its document."""
        tokens, doc_ids = [], []
        pos, end = start, start + length
        while pos < end:
            epoch, offset = divmod(pos, self.epoch_tokens)
            order, ends = self._epoch(epoch)
            k = int(np.searchsorted(ends, offset, side="right"))
            doc_start = int(ends[k] - self.lengths[order[k]])
            take = min(int(ends[k]) - offset, end - pos)
            doc = self.shards[int(self.docs[order[k]])]
            piece = doc[offset - doc_start: offset - doc_start + take]
            if self.vocab and len(piece) and int(piece.max()) >= self.vocab:
                # else torch's "index out of range in self" at the embedding, naming neither shard nor token
                raise ConfigError(f"data.shards: document {self.shards.doc_id(int(self.docs[order[k]]))!r} holds "
                                  f"token id {int(piece.max())}, past its tokenizer's {self.vocab}: the shards are "
                                  "damaged or were written by another tokenizer; write them again")
            tokens.append(piece)
            doc_ids.append(np.full(take, epoch * len(self.docs) + k, dtype=np.int64))
            pos += take
        return np.concatenate(tokens).astype(np.int64), np.concatenate(doc_ids)


def pack(stream: TokenStream, offset: int, n: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Windows offset + i*seq_len .. + seq_len + 1 for i < n, as tokens, labels and document ids [n, seq_len]."""
    tokens, docs = stream.read(offset, n * seq_len + 1)
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len)[None, :]
    inputs, input_docs = tokens[index], docs[index]
    labels = np.where(docs[index + 1] == input_docs, tokens[index + 1], IGNORE)
    # Only equality matters to the mask; small numbers per row keep them exact in any dtype.
    input_docs = input_docs - input_docs[:, :1]
    return {"tokens": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
            "document_ids": torch.from_numpy(input_docs)}


def schedule_value(schedule: list[list[int]], step: int, default: int) -> int:
    """The value of a [[from_step, value], ...] schedule at `step` (the last entry started, else `default`)."""
    value = default
    for start, v in sorted(schedule):
        if step >= start:
            value = v
    return value


class PackedBatches:
    """One data-parallel rank's micro-batches, optimizer step after optimizer step (see the module docstring)."""

    def __init__(self, shards: TokenShards, cfg: TrainingSection, *, held_out: float = 0.0,
                 dp_rank: int = 0, dp_size: int = 1, anneal: TokenShards | None = None):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        train, held = split_documents(shards, held_out, cfg.seed)
        self.streams = {"main": TokenStream(shards, train, cfg.seed)}
        # What the saved position is a position in: resumed into another stream (another seed, held-out share or
        # corpus), it had re-read some documents, skipped others and trained on held-out ones.
        self.identity = {"seed": cfg.seed, "held_out": held_out, "main": [len(shards), shards.num_tokens]}
        if anneal is not None:
            kept = _not_held_out(anneal, shards, held)
            self.streams["anneal"] = TokenStream(anneal, kept, cfg.seed + 1)
            self.identity["anneal"] = [len(anneal), anneal.num_tokens]
        self.step = 0
        self.offsets = {name: 0 for name in self.streams}
        for step in {0, *(s for s, _ in cfg.batch_size_schedule)}:
            self.rank_batch(step)  # a batch that does not split evenly fails now, not hours later

    def batch_size(self, step: int) -> int:
        return schedule_value(self.cfg.batch_size_schedule, step, self.cfg.batch_size)

    def seq_len(self, step: int) -> int:
        return schedule_value(self.cfg.seq_len_schedule, step, self.cfg.seq_len)

    def rank_batch(self, step: int) -> int:
        batch = self.batch_size(step)
        if batch % self.dp_size:
            raise ConfigError(f"training.batch_size {batch} does not split over {self.dp_size} data-parallel ranks")
        per_rank = batch // self.dp_size
        micro = self.cfg.micro_batch_size or per_rank
        if per_rank % micro:
            raise ConfigError(f"training.micro_batch_size {micro} does not divide the {per_rank} sequences per rank")
        return per_rank

    def tokens_per_step(self, step: int) -> int:
        return self.batch_size(step) * self.seq_len(step)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        step, seq_len, per_rank = self.step, self.seq_len(self.step), self.rank_batch(self.step)
        annealing = "anneal" in self.streams and step >= self.cfg.steps - self.cfg.anneal_steps
        name = "anneal" if annealing else "main"
        offset = self.offsets[name] + self.dp_rank * per_rank * seq_len
        batch = pack(self.streams[name], offset, per_rank, seq_len)
        self.offsets[name] += self.batch_size(step) * seq_len
        self.step += 1
        micro = self.cfg.micro_batch_size or per_rank
        return [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, per_rank, micro)]

    def state_dict(self) -> dict:
        return {"step": self.step, "offsets": dict(self.offsets), "identity": self.identity}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("identity", self.identity)
        changed = [k for k in sorted(set(saved) | set(self.identity)) if saved.get(k) != self.identity.get(k)]
        if changed:
            names = {"seed": "training.seed", "held_out": "data.held_out", "main": "data.shards",
                     "anneal": "data.anneal_shards"}
            raise ConfigError(
                "the checkpoint's data position is in another token stream (" + ", ".join(
                    f"{names[k]}: {_described(k, saved.get(k))} then, {_described(k, self.identity.get(k))} now"
                    for k in changed) + "); resume with the checkpoint's, or train in a new run.dir")
        self.step = int(state["step"])
        self.offsets.update({k: int(v) for k, v in state["offsets"].items()})

    def rewind(self, step: int) -> None:
        """Back to optimizer step `step` (a rollback), the offsets kept: the bad batches stay skipped, while the batch
        size, sequence length and anneal shards follow the step again, as they would have without the rollback."""
        self.step = step


def _described(key: str, value) -> str:
    if key in ("main", "anneal"):
        return "none" if value is None else f"{value[0]:,} documents of {value[1]:,} tokens"
    return str(value)


def held_out_batches(shards: TokenShards, cfg: TrainingSection, held_out: float, n_batches: int,
                     dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
    """This rank's share of the evaluation set, in micro-batches: the same set every time, for any split of the work.

    The set is `n_batches` global batches of `cfg.batch_size` windows of `cfg.seq_len` (fewer where the held-out
    documents run out) from the held-out documents in a fixed order; each rank takes its slice of every batch, as in
    training, cut into `cfg.micro_batch_size` rows so that evaluation needs no more memory than a training step.
    """
    _, docs = split_documents(shards, held_out, cfg.seed)
    if len(docs) == 0:
        return []
    stream = TokenStream(shards, docs, cfg.seed, shuffle=False)
    batch, seq_len = cfg.batch_size, cfg.seq_len
    per_rank = batch // dp_size
    micro = cfg.micro_batch_size or per_rank
    n_batches = max(min(n_batches, stream.epoch_tokens // (batch * seq_len)), 1)
    out = []
    for b in range(n_batches):
        start = (b * batch + dp_rank * per_rank) * seq_len
        rows = pack(stream, start, per_rank, seq_len)
        # Held-out documents fewer than one batch: the stream's second pass over them is not scored again (its
        # tokens had counted twice in the loss).
        label_at = start + 1 + torch.arange(per_rank * seq_len).view(per_rank, seq_len)
        rows["labels"] = rows["labels"].masked_fill(label_at >= stream.epoch_tokens, IGNORE)
        out += [{k: v[i:i + micro] for k, v in rows.items()} for i in range(0, per_rank, micro)]
    return out


def default_model_tokenizer():
    """The built-in default model's tokenizer (SmolLM2's 49,152-token BPE), for `[shards] tokenizer =
    "herd.train.data:default_model_tokenizer"`: a vocabulary small enough for the tiny models trained on a CPU."""
    from herd.llm import default_model_path
    from herd.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())
