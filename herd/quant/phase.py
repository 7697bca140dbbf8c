"""Which rows of a forward are prompt tokens: told by whoever runs the model (the generation engine), read by the
quantized layers.

Quantized layers compute a prompt token one way (as well as float activations: two int8 levels with VNNI, else
float activations) and a generated token another (int8 activations, fast), and the fused decode block
(`herd.quant.decode`) takes a step only when all its tokens are generated ones. If the way depended on how many
tokens a forward holds, a prompt's numbers would depend on how it was chunked: after a prefix-cache hit only the
last few prompt tokens are computed. So the engine says which rows are prompt tokens and which are generated
tokens; the model itself stays unaware. Without a `prompt_rows` block the layers decide by the number of tokens
alone.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_ROWS: ContextVar[tuple[tuple[torch.Tensor, int], ...]] = ContextVar("herd_prompt_rows", default=())


@contextmanager
def prompt_rows(*masks: torch.Tensor) -> Iterator[None]:
    """Within the block, a layer whose input has as many rows as one of the boolean `masks` takes its True rows
    as prompt tokens. Pass one mask per distinct row count the forward has (all its tokens; the rows whose
    logits are wanted, which the output layer sees)."""
    # Each mask with its count of generated rows, counted once here rather than in each of a forward's layers.
    token = _ROWS.set(tuple((m, m.numel() - int(m.sum())) for m in (m.reshape(-1).bool() for m in masks)))
    try:
        yield
    finally:
        _ROWS.reset(token)


def prompt_mask(rows: int) -> tuple[torch.Tensor, int] | None:
    """The prompt-row mask for an input of `rows` rows and how many of them are generated, or None where nobody
    said."""
    return next((marked for marked in _ROWS.get() if marked[0].numel() == rows), None)
