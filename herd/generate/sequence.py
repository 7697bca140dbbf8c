"""One sequence in the engine: its tokens, where its keys live, and the text it has handed out."""
from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from herd.generate.kv_cache import chain_hash
from herd.generate.sampling import PenaltyTokens, SamplingParams, TokenLogprob


@dataclass
class Delta:
    """What one step added to sequence `index` of a request; `finish_reason` is set on its last delta."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # On a sequence's first delta, where asked for (SamplingParams.prompt_logprobs, score_from): the prompt's
    # tokens from score_from on, each with its log-probability given the tokens before it.
    prompt_logprobs: list[TokenLogprob] | None = None
    # "stop" (a stop token or string), "length", "timeout", "cancelled", or "error" (then `text` says what failed)
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop token that ended it, if one did


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stop token excluded
    text: str
    finish_reason: str
    stop_token: int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class Constraint(Protocol):
    """Structured output: which tokens may come next, told each chosen token."""

    def mask(self, logits):  # float logits [vocab] -> logits with forbidden tokens at -inf
        ...

    def accept(self, token: int) -> None:
        ...

    @property
    def finished(self) -> bool:  # nothing may follow (a grammar's document is complete): the sequence ends
        ...


class Sequence:
    def __init__(self, prompt: list[int], params: SamplingParams, *, index: int, max_tokens: int,
                 stop_ids: frozenset[int], block_size: int, sink: Callable[[Delta], None], device=None,
                 score_from: int | None = None, constraint: Constraint | None = None, deadline: float | None = None,
                 shares_cache: bool = True):
        self.tokens = list(prompt)  # the prompt, then what was generated
        self.prompt_len = len(prompt)
        self.params, self.index, self.max_tokens, self.sink = params, index, max_tokens, sink
        # ignore_eos passes over the tokenizer's end tokens only: the caller's own stop tokens still end it (vLLM).
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else stop_ids)
        self.rng = params.rng(device)
        self.penalties: PenaltyTokens | None = None  # made at its first token, where params adjust the logits
        if score_from is None and params.prompt_logprobs is not None:
            score_from = 1
        # The first token has nothing before it to be predicted from.
        self.score_from = None if score_from is None else max(score_from, 1)
        self.constraint, self.deadline = constraint, deadline
        self.shares_cache = shares_cache  # False: it neither reads blocks from the prefix cache nor enters its own
        self.prompt_logprobs: list[TokenLogprob] = []  # for tokens[score_from:prompt_len], as they are computed
        self.block_size = block_size
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose keys and values are in the cache
        self.draft: list[int] = []  # guessed tokens after the last one, checked in this step (speculative decoding)
        self.num_registered = 0  # full blocks entered in the prefix cache
        self.cached_tokens = 0  # prompt tokens found in the prefix cache on (first) admission
        self._hashes: list[bytes] = []
        self.admitted_at: float | None = None
        self.cancelled = False
        self.finished = False
        # Text handed out so far; a stop string may be completed by the next token, so as much text as could
        # start one is held back.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        # Log-probabilities go out with their token's text, each kept with where that text starts: those of tokens
        # whose text a stop string then takes are dropped with it, as the text is.
        self.held_logprobs: list[tuple[int, TokenLogprob]] = []

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.num_computed

    def block_hash(self, i: int) -> bytes:
        """The chained hash of full block i (tokens never change once there, so hashes are kept)."""
        while len(self._hashes) <= i:
            j = len(self._hashes)
            parent = self._hashes[-1] if self._hashes else b""
            self._hashes.append(chain_hash(parent, self.tokens[j * self.block_size:(j + 1) * self.block_size]))
        return self._hashes[i]

    def cacheable_blocks(self) -> int:
        """Full blocks that may come from the prefix cache: the last token is always computed (its logits are
        needed), and so is every token a scoring request wants the log-probability of."""
        if not self.shares_cache:
            return 0
        limit = len(self.tokens) - 1
        if self.score_from is not None:
            limit = min(limit, self.score_from - 1 + len(self.prompt_logprobs))
        return max(limit, 0) // self.block_size

    @property
    def prompt_logit_rows(self) -> int:
        """How many of the prompt's positions it computes logits for: the last one, and those that score the
        prompt."""
        return 1 + (max(self.prompt_len - self.score_from, 0) if self.score_from is not None else 0)

    def scored_positions(self, begin: int, n: int) -> range:
        """Of the positions begin..begin+n-1 computed in a step, those whose logits score the prompt's next token
        and have not scored it yet (a sequence recomputed after preemption scores each token once)."""
        if self.score_from is None:
            return range(0)
        return range(max(begin, self.score_from - 1 + len(self.prompt_logprobs)), min(begin + n, self.prompt_len - 1))

    def over_time(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def step(self, token: int, piece: bytes, logprob: TokenLogprob | None) -> Delta:
        """Take the chosen token: the delta of text that is now safe to hand out."""
        if self.constraint is not None:
            self.constraint.accept(token)
        delta = Delta(self.index, "", [])
        reason, stop_token, checked = None, None, len(self.text)
        if token in self.stop_ids:
            reason, stop_token = "stop", token
        else:
            self.tokens.append(token)
            delta.tokens.append(token)
            self.held_logprobs += [(len(self.text), logprob)] if logprob else []
            self.text += self.decoder.decode(piece)
            if len(self.tokens) - self.prompt_len >= self.max_tokens:
                reason = "length"
            elif self.constraint is not None and self.constraint.finished:  # past its stop token, under ignore_eos
                reason = "stop"
        if reason:
            self.text += self.decoder.decode(b"", final=True)
        # A stop string ends in this step's text, none having ended before: only its last stretch is searched (the
        # whole reply at every token had cost 0.76 ms a token at 128K tokens).
        start = max(0, checked - max(map(len, self.params.stop), default=0) + 1)
        hit = min((i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text, reason = self.text[:hit], "stop"
        end = len(self.text) if reason else max(self.emitted, len(self.text) - self.holdback)
        delta.text, self.emitted = self.text[self.emitted:end], end
        delta.logprobs = self._logprobs_until(end if hit >= 0 or not reason else None)
        delta.finish_reason, delta.stop_token = reason, stop_token
        return delta

    def _logprobs_until(self, end: int | None) -> list[TokenLogprob]:
        """The held log-probabilities of tokens whose text starts before `end` (None: all of them)."""
        out = [lp for start, lp in self.held_logprobs if end is None or start < end]
        self.held_logprobs = [(start, lp) for start, lp in self.held_logprobs if end is not None and start >= end]
        return out

    def ending(self, reason: str, text: str = "") -> Delta:
        """The last delta of a sequence ended from outside (timeout, cancellation, an error): what was held back."""
        if reason == "timeout":
            self.text += self.decoder.decode(b"", final=True)
            text, self.emitted = self.text[self.emitted:], len(self.text)
        return Delta(self.index, text, [], self._logprobs_until(None), finish_reason=reason)
