"""A Llama Guard built on a small model: a classification head over the model's hidden states as it reads the
Llama Guard prompt, which answers the way Llama Guard does ("safe", or "unsafe\\nS<k>").

Meta's guard weights cannot be fetched here, so the guard is trained on the default model (SmolLM2-135M) with
the model frozen: the head reads hidden states of the conversation as the model reads it inside the Llama Guard prompt
(see GuardFeatures). The prompt's fixed start is run once and its KV cache reused, so a check costs only the
conversation's tokens. This is a head fine-tune of its own,
kept apart from the shared trainer so it can move onto it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from herd.safety.llama_guard import category_lines, judged_turn, llama_guard_content

FORMAT = "herd-guard-head/1"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class GuardFeatures:
    """Hidden-state features of the Llama Guard prompt: the model's first layers read the prompt's fixed start once
    (its KV cache is kept) and then each conversation; the features are, at each of `layers` (counted from 1), the
    last token's state and the mean state over the conversation's tokens. Stopping at the deepest layer read, and
    at the end of the conversation, keeps a check to a few dozen tokens through part of the model: what a shared
    CPU can afford. The prompt's start names the turn judged (User or Agent), so each has its own cached start.

    The default reads the layers 60% and 80% of the way up (18 and 24 of SmolLM2's 30): chosen on SmolLM2 by
    cross-validation over the training sources (five folds, each holding out whole sources) among single layers
    6-30 and pairs and triples of them, where they flagged the most harmful turns at the fewest false positives
    (recall 0.72 at 5.9%, layer 12 alone 0.65 at 10%)."""

    DEPTHS = (0.6, 0.8)  # the default layers, as fractions of the model's depth
    # Windows' features kept (the oldest dropped first): a streamed reply is judged again every few hundred
    # characters, and each check then reads only the windows that are new, not the whole reply again.
    KEEP = 512

    def __init__(self, llm, layers: int | Sequence[int] | None = None, max_chars: int = 1000):
        import copy
        from dataclasses import replace

        from herd.model.llama import KVCache

        self.llm, self.max_chars = llm, max_chars
        model = llm.model
        n = model.config.n_layers
        if layers is None:
            layers = [max(1, round(depth * n)) for depth in self.DEPTHS]
        self.layers = (layers,) if isinstance(layers, int) else tuple(sorted(set(layers)))
        if not self.layers or self.layers[0] < 1 or self.layers[-1] > n:
            raise ValueError(f"guard feature layers {list(self.layers)}: this model has layers 1 to {n}")
        # the same modules, fewer of them: a shallow copy with its own module table leaves the model untouched
        self.model = copy.copy(model)
        self.model._modules = dict(model._modules)
        self.model.layers = torch.nn.ModuleList(list(model.layers)[:self.layers[-1]])
        self.config = replace(model.config, n_layers=self.layers[-1])
        self._starts: dict[str, tuple[list[int], KVCache, int]] = {}  # agent type -> (prefix, its cache, tail)
        self._read: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}  # (agent type, window ids) -> features
        self.prefix, self.prefix_cache, self.tail = self._start("User")

    @torch.inference_mode()
    def _start(self, agent: str):
        """The prompt's fixed start when it judges `agent`'s turn, its KV cache, and the length of its fixed end."""
        from herd.model.llama import KVCache

        if agent not in self._starts:
            a, b = (self._ids([{"role": "user", "content": t}], agent) for t in ("Hello there.", "What time is it?"))
            prefix = a[:_common_prefix(a, b)]
            tail = _common_prefix(a[::-1], b[::-1])  # the closing instruction, the same for every conversation
            cache = KVCache(self.config, 1, len(prefix), device=self.llm.device,
                            dtype=self.model.tok_embeddings.weight.dtype)
            self.model(torch.tensor([prefix], device=self.llm.device), cache=cache, last_only=True)
            self._starts[agent] = (prefix, cache, tail)
        return self._starts[agent]

    def _ids(self, messages, agent_type=None, categories=None, excluded=()) -> list[int]:
        content = llama_guard_content(messages, agent_type, categories, excluded)
        return self.llm.chat_format.encode_dialog([{"role": "user", "content": content}])

    def conversation_ids(self, messages, agent_type=None, categories=None, excluded=()) -> list[int]:
        """The prompt's tokens after the cached start, up to the end of the conversation, each message cut to its
        last `max_chars` (the window the head is trained on)."""
        messages = [{**m, "content": (m.get("content") or "")[-self.max_chars:]} for m in messages]
        return self._conversation_ids(messages, agent_type, categories, excluded)

    def window_ids(self, messages, agent_type=None, categories=None, excluded=()) -> list[list[int]]:
        """conversation_ids for every window of the judged message (the last: the user's turn, or the reply), when
        it is longer than `max_chars`: windows of that size, each overlapping the next by half, the other messages
        cut as conversation_ids cuts them. The head was trained on windows of this size, so a long message is
        judged part by part: text past one window can hide nothing before it. Only the judged message is: the
        windows of earlier ones, each paired with a reply that grows while it streams, would be read anew at
        every check."""
        cut = [{**m, "content": (m.get("content") or "")[-self.max_chars:]} for m in messages]
        variants = [cut]
        for m in messages[-1:]:
            for window in _windows(m.get("content") or "", self.max_chars)[:-1]:  # the last one is cut's
                variants.append([*cut[:-1], {**cut[-1], "content": window}])
        return [self._conversation_ids(v, agent_type, categories, excluded) for v in variants]

    def _conversation_ids(self, messages, agent_type, categories, excluded) -> list[int]:
        ids = self._ids(messages, agent_type, categories, excluded)
        prefix, _, tail = self._start(judged_turn(messages, agent_type))
        if ids[:len(prefix)] != prefix:
            raise ValueError("this prompt does not start as the guard's cached prompt does (custom categories?)")
        return ids[len(prefix):len(ids) - tail] or ids[-1:]

    def __call__(self, messages, agent_type=None, categories=None, excluded=()) -> np.ndarray:
        rows = [self.conversation_ids(messages, agent_type, categories, excluded)]
        return self.batch(rows, judged_turn(messages, agent_type))[0]

    def windows(self, messages, agent_type=None, categories=None, excluded=(), batch: int = 8) -> np.ndarray:
        """Features of every window of the conversation (see window_ids), one row each, the first the same as
        __call__'s."""
        rows = [(judged_turn(messages, agent_type), tuple(r))
                for r in self.window_ids(messages, agent_type, categories, excluded)]
        new = [key for key in dict.fromkeys(rows) if key not in self._read]
        for i in range(0, len(new), batch):
            part = new[i:i + batch]
            self._read.update(zip(part, self.batch([r for _, r in part], part[0][0])))
        out = np.stack([self._read[key] for key in rows])
        while len(self._read) > self.KEEP:
            self._read.pop(next(iter(self._read)))
        return out

    @torch.inference_mode()
    def batch(self, rows: Sequence[Sequence[int]], agent: str = "User") -> np.ndarray:
        """Features for several conversations' token ids (from conversation_ids, judging `agent`'s turn) at once."""
        from herd.model.llama import KVCache

        prefix, prefix_cache, _ = self._start(agent)
        longest = max(len(r) for r in rows)
        cache = KVCache(self.config, len(rows), len(prefix) + longest, device=self.llm.device,
                        dtype=prefix_cache.k[0].dtype)
        for layer in range(self.config.n_layers):
            cache.k[layer][:, :, :len(prefix)] = prefix_cache.k[layer]
            cache.v[layer][:, :, :len(prefix)] = prefix_cache.v[layer]
        cache.length = len(prefix)
        # right padding: causal attention never lets a row's tokens see the padding after them
        tokens = torch.zeros(len(rows), longest, dtype=torch.long, device=self.llm.device)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        states = self._states(tokens, cache)
        feats = [torch.cat([part for h in states for part in (h[i, len(r) - 1], h[i, :len(r)].mean(0))])
                 for i, r in enumerate(rows)]
        return torch.stack(feats).cpu().numpy()

    def _states(self, tokens: torch.Tensor, cache) -> list[torch.Tensor]:
        """The feature layers' outputs as the first layers read `tokens`. The layers are the model's own modules,
        so their hooks stay on for this forward only: the model's other work (generation) passes unobserved."""
        states: dict[int, torch.Tensor] = {}
        hooks = [self.model.layers[layer - 1].register_forward_hook(
            lambda module, args, out, layer=layer: states.__setitem__(layer, out)) for layer in self.layers]
        try:
            self.model(tokens, cache=cache, last_only=True)
        finally:
            for hook in hooks:
                hook.remove()
        return [states[layer].float() for layer in self.layers]


def _windows(text: str, size: int) -> list[str]:
    """Windows of `size` characters covering `text`, each overlapping the next by half; the last is its end."""
    if len(text) <= size:
        return [text]
    step = max(1, size // 2)
    return [text[start:start + size] for start in range(0, len(text) - size, step)] + [text[-size:]]


@dataclass
class GuardHead:
    classes: list[str]  # "safe", then category codes
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (n_classes, n_features)
    intercept: np.ndarray
    info: dict = field(default_factory=dict)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = ((np.atleast_2d(features) - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def verdict_text(self, probs: np.ndarray, allowed: set[str] | None = None, threshold: float = 0.5) -> str:
        """Llama Guard's answer for one row of probabilities: unsafe when the categories together pass
        `threshold`, naming the likeliest category the policy lists."""
        p = dict(zip(self.classes, probs))
        unsafe = {c: v for c, v in p.items() if c != "safe" and (allowed is None or c in allowed)}
        if not unsafe or sum(unsafe.values()) < threshold:
            return "safe"
        return "unsafe\n" + max(unsafe, key=unsafe.get)

    @classmethod
    def fit(cls, features: np.ndarray, labels: Sequence[str], c: float = 0.5, info: dict | None = None,
            seed: int = 0) -> GuardHead:
        from sklearn.linear_model import LogisticRegression

        # Safe and unsafe weigh the same in all, each category an equal share of unsafe's half. Balancing all
        # classes alike left safe one class in fifteen, and the head refused a fifth of ordinary requests.
        counts = Counter(labels)
        categories = len(counts) - ("safe" in counts)
        weights = {label: len(labels) / (2 * n * (1 if label == "safe" else categories)) for label, n in counts.items()}
        mean, scale = features.mean(0), features.std(0) + 1e-6
        lr = LogisticRegression(C=c, max_iter=1000, class_weight=weights, random_state=seed)
        lr.fit((features - mean) / scale, list(labels))
        classes = [str(x) for x in lr.classes_]
        return cls(classes, mean.astype(np.float32), scale.astype(np.float32), lr.coef_.astype(np.float32),
                   lr.intercept_.astype(np.float32), dict(info or {}))

    def save(self, path: str | Path) -> Path:
        from herd.data.classify import write_npz

        header = {"format": FORMAT, "classes": self.classes, "info": self.info}
        return write_npz(path, header, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept)

    @classmethod
    def load(cls, path: str | Path) -> GuardHead:
        from herd.data.classify import read_npz

        header, arrays = read_npz(path, FORMAT, ("mean", "scale", "coef", "intercept"),
                                  "guard head")
        return cls(header["classes"], info=header["info"], **arrays)


class HeadGuardModel:
    """What LlamaGuard needs of a guard: the verdict text for a conversation (here, from a head)."""

    def __init__(self, llm, head: GuardHead, threshold: float = 0.5):
        self.llm, self.head, self.threshold = llm, head, threshold
        self.features = GuardFeatures(llm, layers=head.info.get("layers", 12),
                                      max_chars=head.info.get("max_chars", 1000))

    def verdict(self, messages, agent_type=None, categories=None, excluded=()) -> str:
        if categories is not None:
            raise ValueError("a guard head knows the categories it was trained on; custom categories need a "
                             "generative guard model")
        allowed = {code for code, _ in category_lines(None, excluded)}
        probs = self.head.predict_proba(self.features.windows(messages, agent_type, None, excluded))
        unsafe = [i for i, c in enumerate(self.head.classes) if c != "safe" and c in allowed]
        # the conversation is as unsafe as its least safe window
        return self.head.verdict_text(probs[probs[:, unsafe].sum(1).argmax()], allowed, self.threshold)
