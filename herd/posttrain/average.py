"""Averaging checkpoints of one architecture (runs on different data or hyper-parameters), as Llama 3 did."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from herd.atomic import save_safetensors
from herd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from herd.checkpoint.convert import REWARD_HEAD
from herd.model.config import ModelConfig


def average_checkpoints(paths: Sequence[str | Path], out: str | Path, fmt: str = "meta",
                        weights: Sequence[float] | None = None) -> Path:
    """Write the (weighted) mean of the checkpoints' weights to `out`, with the first one's tokenizer."""
    if len(paths) < 2:
        raise ValueError("averaging needs at least two checkpoints")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"give one positive weight per checkpoint (got {weights} for {len(paths)})")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        if _architecture(ckpt.config) != _architecture(first.config):
            raise CheckpointError(f"{path}: its shape differs from {paths[0]}'s; only one architecture averages")
    # Reward models (Llama 3 averaged those too) carry their head beside the body: all or none of them.
    heads = [Path(p) / REWARD_HEAD for p in paths]
    if any(h.is_file() for h in heads) and not all(h.is_file() for h in heads):
        raise CheckpointError(f"{next(h.parent for h in heads if not h.is_file())}: no {REWARD_HEAD}, where another "
                              "checkpoint is a reward model; average reward models with reward models only")
    total = sum(weights)
    state = {}
    for name in first.state_dict.keys():
        state[name] = sum(w / total * c.state_dict[name].float() for w, c in zip(weights, ckpts))
    written = save_checkpoint((first.config, state, first.tokenizer), out, fmt)
    if heads[0].is_file():
        head = sum(w / total * load_file(str(h))["weight"].float() for w, h in zip(weights, heads))
        save_safetensors({"weight": head.contiguous()}, written / REWARD_HEAD)
    return written


def _architecture(config: ModelConfig) -> ModelConfig:
    """The configuration as computed: Meta's files derive the SwiGLU width that HF and GGUF state outright, so a model
    and its own export in another format had compared unequal."""
    return config.replace(ffn_hidden_dim=config.hidden_dim, multiple_of=ModelConfig.multiple_of,
                          ffn_dim_multiplier=None, n_kv_heads=config.kv_heads)
