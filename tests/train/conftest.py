"""Tiny byte-level token shards of real English text (Debian's fortunes) and tiny model configs for training tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from herd.data.config import ShardConfig
from herd.data.shards import ByteTokenizer, ShardWriter, encode_document
from herd.train.config import TrainConfig, load_config

FORTUNES = Path("/usr/share/games/fortunes")


def fortunes(limit: int) -> list[str]:
    texts = []
    for name in ("fortunes", "literature", "science", "wisdom", "people", "work"):
        texts += [t.strip() for t in (FORTUNES / name).read_text(errors="replace").split("\n%\n") if t.strip()]
    return texts[:limit]


def write_shards(out: Path, texts: list[str], max_tokens_per_shard: int = 20_000) -> Path:
    cfg = ShardConfig(tokenizer="herd.data.shards:ByteTokenizer", max_tokens_per_shard=max_tokens_per_shard)
    writer = ShardWriter(out, cfg, ByteTokenizer())
    out.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        writer.add(f"doc-{i}", encode_document(ByteTokenizer(), text, cfg))
    writer.close()
    return out


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory) -> Path:
    import numpy as np

    out = tmp_path_factory.mktemp("shards")
    writer_texts = fortunes(600)
    write_shards(out, writer_texts)
    assert np.asarray(writer_texts).size  # real text was found
    return out


def tiny_config(shards: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    """A 2-layer, 64-wide model on 64-token sequences: steps take milliseconds."""
    base = ["--data.shards", str(shards), "--run.dir", str(run_dir), "--model.dim", "64", "--model.n_layers", "2",
            "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.multiple_of", "32",
            "--training.seq_len", "64", "--training.batch_size", "4", "--training.steps", "6",
            "--training.warmup_steps", "2", "--training.lr", "3e-3", "--checkpoint.interval", "3",
            "--run.progress", "false", "--run.peak_flops", "1e11", "--data.held_out", "0.05"]
    return load_config(TrainConfig, None, base + list(overrides))
