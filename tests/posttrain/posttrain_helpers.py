"""Helpers for the post-training tests (a module name no other test directory uses)."""
from __future__ import annotations

import json

import torch

from herd.model import ModelConfig, Transformer


# Sums of small numbers: an SFT set whose answers a tiny model can learn in a few steps, and pairs from it.
SFT = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
       for a in range(4) for b in range(3)]
PAIRS = [{"prompt": r["messages"][:1], "chosen": r["messages"][1], "rejected": "no idea"} for r in SFT]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model(vocab_size: int = 128256, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(**{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab_size,
                            "ffn_hidden_dim": 64, "max_seq_len": 256, **overrides})
    return Transformer(config)


def ends_turns(model: Transformer, stop_id: int, weight: float = 0.7) -> Transformer:
    """`model` made to end about half its replies within a few tokens with `stop_id` (a random one almost never
    ends one, and a reply cut off at max_tokens is never kept): every token's embedding gets a large first
    coordinate, which only the stop token's output row reads."""
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 8.0
        model.output.weight[:, 0] = 0.0
        model.output.weight[stop_id, 0] = weight
    return model


def starts_even(row: dict, reply: str) -> float:
    """A toy verifier whose truth needs no judge: 1 if the reply's first character has an even code point."""
    return float(bool(reply) and ord(reply[0]) % 2 == 0)
