"""The generation engine: continuous batching over a paged KV cache with prefix caching.

Everything that generates text — `LLM.generate`, chat, the server, rejection sampling — submits sequences here and
reads `Delta`s: text that is safe to show (whole UTF-8 characters only, never a prefix of a stop string). The engine
steps all running sequences together and admits new ones between steps. It is driven either by the caller that
waits on it (`stream`, `generate`: no thread needed) or, for a server, by one background thread (`start`);
`submit` and `Request.cancel` are safe from any thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from herd.bounds import AT_LEAST_ONE, NON_NEGATIVE, require, require_kind
from herd.generate.kv_cache import PagedKVCache, StepAttention, cache_dtype
from herd.generate.sampling import NaNLogits, PenaltyTokens, SamplingParams, TokenLogprob, sample, token_logprob
from herd.generate.scheduler import Scheduler
from herd.generate.sequence import Completion, Constraint, Delta
from herd.generate.sequence import Sequence as _Sequence
from herd.generate.speculative import SpeculativeConfig
from herd.model.llama import Transformer
from herd.quant.decode import DecodeBlock
from herd.quant.phase import prompt_rows

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    pass


# Llama 3's pretraining sequence length: the context every engine holds whatever memory it is given.
GUARANTEED_CONTEXT = 8192


class QueueFullError(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 512 << 20  # the KV cache's memory; raised to hold one context of up to 8,192 tokens
    max_batch: int = 64  # sequences running at once
    max_step_tokens: int = 512  # tokens per step: every decoding sequence's one, the rest for prompts (chunks)
    max_queue: int = 1024  # sequences waiting; `submit` refuses more
    prefix_caching: bool = True  # False: every prompt is prefilled in full (to measure what the cache saves)
    # "auto": keys and values in float16 where herd's kernel attends (float32 models on the CPU), else in the model's
    # dtype; "model": always in the model's dtype (exact float32 attention, twice the memory to read).
    kv_cache_dtype: str = "auto"
    speculative: SpeculativeConfig = SpeculativeConfig()  # prompt-lookup drafts for greedy sequences

    def __post_init__(self):
        # A float block size had reached torch as 9320.0 blocks, a string the range check's '>='.
        require_kind(self, Integral, "block_size", "kv_cache_bytes", "max_batch", "max_step_tokens", "max_queue")
        if not isinstance(self.prefix_caching, bool):  # "no" had turned caching on
            raise TypeError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")
        if not isinstance(self.kv_cache_dtype, str):
            raise TypeError(f"kv_cache_dtype must be a string, got {self.kv_cache_dtype!r}")
        if not isinstance(self.speculative, SpeculativeConfig):
            raise TypeError(f"speculative must be a SpeculativeConfig, got {self.speculative!r}")
        # A batch or a step of no sequences had the engine wait for ever; a block of none divided by zero.
        require(self, AT_LEAST_ONE, "block_size", "max_batch", "max_step_tokens", "max_queue")
        require(self, NON_NEGATIVE, "kv_cache_bytes")
        if self.kv_cache_dtype not in ("auto", "model"):
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r}: use 'auto' or 'model'")


class Request:
    """A submitted request's sequences; `cancel` ends them and frees their blocks at the next step."""

    def __init__(self, seqs: list[_Sequence], engine: Generator):
        self.seqs, self._engine = seqs, engine

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancelled = True
        self._engine._wake()


_NO_TOKEN = "the output grammar allows no next token: its schema asks for text that no token may carry"


