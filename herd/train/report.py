"""`herd report RUN_DIR`: a run's curves (loss with held-out loss and the unigram baseline, learning rate, gradient
norm, throughput and MFU) drawn from run.dir/metrics.jsonl to one PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics here; give the run.dir of a `herd train` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def unigram_loss(shards_dir: str | Path, held_out: float, seed: int) -> float:
    """Cross-entropy (nats/token) of the held-out documents under the training documents' token frequencies
    (add-one smoothed): the loss a model that ignores context reaches, which a language model must beat."""
    from herd.train.data import open_shards, split_documents

    shards = open_shards(shards_dir)
    train, held = split_documents(len(shards), held_out, seed)
    vocab = int(shards.tokenizer.get("vocab_size") or 0) or None
    counts = np.bincount(np.concatenate([shards[int(i)] for i in train]).astype(np.int64), minlength=vocab or 0)
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + len(counts))
    tokens = np.concatenate([shards[int(i)][1:] for i in held]).astype(np.int64)  # BOS is never predicted
    return float(-log_p[np.minimum(tokens, len(counts) - 1)].mean())


def draw(run_dir: str | Path, png: str | Path, baseline: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "skipped" not in r]
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no completed steps yet")
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram baseline ({baseline:.2f})")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    axes[0, 1].plot(steps, [r["lr"] for r in records])
    axes[0, 1].set_ylabel("learning rate")
    axes[1, 0].plot(steps, [r["grad_norm"] for r in records])
    axes[1, 0].set_ylabel("gradient norm (before clipping)")
    axes[1, 0].set_yscale("log")
    ax = axes[1, 1]
    ax.plot(steps, [r["tokens_per_s"] for r in records], label="tokens/s")
    ax.set_ylabel("tokens/s")
    if any("mfu" in r for r in records):
        twin = ax.twinx()
        twin.plot(steps, [100 * r.get("mfu", 0) for r in records], color="tab:orange", alpha=0.6)
        twin.set_ylabel("MFU (%)", color="tab:orange")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).name}: {records[-1]['tokens']:,} tokens, {steps[-1]} steps")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
