"""A Transformer holding a checkpoint's tensors themselves, not a copy of them."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm import tqdm

from herd.checkpoint.base import Checkpoint, check_shapes
from herd.model.llama import Transformer


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu", *, skip: frozenset[str] = frozenset()) -> Transformer:
    """Construct on the meta device (no allocation), then adopt the loaded tensors with `assign=True`.

    skip: tensors not to read; their parameters stay on the meta device for the caller to replace (a quantization
    scheme that computes on the stored blocks swaps the modules that hold them).
    """
    config = ckpt.config
    check_shapes(config, ckpt.state_dict, str(ckpt.source or "state dict"), "the config")
    with _empty_parameters():
        model = Transformer(config)
    # Reading (and for GGUF dequantizing) the tensors is the slow part of a load; show it on a terminal.
    names = tqdm([n for n in ckpt.state_dict if n not in skip], desc="loading weights", unit="tensor", leave=False,
                 disable=None)
    state = {name: ckpt.state_dict[name].to(device) for name in names}
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = set(model.load_state_dict(state, strict=not skip, assign=True).missing_keys)
    if config.tie_embeddings and "tok_embeddings.weight" in skip:
        missing -= {"output.weight"}
    if missing - skip:
        raise ValueError(f"tensors {sorted(missing - skip)[:3]} were not loaded")
    if config.tie_embeddings and "tok_embeddings.weight" not in skip:
        # assign=True gave each name its own Parameter; the tie must be one Parameter again.
        model.output.weight = model.tok_embeddings.weight
    model.rope_freqs = model.rope_freqs.to(device)
    return model.eval()


@contextlib.contextmanager
def _empty_parameters():
    """Build a module whose parameters are on the meta device and whose buffers are real.

    Each parameter is created uninitialised (its pages never touched) and moved to the meta device at once; the
    initialisers are skipped, since the checkpoint replaces every parameter. (Under torch.device("meta") the small
    computed buffers would go through torch's reference ops, which import its compiler stack: seconds of a load.)
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))

    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(nn.init, name) for name in names}
    nn.Module.register_parameter = on_meta
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, function in saved.items():
            setattr(nn.init, name, function)
