"""PPO for language models (Ouyang et al.; Llama 3 describes it beside DPO): the maths, with no loop of its own.

A rollout is a prompt and a sampled reply. Per reply token: the policy's log-prob when sampled (`old_logps`), the
reference's (`ref_logps`) and the value model's estimate (`values`); the reward model scores the whole reply once.
The reward of each token is -kl_coef · (old - ref), the last one adding the score; GAE turns rewards and values
into advantages; the policy minimises the clipped surrogate, the value model a clipped squared error.
`sample_rollouts` draws the replies through the generation engine, `rollout_batch` lays them out as the other
recipes' batches, and `ppo_update` runs one iteration (a `RewardModel` body with its head per token is the value
model).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from herd.generate.generator import Generator
from herd.generate.sampling import SamplingParams
from herd.generate.sequence import Completion
from herd.posttrain.data import IGNORE
from herd.posttrain.logprobs import token_logps
from herd.posttrain.reward import RewardModel


@dataclass
class PPOConfig:
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_weight: float = 0.1
    epochs: int = 4                  # optimizer steps on each batch of rollouts


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


def rollout_batch(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad_id: int = 0
                  ) -> dict[str, torch.Tensor]:
    """Prompt + reply rows, right-padded, labelled on the reply tokens only (as the SFT and DPO batches are)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE, dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        ids = list(prompt) + list(reply)
        tokens[i, :len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(list(reply), dtype=torch.long)
    return {"tokens": tokens, "labels": labels}


def sample_rollouts(model: nn.Module, tokenizer, prompts: Sequence[list[int]], k: int, params: SamplingParams
                    ) -> tuple[list[list[int]], list[Completion]]:
    """K replies per prompt from the policy as it is now, through the generation engine; each row's prompt ids and
    its completion. A fresh engine each time: a prefix cache would hold keys computed by older weights."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            done = Generator(model, tokenizer).generate(list(prompts), params, n=k)
    finally:
        model.train(was_training)
    return [list(prompts[i // k]) for i in range(len(done))], done


def reply_tokens(completion: Completion) -> list[int]:
    """The generated tokens with the stop token that ended them (the policy is trained to stop, too)."""
    return completion.tokens + ([completion.stop_token] if completion.stop_token is not None else [])


def ppo_update(policy: nn.Module, value_model: RewardModel, batch: dict[str, torch.Tensor], scores: torch.Tensor,
               ref_logps: torch.Tensor, optimizer: torch.optim.Optimizer, config: PPOConfig) -> dict[str, float]:
    """One PPO iteration on a batch of rollouts: per-token rewards (score and KL to the reference), GAE on the
    value model's estimates, then `config.epochs` clipped updates of policy and value model together."""
    mask = (batch["labels"] != IGNORE).float()
    with torch.no_grad():
        old_logps = token_logps(policy, batch) * mask
        old_values = value_model.per_token(batch["tokens"]) * mask
    rewards = token_rewards(scores, old_logps, ref_logps * mask, mask, config.kl_coef)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    advantages = whiten(advantages, mask)
    for _ in range(config.epochs):
        logps = token_logps(policy, batch)
        values = value_model.per_token(batch["tokens"])
        policy_loss, value_loss = ppo_token_losses(logps, old_logps, advantages, values, old_values, returns, config)
        loss = ((policy_loss + config.value_weight * value_loss) * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"score": float(scores.mean()), "kl": float(((old_logps - ref_logps) * mask).sum() / mask.sum()),
            "loss": float(loss.detach())}
