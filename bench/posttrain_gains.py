"""The measured gain of Llama 3's post-training recipe on a task whose truth is known without a judge.

Seeded problems are split into training prompts and held-out problems (no question in both). The default model
answers every held-out problem greedily before post-training; then one round of the recipe runs
(herd.posttrain.rounds): K samples per training prompt through the batched engine, scored by a verifier (by
default `only_answer`: the reply's only number is the answer, as the prompt asks), SFT (LoRA) on each prompt's
best reply, then DPO (LoRA) on (correct, incorrect) pairs of replies sampled from the SFT model; the held-out
problems are answered again after each stage, with the same reply budget and verifier. Reported: success with a 95%
Wilson interval, the base model's sampled pass@1 and pass@K on the training prompts, and an exact McNemar test of
each stage against the one before it on the same problems.

The default task asks which of two numbers (10..999) is larger: a rule that carries over to problems never seen,
which DPO's pairs (the right number against the wrong one, or against a reply that is not just the number) teach.
"times" asks for products, whose facts do not carry over from one problem to another (see the README).

    .venv/bin/python bench/posttrain_gains.py --threads 2 --out out/gains --png docs/posttrain-gains.png
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

import herd
from herd.posttrain.rejection import SampleConfig, verifier_scorer
from herd.posttrain.rounds import run_rounds
from herd.posttrain.verify import BUILTIN, NEEDS

SUFFIX = " Answer with just the number."


# A task draws (question, answer, key); problems with one key (e.g. 3 x 7 and 7 x 3) never fall in both splits.
# Probed on the default model (32 problems, 12-token replies, 8 samples at temperature 1, last-number check): "times"
# within 2..9 was greedy 50%, sampled pass@1 18%, pass@8 66%; two-digit addition 12% / 2% / 16%; next-in-sequence
# 0%; "larger" (48 problems, temperature 0.8) greedy 19%, pass@1 22%, pass@8 88%.
def _times(rng: random.Random) -> tuple[str, int, tuple]:
    a, b = rng.randint(2, 40), rng.randint(2, 9)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return f"What is {a} times {b}?", a * b, tuple(sorted((a, b)))


def _add(rng: random.Random) -> tuple[str, int, tuple]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", a + b, tuple(sorted((a, b)))


def _larger(rng: random.Random) -> tuple[str, int, tuple]:
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which is larger, {a} or {b}?", max(a, b), tuple(sorted((a, b)))


TASKS: dict[str, Callable[[random.Random], tuple[str, int, tuple]]] = {"times": _times, "add": _add,
                                                                       "larger": _larger}


def splits(task: str, seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Disjoint training and held-out problems (no problem key in both)."""
    rng, seen, rows = random.Random(seed), set(), []
    for _ in range(100 * (n_train + n_eval)):
        question, value, key = TASKS[task](rng)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": [{"role": "user", "content": question + SUFFIX}], "answer": value})
        if len(rows) == n_train + n_eval:
            return rows[:n_train], rows[n_train:]
    raise ValueError(f"task {task!r} has fewer than {n_train + n_eval} distinct problems")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def mcnemar(before: list[bool], after: list[bool]) -> dict:
    """Problems fixed and broken between two stages, and the exact two-sided McNemar p-value."""
    fixed = sum(not b and a for b, a in zip(before, after))
    broken = sum(b and not a for b, a in zip(before, after))
    n, low = fixed + broken, min(fixed, broken)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n) if n else 1.0
    return {"fixed": fixed, "broken": broken, "p_value": p}


def success(model: str, rows: list[dict], max_tokens: int, verifier: Callable[[dict, str], float]) -> dict:
    llm = herd.load(model, quantize="int8")
    prompts = [llm.chat_format.encode_dialog(r["messages"]) for r in rows]
    done = llm.generate(prompts, max_tokens=max_tokens, temperature=0)
    correct = [bool(verifier(r, c.text)) for r, c in zip(rows, done)]
    k = sum(correct)
    low, high = wilson(k, len(rows))
    return {"accuracy": k / len(rows), "ci95": [low, high], "correct": k, "n": len(rows), "per_problem": correct,
            "examples": [c.text for c in done[:3]]}


