"""PPO for language models (Ouyang et al.; Llama 3 describes it beside DPO): the maths, with no loop of its own.

A rollout is a prompt and a sampled reply. Per reply token: the policy's log-prob when sampled (`old_logps`), the
reference's (`ref_logps`) and the value model's estimate (`values`); the reward model scores the whole reply once.
The reward of each token is -kl_coef · (old - ref), the last one adding the score; GAE turns rewards and values
into advantages; the policy minimises the clipped surrogate, the value model a clipped squared error.
`sample_rollouts` draws the replies through the generation engine, `rollout_batch` lays them out as the other
recipes' batches, `rollout_targets` fixes an iteration's advantages and `ppo_loss` is the loss the shared Trainer
minimises (herd.posttrain.rollouts runs the recipe); `ppo_update` is one iteration without the Trainer. A
`RewardModel` body with its head per token is the value model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from herd.bounds import AT_LEAST_ONE, FRACTION, NONZERO_FRACTION, NON_NEGATIVE, POSITIVE, require
from herd.generate.generator import Generator
from herd.generate.sampling import SamplingParams
from herd.generate.sequence import Completion
from herd.posttrain.data import IGNORE
from herd.posttrain.logprobs import evaluating, token_logps
from herd.posttrain.reward import RewardModel


@dataclass
class PPOConfig:
    """The `[ppo]` section of `herd finetune` (recipe "ppo"); the maths below read the loss fields only."""

    iterations: int = 100            # sample -> score -> update rounds
    prompts: int = 8                 # prompts per iteration
    samples: int = 4                 # replies sampled per prompt
    temperature: float = 1.0         # sampling; the log-probs are taken at the same temperature
    top_p: float = 1.0               # < 1 samples off-policy (the truncation is not in the log-probs)
    max_tokens: int = 256            # per reply (and within the model's context)
    reward_model: str = ""           # the run.dir/model of a `recipe = "rm"` run ...
    verifier: str = ""               # ... or a verifier (answer, only_answer, python_tests, module:function): one
    no_stop_penalty: float = 0.0     # subtracted from the score of a reply cut at max_tokens
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_weight: float = 0.1
    epochs: int = 4                  # passes over each iteration's rollouts
    minibatches: int = 1             # optimizer steps per pass (the rollouts split in shuffled parts)

    def __post_init__(self):
        require(self, AT_LEAST_ONE, "iterations", "prompts", "samples", "max_tokens", "epochs", "minibatches")
        require(self, NON_NEGATIVE, "no_stop_penalty", "kl_coef", "value_weight")
        require(self, POSITIVE, "clip", "value_clip", "temperature")  # PPO samples to explore: no greedy replies
        require(self, FRACTION, "gamma", "lam")
        require(self, NONZERO_FRACTION, "top_p")
        if self.minibatches > self.prompts * self.samples:
            raise ValueError(f"minibatches ({self.minibatches}) exceeds the rollouts per iteration "
                             f"(prompts x samples = {self.prompts * self.samples})")


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
    its completion. A fresh engine each time: a prefix cache would hold keys computed by older weights. Prompts go
    in as many at a time as the engine's queue takes."""
    with torch.no_grad(), evaluating(model):
        engine = Generator(model, tokenizer)
        per_call = max(engine.config.max_queue // k, 1)
        done = [c for start in range(0, len(prompts), per_call)
                for c in engine.generate(list(prompts[start:start + per_call]), params, n=k)]
    return [list(prompts[i // k]) for i in range(len(done))], done


def reply_tokens(completion: Completion) -> list[int]:
    """The generated tokens with the stop token that ended them (the policy is trained to stop, too)."""
    return completion.tokens + ([completion.stop_token] if completion.stop_token is not None else [])


class PolicyValue(nn.Module):
    """Policy and value model as the one module the Trainer optimizes, checkpoints and restores."""

    def __init__(self, policy: nn.Module, value: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value


def in_chunks(fn, batch: dict[str, torch.Tensor], rows: int | None) -> torch.Tensor:
    """fn(batch) [batch, ...] computed `rows` rows at a time (None: all at once), to bound the activations."""
    n = len(batch["tokens"])
    if not rows or rows >= n:
        return fn(batch)
    return torch.cat([fn({k: v[i:i + rows] for k, v in batch.items()}) for i in range(0, n, rows)])


def rollout_targets(policy: nn.Module, value_model: RewardModel, batch: dict[str, torch.Tensor],
                    scores: torch.Tensor, ref_logps: torch.Tensor, config: PPOConfig, rows: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """The batch with what one iteration's updates aim at: the log-probs and values at sampling time (old_logps,
    old_values), the rewards' whitened GAE advantages and the returns, all [batch, T] and 0 off the reply.
    `rows`: rollouts per forward pass."""
    mask = (batch["labels"] != IGNORE).float()
    # In eval mode, as the replies were sampled: with (LoRA) dropout on, the old log-probs, the KL penalty and the
    # first update's ratio would come from a random thinning of the policy, not from the policy that sampled.
    with torch.no_grad(), evaluating(policy, value_model):
        old_logps = in_chunks(lambda b: token_logps(policy, b, config.temperature), batch, rows) * mask
        old_values = in_chunks(lambda b: value_model.per_token(b["tokens"]), batch, rows) * mask
    rewards = token_rewards(scores, old_logps, ref_logps * mask, mask, config.kl_coef)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    return {**batch, "old_logps": old_logps, "old_values": old_values, "ref_logps": ref_logps * mask,
            "advantages": whiten(advantages, mask), "returns": returns}


def sequence_kl(targets: dict[str, torch.Tensor]) -> float:
    """KL(policy || reference) per reply, estimated on the sampled replies: the mean of their log-ratio sums."""
    return float((targets["old_logps"] - targets["ref_logps"]).sum(-1).mean())


def ppo_loss(model: PolicyValue, batch: dict[str, torch.Tensor], config: PPOConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, reply tokens, summed policy loss, summed value loss) of rollout targets: the Trainer's
    loss_fn shape, the per-token mean being the loss PPO minimises."""
    mask = (batch["labels"] != IGNORE).float()
    logps = token_logps(model.policy, batch, config.temperature)
    values = model.value.per_token(batch["tokens"])
    policy, value = ppo_token_losses(logps, batch["old_logps"], batch["advantages"], values, batch["old_values"],
                                     batch["returns"], config)
    policy, value = (policy * mask).sum(), (value * mask).sum()
    return policy + config.value_weight * value, mask.sum().long(), policy.detach(), value.detach()


def ppo_update(policy: nn.Module, value_model: RewardModel, batch: dict[str, torch.Tensor], scores: torch.Tensor,
               ref_logps: torch.Tensor, optimizer: torch.optim.Optimizer, config: PPOConfig) -> dict[str, float]:
    """One PPO iteration on a batch of rollouts, outside the Trainer: `config.epochs` full-batch updates of policy
    and value model together."""
    model = PolicyValue(policy, value_model)
    targets = rollout_targets(policy, value_model, batch, scores, ref_logps, config)
    for _ in range(config.epochs):
        loss, n, _, _ = ppo_loss(model, targets, config)
        optimizer.zero_grad(set_to_none=True)
        (loss / n).backward()
        optimizer.step()
    return {"score": float(scores.mean()), "kl": sequence_kl(targets), "loss": float(loss.detach() / n)}
