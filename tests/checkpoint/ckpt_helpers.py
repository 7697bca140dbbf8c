"""Tiny random Llama checkpoints, written by transformers itself so our readers meet real files."""
from __future__ import annotations

import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_model(*, tied: bool = False, rope: dict | None = LLAMA3_ROPE, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(TINY | overrides), tie_word_embeddings=tied, rope_scaling=rope)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        # transformers initialises norms to ones; random norms make a wrong mapping visible.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model
