"""Ranked replies in a preference batch: block r of the rows holds every example's r-th best reply."""
from __future__ import annotations

import itertools

import torch


def ranked(values: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Per-row values [ranks * n] as one [n] tensor per rank, best first."""
    return list(values.view(-1, n).unbind(0))


def pairs(n_ranks: int) -> list[tuple[int, int]]:
    """Every (better, worse) pair of ranks: one for chosen > rejected, three for edited > chosen > rejected."""
    return list(itertools.combinations(range(n_ranks), 2))
