"""The measured gain of Llama 3's post-training recipe on a task whose truth is known without a judge.

Seeded arithmetic word problems (a held-out split never sampled from) are answered greedily by the default model
before post-training, after SFT on its own rejection-sampled correct answers (LoRA), and after DPO on (correct,
incorrect) pairs of its own samples. Success = the last number in the reply equals the answer, within the same
reply budget at every stage.

    .venv/bin/python bench/posttrain_gains.py --out out/gains --png docs/posttrain-gains.png
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import herd
from herd.posttrain.rejection import SampleConfig, verifier_scorer
from herd.posttrain.rounds import run_rounds
from herd.posttrain.verify import answer

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Kim", "Ravi", "Eva", "Juan", "Mia"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "shells"]
SUFFIX = " Answer with just the number."


def problem(rng: random.Random) -> tuple[str, int]:
    name, thing, kind = rng.choice(NAMES), rng.choice(THINGS), rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(10, 40)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"A box holds {a} {thing}. How many {thing} are in {b} boxes?", a * b


def splits(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out problems (no question text in both)."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_eval:
        question, value = problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"messages": [{"role": "user", "content": question + SUFFIX}], "answer": value})
    return rows[:n_train], rows[n_train:]


def success_rate(model: str, rows: list[dict], max_tokens: int) -> dict:
    llm = herd.load(model, quantize="int8")
    prompts = [llm.chat_format.encode_dialog(r["messages"]) for r in rows]
    done = llm.generate(prompts, max_tokens=max_tokens, temperature=0)
    correct = [answer(r, c.text) for r, c in zip(rows, done)]
    return {"accuracy": sum(correct) / len(rows), "correct": int(sum(correct)), "n": len(rows),
            "mean_reply_tokens": sum(len(c.tokens) for c in done) / len(done),
            "examples": [c.text for c in done[:3]]}


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [r["stage"] for r in results]
    values = [100 * r["accuracy"] for r in results]
    bars = ax.bar(names, values, color=["#999999", "#4c72b0", "#dd8452", "#55a868"][:len(names)])
    for bar, r in zip(bars, results):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, f"{r['correct']}/{r['n']}", ha="center")
    ax.set_ylabel("held-out success rate (%)")
    ax.set_ylim(0, max(values + [10]) * 1.25)
    ax.set_title("SmolLM2-135M-Instruct on arithmetic word problems")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="out/gains")
    p.add_argument("--png", default="docs/posttrain-gains.png")
    p.add_argument("--train-prompts", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = splits(args.seed, args.train_prompts, args.eval_prompts)
    started = time.perf_counter()
    results: list[dict] = []

    def measure(stage: str, model: str) -> None:
        result = {"stage": stage, "model": model, **success_rate(model, held_out, args.max_tokens),
                  "minutes": (time.perf_counter() - started) / 60}
        results.append(result)
        print(json.dumps(result), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    measure("before", args.model)
    lora = ["--lora.rank=16", "--lora.alpha=32", "--training.warmup_steps=2", "--checkpoint.export_format=hf"]
    run_rounds(args.model, train, verifier_scorer(answer), out, rounds=1,
               sample=SampleConfig(k=args.k, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                                   batch_size=64, seed=args.seed, min_score=1.0),
               sft_overrides=[*lora, "--training.lr=5e-4", "--training.batch_size=1", "--training.seq_len=256",
                              "--finetune.epochs=3"],
               dpo_overrides=[*lora, "--training.lr=2e-4", "--training.batch_size=4", "--training.seq_len=256",
                              "--finetune.epochs=2", "--dpo.beta=0.1"],
               on_stage=lambda stage, model: measure(stage.split(": ")[1], model))
    plot(results, Path(args.png))
    print(f"wrote {args.png} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
