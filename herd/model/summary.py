"""What a configuration amounts to: shapes, parameter count (on the meta device: nothing allocated), memory."""
from __future__ import annotations

import torch

from herd.model.config import ModelConfig
from herd.model.llama import Transformer


def parameter_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(config)
    # Tied embeddings are one tensor seen twice; parameters() yields it once.
    return sum(p.numel() for p in model.parameters())


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def summarize(config: ModelConfig) -> dict[str, str]:
    n = parameter_count(config)
    kv_per_token = 2 * config.n_layers * config.kv_heads * config.head_dim
    rope = f"theta {config.rope_theta:g}"
    if config.rope_scaling:
        rope += f", llama3 scaling x{config.rope_scaling.factor:g} from {config.rope_scaling.original_max_position}"
    return {
        "parameters": f"{n:,} ({n / 1e9:.2f}B)",
        "layers": str(config.n_layers),
        "dim": str(config.dim),
        "heads (q / kv)": f"{config.n_heads} / {config.kv_heads} (head dim {config.head_dim})",
        "ffn hidden": str(config.hidden_dim),
        "vocab": str(config.vocab_size),
        "context": str(config.max_seq_len),
        "rope": rope,
        "tied embeddings": str(config.tie_embeddings),
        "weights float32": _gib(4 * n),
        "weights bf16": _gib(2 * n),
        "weights int8": _gib(n),
        "kv cache / 1K tokens": f"{_gib(4 * kv_per_token * 1024)} float32, {_gib(2 * kv_per_token * 1024)} bf16",
    }
