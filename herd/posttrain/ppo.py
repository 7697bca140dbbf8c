"""PPO for language models (Ouyang et al.; Llama 3 describes it beside DPO): the maths, with no loop of its own.

A rollout is a prompt and a sampled reply. Per reply token: the policy's log-prob when sampled (`old_logps`), the
reference's (`ref_logps`) and the value model's estimate (`values`); the reward model scores the whole reply once.
The reward of each token is -kl_coef · (old - ref), the last one adding the score; GAE turns rewards and values
into advantages; the policy minimises the clipped surrogate, the value model a clipped squared error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PPOConfig:
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_weight: float = 0.1


def token_rewards(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards [batch, T]: the KL penalty everywhere, the reward model's score on the last reply token."""
    rewards = -kl_coef * (old_logps - ref_logps) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # the first position reaching the reply's full length
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns [batch, T] over right-padded replies (value 0 past the end)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                     values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, config: PPOConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped policy loss, clipped value loss) per token, to be summed over the reply mask."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - config.clip, 1 + config.clip)
    policy = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    clipped_values = old_values + (values - old_values).clamp(-config.value_clip, config.value_clip)
    value = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return policy, value