def sampled_pass_rates(samples_path: Path) -> dict:
    """The base model's pass@1 (mean over all samples) and pass@K (a prompt with any correct sample)."""
    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    scores = [r["scores"] for r in rows]
    k = len(scores[0])
    return {"k": k, "pass_at_1": sum(map(sum, scores)) / (k * len(scores)),
            "pass_at_k": sum(max(s) > 0 for s in scores) / len(scores), "prompts": len(scores)}


def plot(results: list[dict], title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = [r["stage"] for r in results]
    values = [100 * r["accuracy"] for r in results]
    errors = [[100 * (r["accuracy"] - r["ci95"][0]) for r in results],
              [100 * (r["ci95"][1] - r["accuracy"]) for r in results]]
    bars = ax.bar(names, values, yerr=errors, capsize=6, color=["#999999", "#4c72b0", "#dd8452"][:len(names)])
    for bar, r in zip(bars, results):
        ax.text(bar.get_x() + bar.get_width() / 2, 1, f"{r['correct']}/{r['n']}", ha="center", color="white")
    ax.set_ylabel("held-out success, greedy (%)")
    ax.set_ylim(0, min(100, max(100 * r["ci95"][1] for r in results) * 1.2))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--task", choices=sorted(TASKS), default="larger")
    p.add_argument("--out", default="out/gains")
    p.add_argument("--png", default="docs/posttrain-gains.png")
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--verifier", choices=[v for v, field in NEEDS.items() if field == "answer"],
                   default="only_answer",
                   help="answer: the reply's last number is right; only_answer: it is the reply's only number")
    p.add_argument("--threads", type=int, default=2, help="1 is faster on a machine already busy with other work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--dpo-epochs", type=int, default=3)
    p.add_argument("--pairs-per-prompt", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = splits(args.task, args.seed, args.train_prompts, args.eval_prompts)
    verifier = BUILTIN[args.verifier]
    started = time.perf_counter()
    results: list[dict] = []
    report: dict = {"task": args.task, "args": vars(args), "stages": results}

    def measure(stage: str, model: str) -> None:
        result = {"stage": stage, "model": model, **success(model, held_out, args.max_tokens, verifier),
                  "minutes": round((time.perf_counter() - started) / 60, 1)}
        if results:
            result["vs_previous"] = mcnemar(results[-1]["per_problem"], result["per_problem"])
        # Not at "before", measured ahead of run_rounds: a reused --out still holds the last run's samples then.
        if results and "sampling" not in report:
            report["sampling"] = sampled_pass_rates(out / "round-1" / "samples.jsonl")
            print(json.dumps(report["sampling"]), flush=True)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "per_problem"}), flush=True)
        (out / "results.json").write_text(json.dumps(report, indent=1))

    measure("before", args.model)
    lora = ["--lora.rank=16", "--lora.alpha=32", "--training.warmup_steps=2", "--checkpoint.export_format=hf",
            "--run.progress=false"]
    run_rounds(args.model, train, verifier_scorer(verifier), out, rounds=1,
               sample=SampleConfig(k=args.k, temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens,
                                   batch_size=64, seed=args.seed, min_score=1.0),
               sft_overrides=[*lora, "--training.lr=1e-3", "--training.batch_size=2", "--training.seq_len=256",
                              "--finetune.epochs=2"],
               dpo_overrides=[*lora, f"--training.lr={args.dpo_lr}", "--training.batch_size=4",
                              "--training.seq_len=256", f"--finetune.epochs={args.dpo_epochs}", "--dpo.beta=0.1"],
               pairs_per_prompt=args.pairs_per_prompt,
               on_stage=lambda stage, model: measure(stage.split(": ")[1], model))
    sampling = report["sampling"]
    plot(results, f"SmolLM2-135M-Instruct, '{args.task}' problems: {args.eval_prompts} held out, "
                  f"{args.train_prompts} x {sampling['k']} samples", Path(args.png))
    for r in results:
        row = f"| {r['stage']} | {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}% | " \
              f"{100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f}% |"
        if "vs_previous" in r:
            v = r["vs_previous"]
            row += f" +{v['fixed']} / -{v['broken']}, p = {v['p_value']:.2g} |"
        print(row)
    print(f"wrote {args.png} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
