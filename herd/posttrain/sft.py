"""Supervised fine-tuning: next-token cross-entropy on the assistant's tokens only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.posttrain.logprobs import target_logits


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch's targets, their number): the trainer divides across accumulation."""
    logits, mask = target_logits(model, batch)
    return F.cross_entropy(logits, batch["labels"][mask], reduction="sum"), mask.sum()
