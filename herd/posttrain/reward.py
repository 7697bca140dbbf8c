"""The reward model: the transformer's body with a scalar head, trained with the Bradley–Terry loss.

Llama 3 drops Llama 2's margin term; a ranked row (edited > chosen > rejected) contributes each of its three
ordered pairs. The score of a reply is the head applied to the last hidden state of prompt + reply.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from herd.posttrain.logprobs import final_hidden
from herd.posttrain.lora import LoRAConfig
from herd.posttrain.ranking import pairs, ranked


class RewardModel(nn.Module):
    """A transformer body and a linear head to one score; the body's vocabulary projection is unused."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        # The vocabulary projection is never used: left trainable it would get no gradient and so no optimizer
        # state, and a checkpoint without it could not be resumed. (Tied to the embeddings, it is trained as them.)
        if body.output.weight is not body.tok_embeddings.weight:
            body.output.requires_grad_(False)
        self.head = nn.Linear(body.config.dim, 1, bias=False)
        nn.init.normal_(self.head.weight, std=body.config.dim ** -0.5)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores [batch] of right-padded rows whose real lengths are `lengths`."""
        hidden = final_hidden(self.body, tokens)
        last = hidden[torch.arange(len(tokens), device=tokens.device), lengths - 1]
        return self.head(last).squeeze(-1).float()

    def per_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """The score of every prefix [batch, seq] (PPO's value model reads one per reply token)."""
        return self.head(final_hidden(self.body, tokens)).squeeze(-1).float()


def body_lora(config: LoRAConfig) -> LoRAConfig:
    """LoRA for a reward model's body: never on the vocabulary projection, which it does not use."""
    return dataclasses.replace(config, targets=[t for t in config.targets if t != "output"])


def bradley_terry_losses(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(better - worse)


def reward_loss(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss over the batch's examples — each the mean over its ordered pairs — their number)."""
    n = int(batch["n"])
    scores = ranked(model(batch["tokens"], batch["lengths"]), n)
    losses = torch.stack([bradley_terry_losses(scores[i], scores[j]) for i, j in pairs(len(scores))]).mean(0)
    return losses.sum(), torch.tensor(n, device=losses.device)
