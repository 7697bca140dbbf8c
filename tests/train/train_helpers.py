"""Helpers for the training tests: tiny byte-level token shards of real English text (Debian's fortunes) and tiny model configs for training tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from herd.data.config import ShardConfig
from herd.data.shards import ByteTokenizer, ShardWriter, encode_document
from herd.train.config import TrainConfig, load_config

FORTUNES = Path("/usr/share/games/fortunes")
ROOT = Path(__file__).resolve().parents[2]


def fortunes(limit: int) -> list[str]:
    texts = []
    for name in ("fortunes", "literature", "science", "wisdom", "people", "work"):
        texts += [t.strip() for t in (FORTUNES / name).read_text(errors="replace").split("\n%\n") if t.strip()]
    return texts[:limit]


def write_shards(out: Path, texts: list[str], tokenizer=None, spec: str = "herd.data.shards:ByteTokenizer",
                 max_tokens_per_shard: int = 20_000) -> Path:
    cfg = ShardConfig(tokenizer=spec, max_tokens_per_shard=max_tokens_per_shard)
    tokenizer = tokenizer or ByteTokenizer()
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, cfg, tokenizer)
    for i, text in enumerate(texts):
        writer.add(f"doc-{i}", encode_document(tokenizer, text, cfg))
    writer.close()
    return out


TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.multiple_of", "32", "--training.seq_len", "64", "--training.batch_size", "4",
        "--training.steps", "6", "--training.warmup_steps", "2", "--training.lr", "3e-3",
        "--checkpoint.interval", "2", "--run.progress", "false", "--run.peak_flops", "1e11",
        "--data.held_out", "0.05"]


def tiny_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    """A 2-layer, 64-wide model on 64-token sequences: steps take milliseconds."""
    return ["--data.shards", str(shards), "--run.dir", str(run_dir), *TINY, *overrides]


def tiny_config(shards: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, tiny_args(shards, run_dir, *overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "herd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)
