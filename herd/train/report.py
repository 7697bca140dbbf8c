"""`herd report RUN_DIR`: a run's curves (loss with held-out loss and the unigram baseline, learning rate, gradient
norm, throughput and MFU) drawn from run.dir/metrics.jsonl to one PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from herd.atomic import atomic_output


# The numbers every step record holds (a skipped step's too), and those some hold: the report draws them all.
STEP_FIELDS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s")
OPTIONAL_FIELDS = ("eval_loss", "mfu")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics here; give the run.dir of a `herd train` run")
    return read_records(path, STEP_FIELDS, OPTIONAL_FIELDS)


def read_records(path: Path, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSONL file, one a line, each with a number in every field `required` (and in those of
    `optional` that it has). A last line cut short, what a killed run leaves, is left out; any other bad line is a
    ValueError naming the file and the line."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # not JSON, or not UTF-8
            if number == len(lines):  # no newline after it: its write was cut short
                break
            raise ValueError(f"{path}, line {number}: not JSON ({e}); delete or repair that line") from None
        problem = _record_problem(record, required, optional)
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}; delete or repair that line")
        records.append(record)
    return records


def _record_problem(record, required: tuple[str, ...], optional: tuple[str, ...]) -> str | None:
    if not isinstance(record, dict):
        return f"{type(record).__name__}, not a JSON object"
    for name in required + tuple(name for name in optional if record.get(name) is not None):
        if name not in record:
            return f"no {name}"
        if isinstance(record[name], bool) or not isinstance(record[name], (int, float)):
            return f"{name} is {json.dumps(record[name])}, not a number"
    return None


def unigram_loss(shards_dir: str | Path, held_out: float, seed: int) -> float:
    """Cross-entropy (nats/token) of the held-out documents under the training documents' token frequencies
    (add-one smoothed): the loss a model that ignores context reaches, which a language model must beat."""
    from herd.train.data import open_shards, split_documents

    shards = open_shards(shards_dir)
    train, held = split_documents(shards, held_out, seed)
    vocab = int(shards.tokenizer.get("vocab_size") or 0) or None
    counts = np.bincount(np.concatenate([shards[int(i)] for i in train]).astype(np.int64), minlength=vocab or 0)
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + len(counts))
    tokens = np.concatenate([shards[int(i)][1:] for i in held]).astype(np.int64)  # BOS is never predicted
    return float(-log_p[np.minimum(tokens, len(counts) - 1)].mean())


def draw(run_dir: str | Path, png: str | Path, baseline: float | None = None, loss_unit: str = "nats/token") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = plot_path(png)
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
    ax.set_ylabel(f"loss ({loss_unit})")
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
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format=png.suffix[1:], dpi=110)
    plt.close(fig)
    return png


def plot_path(png: str | Path) -> Path:
    """Where a plot goes: `png`, with ".png" added where it has no suffix (as matplotlib does); a directory is refused,
    where matplotlib had written DIR.png beside it."""
    given = Path(png)
    path = given.with_suffix(given.suffix or ".png")
    for candidate in (given, path):
        if candidate.is_dir():
            raise ValueError(f"{candidate} is a directory; give the plot a file name, such as "
                             f"{candidate / 'report.png'}")
    return path
