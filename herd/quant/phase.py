"""Which rows of a forward are prompt tokens, and how many rows each one's prompt computes: told by whoever runs the
model (the generation engine), read by the quantized layers.

Quantized layers compute a prompt token one way (as well as float activations: two int8 levels with VNNI, else
float activations) and a generated token another (int8 activations, fast), and the fused decode block
(`herd.quant.decode`) takes a step only when all its tokens are generated ones. Without VNNI a prompt's float
products run the kernel's loop for a short prompt and a BLAS GEMM over the expanded weight for a long one, and the
two round differently. If either choice depended on how many tokens a forward holds, a prompt's numbers would
depend on how it was chunked, what it was batched with and how much of it the prefix cache held (a busy engine
puts many prompts' chunks in one forward; after a cache hit a few tokens are left to compute). So the engine gives
each row the number of rows its sequence's whole prompt sends through the layer (0 for a generated token), the
same for every row of that prompt however it is computed; the model itself stays unaware. Such layers say how
short a prompt computes apart (`short_prompt_tokens`), and the engine keeps prompts that short out of the prefix
cache, where their blocks would stand for a longer prompt's. Without a `prompt_rows` block the layers decide by
the number of tokens alone, as if the forward were one prompt.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch


class Marked(NamedTuple):
    sizes: torch.Tensor  # per row: 0 for a generated token, else the row count of its sequence's prompt
    generated: int  # how many rows are generated tokens
    smallest: int  # the smallest and largest prompt size among the rows (0 where none is a prompt's)
    largest: int

    @classmethod
    def of(cls, sizes: torch.Tensor) -> Marked:
        # Counted once here rather than in each of a forward's layers.
        prompt = sizes[sizes > 0]
        return cls(sizes, sizes.numel() - prompt.numel(), int(prompt.min()) if prompt.numel() else 0,
                   int(prompt.max()) if prompt.numel() else 0)

    @property
    def prompt(self) -> torch.Tensor:
        return self.sizes > 0


_ROWS: ContextVar[tuple[Marked, ...]] = ContextVar("herd_prompt_rows", default=())


@contextmanager
def prompt_rows(*sizes: torch.Tensor) -> Iterator[None]:
    """Within the block, a layer whose input has as many rows as one of `sizes` reads its rows' kinds there: 0 a
    generated token, n > 0 a token of a prompt that puts n rows through the layer in all. Pass one tensor per
    distinct row count the forward has (all its tokens; the rows whose logits are wanted, which the output layer
    sees)."""
    token = _ROWS.set(tuple(Marked.of(s.reshape(-1)) for s in sizes))
    try:
        yield
    finally:
        _ROWS.reset(token)


def marked_rows(rows: int) -> Marked | None:
    """How the rows of an input of `rows` rows were marked, or None where nobody said."""
    return next((marked for marked in _ROWS.get() if marked.sizes.numel() == rows), None)
