"""Direct preference optimisation, as Llama 3 ran it.

The loss of Rafailov et al., -log σ(β((log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)))), with Llama 3's two
changes: the chat format's own tokens (headers, end of turn) are left out of the replies' log-probabilities, since
they are shared by both replies and pulling them up and down at once destabilises training; and the chosen reply's
negative log-likelihood, per token, is added with weight 0.2 (`nll_weight`). The reference model's log-probs
are computed once, before training, and carried in the batch (`ref_logps`), so the reference is never kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.bounds import NON_NEGATIVE, POSITIVE, require
from herd.posttrain.logprobs import evaluating, sequence_logps
from herd.posttrain.ranking import pairs, ranked


@dataclass
class DPOConfig:
    beta: float = 0.1
    nll_weight: float = 0.2          # Llama 3; 0 is the original DPO
    mask_formatting: bool = True     # Llama 3; False scores every reply token, as the original DPO

    def __post_init__(self):
        require(self, POSITIVE, "beta")
        require(self, NON_NEGATIVE, "nll_weight")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss from summed reply log-probabilities [n]."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def dpo_loss(model: nn.Module, batch: dict[str, torch.Tensor], config: DPOConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss over the batch's examples, their number), for a `preference_batch` carrying `ref_logps`.

    A ranked row (edited > chosen > rejected) is trained on each of its ordered pairs, averaged, as the reward
    model is; the NLL term is on its best reply.
    """
    n = int(batch["n"])
    logps, counts = sequence_logps(model, batch)
    ranks = ranked(logps, n)
    ref = ranked(batch["ref_logps"], n)
    losses = torch.stack([dpo_losses(ranks[i], ranks[j], ref[i], ref[j], config.beta) for i, j in pairs(len(ranks))])
    losses = losses.mean(0)
    if config.nll_weight:
        losses = losses - config.nll_weight * ranks[0] / counts[:n].clamp(min=1)
    return losses.sum(), torch.tensor(n, device=losses.device)


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed reply log-probabilities of the reference model, for caching before training."""
    with evaluating(model):
        return sequence_logps(model, batch)[0]
