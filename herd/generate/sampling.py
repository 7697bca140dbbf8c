"""Sampling parameters and the choice of the next token from one sequence's logits."""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from herd.bounds import (AT_LEAST_ONE, FINITE, FRACTION, NONZERO_FRACTION, NON_NEGATIVE, POSITIVE, require,
                         require_kind)

def _token_bias(bias) -> tuple[tuple[int, float], ...]:
    """A logit_bias ({token id: bias} or its sorted pairs) as sorted pairs, or an error naming logit_bias: a NaN
    bias had made every logit NaN, a string id ("5", as JSON writes it) a TypeError deep in the engine."""
    pairs = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = sorted((token, value) for token, value in pairs)
    except (TypeError, ValueError):
        raise TypeError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
    for token, value in pairs:
        if isinstance(token, bool) or not isinstance(token, Integral) or isinstance(value, bool) \
                or not isinstance(value, Real):
            raise TypeError(f"logit_bias must map token ids (integers) to numbers, got {token!r}: {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"logit_bias of token {token} must be a finite number, got {value}")
    return tuple(pairs)


def _stop_strings(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if not all(stops):
        raise ValueError("stop strings must not be empty")
    return tuple(stops)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 256  # None: up to the end of the context, as vLLM's None and the server's null
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    # Penalties as OpenAI defines them (subtracted from a token's logit: presence once if the token was generated,
    # frequency once per time it was) and as Hugging Face's repetition penalty (a logit of any token already in
    # the prompt or the reply divided by it where positive, multiplied where negative).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit); a mapping is taken too
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not returned
    stop_token_ids: tuple[int, ...] = ()  # on top of the tokenizer's own end-of-turn tokens
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (Delta.prompt_logprobs)
    ignore_eos: bool = False  # keep going past the tokenizer's end-of-turn tokens, not stop_token_ids (benchmarks)

    def __post_init__(self):
        for name in _DEFAULT_WHEN_NONE:  # None is the default, as OpenAI's null is (it had failed mid-generation)
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(SamplingParams, name))
        require_kind(self, Integral, "max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", optional=True)
        require_kind(self, Real, "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", optional=True)
        # Finite too: a NaN temperature had sampled from NaN probabilities (an empty reply), an infinite one at random.
        require(self, AT_LEAST_ONE, "max_tokens")
        require(self, NON_NEGATIVE, "temperature", "top_k", "logprobs", "prompt_logprobs")
        require(self, NONZERO_FRACTION, "top_p")
        require(self, FRACTION, "min_p")
        require(self, POSITIVE, "repetition_penalty")
        require(self, FINITE, "presence_penalty", "frequency_penalty")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:  # torch.Generator's range
            raise ValueError(f"seed must be from -2**63 to 2**64 - 1, got {self.seed}")
        object.__setattr__(self, "logit_bias", _token_bias(self.logit_bias))
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        if not all(isinstance(t, Integral) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise TypeError(f"stop_token_ids must be token ids (integers from 0), got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):  # "no" had meant True
            raise TypeError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @functools.cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as token ids and their biases, made once: made from its pairs at every step, a bias on all 49K
        tokens had cost 32 ms a step, and every other sequence in the batch waited on it."""
        ids, bias = zip(*self.logit_bias)
        return torch.tensor(ids), torch.tensor(bias, dtype=torch.float32)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias)

    def rng(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        # PyTorch's CPU generator keeps only a seed's low 32 bits (seeds 7 and 7 + 2**32 had sampled alike): every bit
        # of the seed goes into them through a hash. Negative seeds are taken modulo 2**64, as torch takes them.
        digest = hashlib.blake2b((self.seed % (1 << 64)).to_bytes(8, "little"), digest_size=8).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


_DEFAULT_WHEN_NONE = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty")


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # the most likely alternatives, when asked for


class NaNLogits(ValueError):
    """The model computed NaN: damaged weights or an impossible configuration, not something to sample from."""

    def __init__(self):
        super().__init__("the model computed NaN logits: its weights or configuration are damaged (herd verify "
                         "checks a checkpoint's files against their checksums)")


def sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> int:
    """The next token for one sequence from its float logits [vocab]; NaNLogits where they hold a NaN."""
    if params.greedy:
        scores = logits
    else:
        probs = filtered_probs(logits, params)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race) at a fraction of torch.multinomial's cost
        # over a 128K vocabulary; E = -log U is cheaper to draw than exponential_().
        scores = probs / -torch.rand(probs.shape, generator=rng, device=probs.device).log()
    token = argmax(scores)
    # argmax takes a NaN for the largest (and softmax spreads one to every token), so looking at the chosen one
    # finds any: a damaged model had answered with whatever token 0 is, often the end of text (an empty reply).
    if math.isnan(scores[token]):
        raise NaNLogits()
    return token


def argmax(values: torch.Tensor) -> int:
    """The index of the largest of `values` [n], as torch.argmax gives it (the first of equal ones; a NaN counts as
    the largest). On the CPU through numpy's vectorised argmax: PyTorch's took about 110 us over the default model's
    49K logits against numpy's 5-11, which was about 8% of a decode step of 16 sequences."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return int(values.detach().numpy().argmax())
    return int(values.argmax())


class PenaltyTokens:
    """A sequence's logit bias and penalties, applied as vLLM orders them (bias, then penalties) before sampling or
    greedy choice alike; the logits themselves are left as they are (log-probabilities report the model's own).

    It keeps the tokens the penalties read (every one of prompt and reply for the repetition penalty, the reply's
    counts for presence and frequency), kept as they come, token by token: rebuilt from the whole context at every
    step, they had cost 3.4 ms a token per sequence at 32K tokens."""

    def __init__(self, size: int, device):
        self.seen = torch.zeros(size, dtype=torch.bool, device=device)
        self.seen_ids = torch.zeros(0, dtype=torch.long, device=device)  # each token of prompt and reply, once
        self.counts = torch.zeros(size, device=device)  # of the reply's tokens
        self.replied_ids = torch.zeros(0, dtype=torch.long, device=device)  # each token of the reply, once
        self.taken = 0  # tokens of the sequence counted so far

    def update(self, tokens: list[int], prompt_len: int) -> None:
        """Count `tokens[taken:]`, the sequence's tokens since the last update (the first `prompt_len` its prompt)."""
        new = torch.tensor(tokens[self.taken:], dtype=torch.long, device=self.seen.device)
        fresh = new[~self.seen[new]].unique()
        self.seen[fresh] = True
        self.seen_ids = torch.cat([self.seen_ids, fresh])
        replied = new[max(prompt_len - self.taken, 0):]
        first = replied[self.counts[replied] == 0].unique()
        self.counts.index_add_(0, replied, torch.ones_like(replied, dtype=self.counts.dtype))
        self.replied_ids = torch.cat([self.replied_ids, first])
        self.taken = len(tokens)

    def adjust(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """The logits with the bias and penalties applied: only the tokens seen are touched."""
        logits = logits.float().clone()
        if params.logit_bias:
            ids, bias = params.bias_tensors
            logits.index_add_(0, ids.to(logits.device), bias.to(logits.device))
        if params.repetition_penalty != 1:
            values = logits[self.seen_ids]
            logits[self.seen_ids] = torch.where(values > 0, values / params.repetition_penalty,
                                                values * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            counts = self.counts[self.replied_ids]
            logits[self.replied_ids] -= params.frequency_penalty * counts + params.presence_penalty
        return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: temperature, then top-k, then top-p, then min-p (Hugging Face's order;
    unnormalised after truncation)."""
    # The largest logit is taken off first: divided by a temperature near 0 (1e-38) the logits overflow to infinities
    # whose softmax is NaN everywhere; shifted, the most likely token's is 0 whatever the temperature.
    logits = logits.float()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = _top_p(torch.softmax(logits, dim=-1), params.top_p)
    if params.min_p:  # relative to the most likely token, which every truncation keeps
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs with 0 for all but the smallest prefix of them, the most likely first, whose mass reaches top_p (as
    Hugging Face's TopPLogitsWarper keeps); where it ends among equal probabilities, the lower ids come first."""
    if top_p >= 1:
        return probs
    # Sorting a 128K vocabulary costs tens of ms on a CPU. A language model's top-p set is usually a handful of
    # tokens, found among the largest few hundred; a flat distribution gets its cut-off by bisection instead.
    top, order = probs.topk(min(256, probs.numel()))
    if top.sum() >= top_p:
        # A token goes when the mass before it already reaches top_p; the most likely token always stays (a top_p of
        # 1e-300 is 0 as float32, which kept none).
        n = max(int((top.cumsum(-1) - top < top_p).sum()), 1)
        if n == probs.numel() or n < top.numel() and top[n] < top[n - 1]:
            return torch.zeros_like(probs).scatter(-1, order[:n], top[:n])
        # topk orders equal probabilities arbitrarily, and more of them than it returned may equal the last kept.
        cut = top[n - 1]
        return _fill_to(probs, cut, torch.nextafter(cut, torch.ones_like(cut)), top_p)
    return _fill_to(probs, *_top_p_bounds(probs, top_p), top_p)


def _top_p_bounds(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """low < high with sum(p >= low) >= top_p > sum(p >= high), by bisection: the top-p set is every p >= high and
    some of those from low (nearly always a single probability, or a run of equal ones)."""
    # high starts just above the largest probability, which the whole run of them may share (a uniform distribution)
    low, high = torch.zeros((), device=probs.device), probs.max()
    high = torch.nextafter(high, torch.ones_like(high))
    for _ in range(40):
        mid = (low + high) / 2
        if torch.where(probs >= mid, probs, 0.0).sum() >= top_p:
            low = mid
        else:
            high = mid
    return low, high


def _fill_to(probs: torch.Tensor, low: torch.Tensor, high: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs keeping every p >= high, none below low, and of those in between (the largest first, equal ones by
    id) only as many as bring the mass to top_p: keeping them all had kept every token of a uniform distribution."""
    out = probs.masked_fill(probs < low, 0.0)  # a NaN stays, for sample to report
    # Probabilities of 0 (top-k's leavings) are never drawn: sorting them could only cost time.
    between = ((probs >= low) & (probs < high) & (probs > 0)).nonzero()[:, 0]
    if between.numel() > 1:
        values, rank = probs[between].sort(descending=True, stable=True)
        before = probs[probs >= high].sum() + values.cumsum(-1) - values
        surplus = before >= top_p
        surplus[0] = False  # the mass above falls short of top_p, so the first of them is needed
        out[between[rank[surplus]]] = 0.0
    return out


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """Log-probability of `token` under the model's own distribution (before temperature and truncation) over
    `logits`, which are those of the ids that may be drawn."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = {}
    if top_n:
        values, ids = logp.topk(min(top_n, logp.numel()))
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), top)
