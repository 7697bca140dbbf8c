"""The generation engine: prefill and decode over a KV cache for a batch of prompts of different lengths.

Everything that generates text — `LLM.generate`, chat, the server, rejection sampling — goes through `Generator.stream`,
which yields text deltas that are safe to show: whole UTF-8 characters only, and never a prefix of a stop string.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from herd.generate.sampling import SamplingParams, TokenLogprob, sample, token_logprob
from herd.model.llama import KVCache, Transformer


class ContextLengthError(ValueError):
    pass


@dataclass
class Delta:
    """What one step added to sequence `index` of the batch; `finish_reason` is set on its last delta."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token or string) or "length"
    stop_token: int | None = None  # the stop token that ended it, if one did


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stop token excluded
    text: str
    finish_reason: str
    stop_token: int | None = None
    logprobs: list[TokenLogprob] | None = None


class _Sequence:
    """One prompt's progress: its tokens, the text decoded so far and how much of it has been handed out."""

    def __init__(self, prompt: list[int], params: SamplingParams, max_tokens: int, stop_ids: frozenset[int], device):
        self.prompt, self.params, self.max_tokens = prompt, params, max_tokens
        self.stop_ids = frozenset() if params.ignore_eos else stop_ids | frozenset(params.stop_token_ids)
        self.rng = params.rng(device)
        self.tokens: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.stop_token: int | None = None
        # A stop string may be completed by the next token: hold back as much text as could start one.
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    def step(self, token: int, piece: bytes, logprob: TokenLogprob | None, index: int) -> Delta:
        delta = Delta(index, "", [])
        if token in self.stop_ids:
            self.finish_reason, self.stop_token = "stop", token
        else:
            self.tokens.append(token)
            delta.tokens.append(token)
            delta.logprobs += [logprob] if logprob else []
            self.text += self.decoder.decode(piece)
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason:
            self.text += self.decoder.decode(b"", final=True)
        hit = min((i for i in (self.text.find(s) for s in self.params.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text, self.finish_reason = self.text[:hit], "stop"
        end = len(self.text) if self.finish_reason else max(self.emitted, len(self.text) - self.holdback)
        delta.text, self.emitted = self.text[self.emitted:end], end
        delta.finish_reason, delta.stop_token = self.finish_reason, self.stop_token
        return delta


class Generator:
    def __init__(self, model: Transformer, tokenizer, *, prefill_chunk: int = 512):
        self.model, self.tokenizer, self.prefill_chunk = model, tokenizer, prefill_chunk

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        per_row = _per_row(params, len(prompts))
        done = [Completion(list(p), [], "", "", logprobs=[] if sp.logprobs is not None else None)
                for p, sp in zip(prompts, per_row)]
        for d in self.stream(prompts, per_row):
            row = done[d.index]
            row.tokens += d.tokens
            row.text += d.text
            if row.logprobs is not None:
                row.logprobs += d.logprobs
            if d.finish_reason:
                row.finish_reason, row.stop_token = d.finish_reason, d.stop_token
        return done

    @torch.inference_mode()
    def stream(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]) -> Iterator[Delta]:
        """Generate for every prompt at once, yielding each sequence's deltas as they are decided."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        per_row = _per_row(params, len(prompts))
        context = self.model.config.max_seq_len
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise ContextLengthError(
                f"the prompt has {longest} tokens but the model's context is {context}: shorten the prompt"
            )
        stop_ids = frozenset(self.tokenizer.stop_ids)
        seqs = [
            _Sequence(list(p), sp, min(sp.max_tokens, context - len(p)), stop_ids, self.device)
            for p, sp in zip(prompts, per_row)
        ]
        cache_len = longest + max(s.max_tokens for s in seqs)
        start = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        cache = KVCache(self.model.config, len(prompts), cache_len, device=self.device,
                        dtype=self.model.tok_embeddings.weight.dtype, start=start)

        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        batch = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
        logits = self._prefill(batch, cache)
        while True:
            next_tokens = []
            for i, seq in enumerate(seqs):
                if seq.finish_reason:
                    next_tokens.append(pad)
                    continue
                row = logits[i]
                token = sample(row, seq.params, seq.rng)
                lp = token_logprob(row, token, seq.params.logprobs) if seq.params.logprobs is not None else None
                yield seq.step(token, self.tokenizer.decode_bytes([token]), lp, i)
                next_tokens.append(token)
            if all(s.finish_reason for s in seqs):
                return
            step = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
            logits = self.model(step, cache=cache)[:, -1]

    def _prefill(self, batch: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the prompts through the model in chunks (bounded memory for long prompts); last position's logits."""
        for begin in range(0, batch.shape[1], self.prefill_chunk):
            logits = self.model(batch[:, begin:begin + self.prefill_chunk], cache=cache, last_only=True)
        return logits[:, -1]


def _per_row(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling parameter sets for {n} prompts")
    return list(params)
