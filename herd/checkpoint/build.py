"""A Transformer holding a checkpoint's tensors themselves, not a copy of them."""
from __future__ import annotations

import torch
from tqdm import tqdm

from herd.checkpoint.base import Checkpoint, check_shapes
from herd.model.llama import Transformer, rope_frequencies


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> Transformer:
    """Construct on the meta device (no allocation), then adopt the loaded tensors with `assign=True`."""
    config = ckpt.config
    check_shapes(config, ckpt.state_dict, str(ckpt.source or "state dict"), "the config")
    with torch.device("meta"):
        model = Transformer(config)
    # Reading (and for GGUF dequantizing) the tensors is the slow part of a load; show it on a terminal.
    names = tqdm(ckpt.state_dict, desc="loading weights", unit="tensor", leave=False, disable=None)
    state = {name: ckpt.state_dict[name].to(device) for name in names}
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        # assign=True gave each name its own Parameter; the tie must be one Parameter again.
        model.output.weight = model.tok_embeddings.weight
    # The rotary table is computed, not stored, so the meta-device construction left it empty.
    model.rope_freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    return model.eval()
