"""Rejection sampling: K replies per prompt from the generation engine, each scored, the best kept.

Llama 3 drew 10–30 replies per prompt from its latest model and kept the reward model's favourite as SFT data.
Prompt rows are `{"messages": [...]}` with whatever the scorer reads (e.g. "answer", "tests"); every sample goes
through the LLM's engine in batches of `batch_size` sequences, seeded per prompt. Kept rows are SFT rows
(`messages` ending in the best reply, with its `score`, and the prompt's `tools`); a prompt whose best and worst
replies differ in score also gives a preference row. A reply cut off at max_tokens (or ended otherwise than by
the model) is never a kept or chosen one, nor is a reply its verifier scored 0 (`verifier_scorer`): trained on,
the first would teach the model to end mid-reply, the second a known-wrong answer.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from herd.atomic import atomic_output
from herd.bounds import AT_LEAST_ONE, FINITE, NONZERO_FRACTION, NON_NEGATIVE, require
from herd.generate.sampling import SamplingParams
from herd.posttrain.data import DialogEncoder, _messages
from herd.rows import DataError, read_rows

Scorer = Callable[[Sequence[dict], Sequence[str]], list[float]]   # (prompt rows, replies) -> scores


@dataclass
class SampleConfig:
    k: int = 16
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    batch_size: int = 32
    seed: int = 0                     # with the prompt, it fixes the prompt's K replies (`prompt_seed`)
    min_score: float | None = None    # keep a prompt's best only if it scores at least this

    def __post_init__(self):
        require(self, AT_LEAST_ONE, "k", "max_tokens", "batch_size")
        require(self, NON_NEGATIVE, "temperature", "seed")
        require(self, NONZERO_FRACTION, "top_p")
        require(self, FINITE, "min_score")


@dataclass
class Sampled:
    row: dict
    replies: list[str]
    scores: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)   # the engine's, one a reply; none given: all "stop"
    # The replies as assistant messages, as the model wrote them: a tool call (text after <|python_tag|>, ended by
    # <|eom_id|>) is a call, which the text alone would teach as plain text ended by <|eot_id|>. None: the texts.
    messages: list[dict] | None = None
    verified: bool = False   # scored by a verifier, whose 0 marks a wrong reply

    def keepable(self, i: int) -> bool:
        """Whether reply i may be kept as a prompt's best or chosen reply."""
        ended = not self.finish_reasons or self.finish_reasons[i] == "stop"
        return ended and self.scored(i) and not (self.verified and self.scores[i] <= 0)

    def scored(self, i: int) -> bool:
        """Whether reply i has a score to rank by: a NaN (a scorer's failure) ranks nowhere, first or last."""
        return not math.isnan(self.scores[i])


# Turns a reply follows: the user's, or a tool's result (Llama 3's ipython role, OpenAI's tool role).
REPLY_AFTER = ("user", "ipython", "tool")


def prompt_rows(path: str | Path, needs: str | None = None,
                check: Callable[[dict], None] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) of prompt rows, each ending where the model replies; `needs`: a field every row must have
    (the one its scorer reads); `check`: raises ValueError for a row its scorer cannot score (e.g. an "answer" that
    is no number), so that a bad row stops the run before sampling, not after it."""
    for where, row in read_rows(path):
        messages = _messages(row, "messages", where)
        last = messages[-1].get("role") if messages else None
        if last not in REPLY_AFTER:
            raise DataError(f"{where}: the prompt must end with a user turn (it ends with {last!r}); "
                            "end it where the model should reply")
        if needs is not None and needs not in row:
            raise DataError(f'{where}: no "{needs}" field, which the scorer reads; add it to every row')
        if check is not None:
            try:
                check(row)
            except ValueError as error:
                raise DataError(f"{where}: {error}") from None
        yield where, row


def read_prompts(path: str | Path, needs: str | None = None, check: Callable[[dict], None] | None = None
                 ) -> list[dict]:
    return [row for _, row in prompt_rows(path, needs, check)]


def prompt_seed(seed: int, prompt: Sequence[int], repeat: int = 0) -> int:
    """The sampling seed of a prompt's replies: from the run's seed and the prompt's ids (and which repeat of the
    same prompt it is, so that repeats get replies of their own), not from where the prompt is in the file."""
    digest = hashlib.sha256(json.dumps([seed, repeat, list(prompt)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1   # 63 bits: the engine adds a reply's index to it


def generate_samples(llm, rows: Sequence[dict], config: SampleConfig) -> list[Sampled]:
    """K replies for every row, generated in batches of whole prompts' samples; a prompt's replies are the same
    whatever the other prompts, their order and the batch size (`prompt_seed`)."""
    encoder = DialogEncoder(llm.chat_format)
    prompts = [encoder.prompt(r["messages"], r.get("tools"), f"prompt {i}") for i, r in enumerate(rows)]
    repeats: Counter[tuple[int, ...]] = Counter()
    params = []
    for ids in prompts:
        params.append(SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
                                     seed=prompt_seed(config.seed, ids, repeats[tuple(ids)])))
        repeats[tuple(ids)] += 1
    out = [Sampled(r, [], messages=[]) for r in rows]
    per_batch = max(config.batch_size // config.k, 1)   # prompts
    with tqdm(total=len(rows) * config.k, desc="sampling", unit="reply") as bar:
        for start in range(0, len(rows), per_batch):
            done = llm.generator.generate(prompts[start:start + per_batch], params[start:start + per_batch],
                                          n=config.k)
            for i, completion in enumerate(done):
                sampled = out[start + i // config.k]
                sampled.replies.append(completion.text)
                sampled.finish_reasons.append(completion.finish_reason)
                sampled.messages.append(_message(llm.reply_message(
                    completion.text, completion.tokens, completion.finish_reason, completion.stop_token)))
            bar.update(len(done))
    return out


@dataclass(frozen=True)
class VerifierScorer:
    """A verifier's scores: `score` marks the samples `verified`, so a reply scored 0 is never kept or chosen."""
    verifier: Callable[[dict, str], float]

    def __call__(self, rows: Sequence[dict], replies: Sequence[str]) -> list[float]:
        return [float(self.verifier(r, t)) for r, t in zip(rows, replies)]


