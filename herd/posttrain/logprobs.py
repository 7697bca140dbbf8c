"""What every recipe reads off the model: final hidden states, and logits or log-probabilities at the targets.

The vocabulary projection is applied only where a label is learnt: in a chat dialog most positions are prompt,
and the projection is the widest matrix of a small model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from herd.posttrain.data import IGNORE


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """The modules in eval mode (no dropout) within the block, each back in its own mode after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@contextlib.contextmanager
def _without_output(model: nn.Module):
    # The transformer ends in `output(norm(h))`; with the projection set aside its forward yields norm(h).
    output = model.output
    model.output = nn.Identity()
    try:
        yield output
    finally:
        model.output = output


def final_hidden(model: nn.Module, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The normalised last hidden states [batch, seq, dim]."""
    with _without_output(model):
        return model(tokens, document_ids=document_ids)


def target_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n_targets, vocab] float, the [batch, seq] mask of target positions)."""
    labels = batch["labels"]
    mask = labels != IGNORE
    with _without_output(model) as output:
        hidden = model(batch["tokens"], document_ids=batch.get("document_ids"))
    return output(hidden[mask]).float(), mask


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """The log-probability of every target token [batch, seq], 0 where there is none; with a `temperature`, under
    the distribution sampled at that temperature (PPO's rollouts)."""
    logits, mask = target_logits(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    per_token = -F.cross_entropy(logits, batch["labels"][mask], reduction="none")
    return torch.zeros(mask.shape, dtype=per_token.dtype, device=per_token.device).masked_scatter(mask, per_token)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's targets [batch], the number of targets per row [batch])."""
    return token_logps(model, batch).sum(-1), (batch["labels"] != IGNORE).sum(-1)