class Generator:
    def __init__(self, model: Transformer, tokenizer, *, prefill_chunk: int = 512, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        # A model's vocabulary may be padded past its tokenizer's: ids there have no text, so they are never drawn,
        # and log-probabilities are over the ids that may be (padded rows had taken mass and been top alternatives).
        self.vocab = getattr(tokenizer, "vocab_size", None)
        self.config = config or EngineConfig(max_step_tokens=prefill_chunk)
        mc = model.config
        dtype = model.tok_embeddings.weight.dtype
        if self.config.kv_cache_dtype == "auto":
            dtype = cache_dtype(self.device, dtype)
        block = self.config.block_size
        if block > mc.max_seq_len:  # a billion had asked for two blocks of 384 GB each on the default model
            raise ValueError(f"block_size {block} exceeds the model's context of {mc.max_seq_len} tokens: use at most "
                             f"that (16, the default, suits most uses)")
        per_block = PagedKVCache.bytes_per_token(mc, dtype) * block
        # At least one full context up to Llama 3's pretraining length (plus a block to grow into), so that a
        # sequence that long can always finish. Beyond it the memory given is what there is, and the context the
        # engine offers (`capacity`) is what it holds: one full 128K context of Llama 3.1 8B is 17 GB of float16
        # keys and values, which a server would fill with cached prefixes over time.
        guaranteed = -(-min(mc.max_seq_len, GUARANTEED_CONTEXT) // block) + 1
        useful = (-(-mc.max_seq_len // block) + 1) * self.config.max_batch  # more could only hold cached prefixes
        num_blocks = max(guaranteed, min(useful, self.config.kv_cache_bytes // per_block))
        self.cache = PagedKVCache(mc, num_blocks, block, device=self.device, dtype=dtype)
        self.scheduler = Scheduler(self.cache, max_batch=self.config.max_batch,
                                   max_step_tokens=self.config.max_step_tokens,
                                   prefix_caching=self.config.prefix_caching,
                                   speculative=self.config.speculative)
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self._fused_decode = any(isinstance(block, DecodeBlock) for block in model.layers)
        # Where quantized layers compute a short prompt apart from a long one (`herd.quant.phase`), a short prompt's
        # blocks are not those a long prompt would compute: short prompts keep out of the prefix cache.
        self._short_prompt = max((getattr(m, "short_prompt_tokens", 0) for m in model.modules()), default=0)
        self._step_lock = threading.Lock()
        self._inbox: list[_Sequence] = []
        self._inbox_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def capacity(self) -> int:
        """The most tokens one sequence can hold: the context, or what the cache holds (less a block to grow into)
        if that is smaller."""
        return min(self.model.config.max_seq_len, (self.cache.pool.num_blocks - 1) * self.cache.block_size)

    def context_error(self, tokens: int) -> str:
        """Why a prompt of `tokens` tokens cannot be taken, and what to do. In OpenAI's and vLLM's words ("maximum
        context length"), which clients look for to tell this error from others (litellm's context-window
        fallbacks had not fired)."""
        if self.capacity == self.model.config.max_seq_len:
            return (f"This model's maximum context length is {self.capacity} tokens, but the prompt has {tokens}: "
                    "shorten the prompt")
        return (f"This model's maximum context length is {self.model.config.max_seq_len} tokens, but the KV cache "
                f"holds {self.capacity} and the prompt has {tokens}: shorten the prompt, or give the cache more "
                "memory (EngineConfig.kv_cache_bytes; --kv-cache-mib of herd serve, chat and generate)")

    # -- submitting -------------------------------------------------------------------------------------------

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams],
               sink: Callable[[Delta], None], *, n: int = 1, timeout: float | None = None,
               score_from: int | None = None, constraints: Sequence[Constraint] | None = None,
               admission: bool = True) -> Request:
        """Queue `n` sequences for each prompt (Delta.index: prompt * n + choice); thread-safe.

        sink: called with every Delta, from the thread that steps the engine.
        timeout: seconds from now after which the sequences end with finish_reason "timeout".
        score_from: the first delta's prompt_logprobs hold log p of prompt tokens [score_from:] (1 where
            params.prompt_logprobs is set and score_from is not); generation goes on as usual.
        constraints: one per sequence, masking the logits before each choice (structured output).
        admission: a server's admission control. QueueFullError where more than `max_queue` sequences would wait
            beyond the places free in the batch; ValueError for more sequences than the batch and the queue ever
            hold together, which waiting would not help. A caller that waits for its own results (generate,
            stream) is never refused.
        """
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        per_row = _per_row(params, len(prompts))
        vocab = self.model.config.vocab_size
        if min(min(p) for p in prompts) < 0 or max(max(p) for p in prompts) >= vocab:
            raise ValueError(f"a prompt token id is outside the model's vocabulary (0..{vocab - 1})")
        if any(not 0 <= token < vocab for sp in per_row for token, _ in sp.logit_bias):
            raise ValueError(f"logit_bias names a token outside the model's vocabulary (0..{vocab - 1})")
        longest = max(len(p) for p in prompts)
        if longest >= self.capacity:
            raise ContextLengthError(self.context_error(longest))
        deadline = time.monotonic() + timeout if timeout is not None else None
        seqs = []
        for prompt, sp in zip(prompts, per_row):
            for choice in range(n):
                # The other choices of a seeded request differ, reproducibly: choice i has seed + i, wrapping past
                # 2**64 - 1 (where it had been refused) as torch's generators wrap seeds.
                if choice and sp.seed is not None:
                    sp = dataclasses.replace(sp, seed=(sp.seed + 1) % (1 << 64))
                room = self.capacity - len(prompt)
                seqs.append(_Sequence(
                    list(prompt), sp, index=len(seqs), max_tokens=min(sp.max_tokens or room, room),
                    stop_ids=self.stop_ids, block_size=self.cache.block_size, sink=sink, device=self.device,
                    score_from=score_from, constraint=constraints[len(seqs)] if constraints else None,
                    deadline=deadline, shares_cache=len(prompt) > self._short_prompt))
        with self._inbox_lock:
            if admission:
                self._admit(len(seqs))
            self._inbox += seqs
        self._wake()
        return Request(seqs, self)

    def _admit(self, count: int) -> None:
        most = self.config.max_batch + self.config.max_queue
        if count > most:
            raise ValueError(f"{count} sequences in one request (prompts x n), but this server runs "
                             f"{self.config.max_batch} at once and queues {self.config.max_queue}: send at most "
                             f"{most} a request")
        free = max(0, self.config.max_batch - len(self.scheduler.running))  # the next step admits that many
        if self.waiting + count - free > self.config.max_queue:
            raise QueueFullError(f"the queue holds {self.config.max_queue} sequences: try again shortly")

    @property
    def waiting(self) -> int:
        """Sequences submitted and not yet running."""
        return len(self._inbox) + len(self.scheduler.waiting)

    def stream(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams],
               **options) -> Iterator[Delta]:
        """Generate for every prompt, yielding each sequence's deltas as they are decided. Stopping early (closing
        the iterator) cancels what is left."""
        events: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        request = self.submit(prompts, params, events.put, admission=False, **options)
        left = len(request.seqs)
        try:
            while left:
                if self._thread is None and events.empty():
                    with _interrupts_after():
                        self.step()
                    continue
                delta = events.get()
                if delta.finish_reason == "error":
                    raise RuntimeError(delta.text)
                left -= delta.finish_reason is not None
                yield delta
        finally:
            request.cancel()

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams],
                 **options) -> list[Completion]:
        per_row = _per_row(params, len(prompts))
        n = options.get("n", 1)
        done = [Completion(list(prompts[i // n]), [], "", "", logprobs=[] if per_row[i // n].logprobs is not None
                           else None) for i in range(len(prompts) * n)]
        for d in self.stream(prompts, per_row, **options):
            row = done[d.index]
            if d.prompt_logprobs is not None:
                row.prompt_logprobs = d.prompt_logprobs
            row.tokens += d.tokens
            row.text += d.text
            if row.logprobs is not None:
                row.logprobs += d.logprobs
            if d.finish_reason:
                row.finish_reason, row.stop_token = d.finish_reason, d.stop_token
        return done

    def score(self, prompts: Sequence[list[int]], score_from: int) -> list[list[float]]:
        """log p(token | everything before it) for the tokens [score_from:] of each prompt, sharing their prefix."""
        scores: list[list[float]] = [[] for _ in prompts]
        for d in self.stream(prompts, SamplingParams(max_tokens=1, temperature=0), score_from=score_from):
            if d.prompt_logprobs is not None:
                scores[d.index] = [lp.logprob for lp in d.prompt_logprobs]
        return scores

    # -- the loop ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Step the engine in a background thread (for servers); the callers then only wait on their sinks."""
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._closing = True
            self._wake()
            self._thread.join()
            self._thread = None

    def _wake(self) -> None:
        self._wakeup.set()

    def _loop(self) -> None:
        while not self._closing:
            try:
                busy = self.step()
            except Exception as error:  # noqa: BLE001 - a failed step ends its sequences, not the server
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {error}")
                busy = False
            if not busy:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()

    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.running)

    @torch.inference_mode()
    def step(self) -> bool:
        """One engine step: admit, run the model over every scheduled token, sample. False when idle."""
        with self._step_lock:
            self._take_inbox()
            self._end_expired()
            batch = self.scheduler.schedule()
            if not batch:
                return bool(self.scheduler.waiting)
            for group in self._forwards(batch):
                logits = self._forward(group)
                row = 0
                for seq, n in group:
                    row = self._score(seq, n, logits, row)
                    if seq.num_computed + n == len(seq.tokens) + len(seq.draft):
                        row = self._advance(seq, n, logits, row)
                    else:
                        self.scheduler.computed(seq, n)
            return True

    def _forwards(self, batch: list[tuple[_Sequence, int]]) -> list[list[tuple[_Sequence, int]]]:
        """The step's sequences in one forward; or, where the model has a faster path for generated tokens alone
        (herd's fused decode block), decoding sequences in one forward and prompt chunks in another, so that a
        prompt arriving does not send a whole batch of decoding sequences down the slower path."""
        if not self._fused_decode:
            return [batch]
        groups: tuple[list, list] = ([], [])
        for seq, n in batch:
            groups[seq.num_computed < seq.prompt_len].append((seq, n))
        return [group for group in groups if group]

    def _forward(self, group: list[tuple[_Sequence, int]]) -> torch.Tensor:
        """The model once over the group's scheduled tokens: the logits of the rows that are sampled or scored."""
        tokens, positions, parts, rows, sizes, logit_sizes = [], [], [], [], [], []
        for seq, n in group:
            begin = seq.num_computed
            offset = len(tokens)
            tokens += seq.tokens[begin:begin + n] + seq.draft  # n counts the draft's tokens too
            positions += range(begin, begin + n)
            prompt = [p < seq.prompt_len for p in range(begin, begin + n)]
            sizes += [seq.prompt_len if p else 0 for p in prompt]
            parts.append((seq.blocks, begin, n, bool(seq.draft)))
            scored = [p - begin for p in seq.scored_positions(begin, n)]
            if begin + n == len(seq.tokens) + len(seq.draft):
                scored += range(n - 1 - len(seq.draft), n)
            rows += [offset + i for i in scored]
            logit_sizes += [seq.prompt_logit_rows if prompt[i] else 0 for i in scored]
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        # Quantized layers compute prompt tokens one way and generated ones another, and a prompt's tokens by its
        # size, whatever the chunking, whatever shares the forward and however much the prefix cache held.
        with prompt_rows(torch.tensor(sizes, device=self.device), torch.tensor(logit_sizes, device=self.device)):
            return self.model(torch.tensor([tokens], device=self.device),
                              torch.tensor([positions], device=self.device),
                              cache=StepAttention(self.cache, parts), logits_at=rows)[0]

    def _score(self, seq: _Sequence, n: int, logits: torch.Tensor, row: int) -> int:
        """The log-probabilities of the prompt tokens that this step's rows of `seq` predict (see _forward)."""
        positions = seq.scored_positions(seq.num_computed, n)
        if not positions:
            return row
        logp = torch.log_softmax(logits[row:row + len(positions), :self.vocab].float(), dim=-1)
        targets = seq.tokens[positions.start + 1:positions.stop + 1]
        # A prompt may hold a padded id (the model's vocabulary is checked, not the tokenizer's): never drawn, so -inf.
        ids = torch.tensor(targets, device=logp.device).unsqueeze(1)
        chosen = logp.gather(1, ids.clamp(max=logp.shape[-1] - 1)).masked_fill(ids >= logp.shape[-1], float("-inf"))
        chosen = chosen[:, 0].tolist()
        top_n = seq.params.prompt_logprobs or 0
        tops: list[dict[int, float]] = [{} for _ in positions]
        if top_n:
            values, ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        seq.prompt_logprobs += [TokenLogprob(t, lp, top) for t, lp, top in zip(targets, chosen, tops)]
        return row + len(positions)

    def _advance(self, seq: _Sequence, n: int, logits: torch.Tensor, row: int) -> int:
        """Choose `seq`'s next token from logits[row]; with a draft, keep choosing while the model's choice equals
        the drafted token (whose keys, computed in this step, are then right), so that a draft changes only how
        many tokens one step yields, never which."""
        draft, seq.draft = seq.draft, []
        deltas, accepted = [], 0
        first = seq.score_from is not None and len(seq.tokens) == seq.prompt_len
        for i in range(len(draft) + 1):
            token, delta = self._choose(seq, logits[row + i])
            deltas.append(delta)
            if delta.finish_reason or i == len(draft) or token != draft[i]:
                break
            accepted += 1
        self.scheduler.computed(seq, n - len(draft) + accepted)
        if first:
            deltas[0].prompt_logprobs = seq.prompt_logprobs
        for delta in deltas[:-1]:
            seq.sink(delta)
        if deltas[-1].finish_reason:
            self._finish(seq, deltas[-1])
        else:
            seq.sink(deltas[-1])
        self.scheduler.stats.drafted_tokens += len(draft)
        self.scheduler.stats.accepted_tokens += accepted
        return row + len(draft) + 1

    def _choose(self, seq: _Sequence, logits: torch.Tensor) -> tuple[int, Delta]:
        masked = logits
        if seq.params.adjusts_logits:
            seq.penalties = seq.penalties or PenaltyTokens(logits.numel(), logits.device)
            seq.penalties.update(seq.tokens, seq.prompt_len)
            masked = seq.penalties.adjust(logits, seq.params)
        masked = (seq.constraint.mask(masked) if seq.constraint is not None else masked)[:self.vocab]
        # A grammar that allows no token: sampled, NaN probabilities (which had blamed the weights); greedy, token 0
        # at -inf. Told apart on those paths only, at no cost to a step that has a token.
        try:
            token = sample(masked, seq.params, seq.rng)
        except NaNLogits as error:
            nothing = seq.constraint is not None and bool(masked.isneginf().all())
            return -1, seq.ending("error", _NO_TOKEN if nothing else str(error))
        if seq.constraint is not None and float(masked[token]) == float("-inf"):
            return -1, seq.ending("error", _NO_TOKEN)
        lp = token_logprob(logits[:self.vocab], token, seq.params.logprobs) if seq.params.logprobs is not None \
            else None
        return token, seq.step(token, self.tokenizer.decode_bytes([token]), lp)

    def _finish(self, seq: _Sequence, delta: Delta) -> None:
        self.scheduler.release(seq)
        seq.finished = True
        seq.sink(delta)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            seqs, self._inbox = self._inbox, []
        for seq in seqs:
            self.scheduler.add(seq)

    def _end_expired(self) -> None:
        now = time.monotonic()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.cancelled:
                self._finish(seq, seq.ending("cancelled"))
            elif seq.over_time(now):
                self._finish(seq, seq.ending("timeout"))

    def _fail_all(self, message: str) -> None:
        with self._step_lock:
            self._take_inbox()
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                self._finish(seq, seq.ending("error", message))


def _per_row(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling parameter sets for {n} prompts")
    return list(params)


# The signals a program handles in Python to stop or time out work (all of valid_signals() took 90 us a step).
# Not SIGPROF or SIGVTALRM: a sampling profiler's, held to a step's end, would never see inside one.
_STOPS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGALRM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                                  "SIGUSR2") if hasattr(signal, name))


@contextlib.contextmanager
def _interrupts_after():
    """A signal handled in Python (Ctrl-C, an alarm a caller set to time out, herd's SIGTERM exit) that arrives
    during a step the caller drives is handled after it: the step advances every thread's sequences in stages (a
    draw from a seeded generator, the token, the blocks given back), and an exception raised between them had
    changed another thread's seeded reply, leaked a block or left its call waiting for ever. Only the main thread
    runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    held = {signum: signal.signal(signum, lambda signum, frame: caught.append((signum, frame)))
            for signum in _STOPS if callable(signal.getsignal(signum))}
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum, frame in caught:
            held[signum](signum, frame)