def verifier_scorer(verifier) -> Scorer:
    return VerifierScorer(verifier)


class RewardScorer:
    """Scores from a `herd finetune` reward model: the prompt and reply in its own chat format, one score each. A
    reply is a message (as the model wrote it: a tool call as its call, ended by <|eom_id|>) or text, read as the
    chat format reads a reply (a call after <|python_tag|> spelled out as text had been scored as plain text)."""

    def __init__(self, path: str | Path, chunk: int = 16):
        from herd.posttrain.finetune import load_reward_model

        self.model, self.llm = load_reward_model(path)
        self.encoder, self.chunk = DialogEncoder(self.llm.chat_format), chunk
        self.pad = self.llm.tokenizer.pad_id if self.llm.tokenizer.pad_id is not None else 0

    @torch.no_grad()
    def __call__(self, rows: Sequence[dict], replies: Sequence[str | dict]) -> list[float]:
        sequences = []
        for row, reply in zip(rows, replies):
            message = reply if isinstance(reply, dict) else self.llm.chat_format.decode_assistant(reply)
            prompt = self.encoder.prompt(row["messages"], row.get("tools"))
            written = self.encoder.reply(prompt, row["messages"], message, row.get("tools"))
            sequences.append((prompt + written)[:self.model.body.config.max_seq_len])
        scores: list[float] = []
        for start in range(0, len(sequences), self.chunk):
            part = sequences[start:start + self.chunk]
            tokens = torch.full((len(part), max(map(len, part))), self.pad, dtype=torch.long)
            for i, ids in enumerate(part):
                tokens[i, :len(ids)] = torch.tensor(ids)
            lengths = torch.tensor([len(ids) for ids in part])
            scores += self.model(tokens.to(self.llm.device), lengths.to(self.llm.device)).tolist()
        return scores


def reward_scorer(path: str | Path, chunk: int = 16) -> Scorer:
    return RewardScorer(path, chunk)


def score(samples: Sequence[Sampled], scorer: Scorer) -> None:
    for s in tqdm(samples, desc="scoring", unit="prompt"):
        # A reward model reads the replies as the model wrote them; a verifier (or any scorer) their text.
        replies = s.messages if isinstance(scorer, RewardScorer) and s.messages else s.replies
        s.scores = list(scorer([s.row] * len(s.replies), replies))
        s.verified = isinstance(scorer, VerifierScorer)


def _with_tools(row: dict, out: dict) -> dict:
    """`out` with the prompt row's tool definitions, which the replies were sampled with in the prompt."""
    return {**out, "tools": row["tools"]} if row.get("tools") is not None else out


def _message(reply: dict) -> dict:
    """A reply message as a row carries it: its tool calls and why it ended only where it makes a call."""
    if not reply["tool_calls"]:
        return {"role": "assistant", "content": reply["content"]}
    return {"role": "assistant", "content": reply["content"], "tool_calls": reply["tool_calls"],
            "stop_reason": reply["stop_reason"]}


def _reply(s: Sampled, i: int) -> dict:
    return s.messages[i] if s.messages else {"role": "assistant", "content": s.replies[i]}


def best_rows(samples: Iterable[Sampled], min_score: float | None = None) -> list[dict]:
    """One SFT row per prompt: its best-scored keepable reply (the first of equals), if it reaches `min_score`."""
    kept = []
    for s in samples:
        keepable = [i for i in range(len(s.replies)) if s.keepable(i)]
        if not keepable:
            continue
        best = max(keepable, key=lambda i: s.scores[i])
        if min_score is None or s.scores[best] >= min_score:
            row = {"messages": [*s.row["messages"], _reply(s, best)], "score": s.scores[best]}
            kept.append(_with_tools(s.row, row))
    return kept


def preference_rows(samples: Iterable[Sampled], per_prompt: int = 1) -> list[dict]:
    """Up to `per_prompt` preference rows per prompt from its distinct replies: the best keepable one against the
    worst of all, the second best against the second worst, and so on while the chosen reply scores higher (first
    of equals first)."""
    rows = []
    for s in samples:
        first = {}
        for i, reply in enumerate(s.replies):
            first.setdefault(reply, i)
        distinct = [i for i in first.values() if s.scored(i)]
        top = sorted((i for i in distinct if s.keepable(i)), key=lambda i: (-s.scores[i], i))
        bottom = sorted(distinct, key=lambda i: (s.scores[i], i))
        for best, worst in list(zip(top, bottom))[:min(per_prompt, len(distinct) // 2)]:
            if s.scores[best] <= s.scores[worst]:
                break
            rows.append(_with_tools(s.row, {
                "prompt": s.row["messages"], "chosen": _reply(s, best), "rejected": _reply(s, worst),
                "scores": [s.scores[best], s.scores[worst]]}))
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write rows atomically (an interrupted run leaves no half-written file); returns how many."""
    n = 0
    with atomic_output(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
