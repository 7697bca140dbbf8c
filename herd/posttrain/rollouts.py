"""PPO as a `herd finetune` recipe: the batch source that feeds the shared Trainer with rollouts.

    [finetune]
    recipe = "ppo"
    data = "prompts.jsonl"     # {"messages": [... up to a user turn]} plus what the verifier reads ("answer")
    [ppo]
    verifier = "answer"        # or reward_model = "out/rm/model"

Every iteration takes `ppo.prompts` prompts (in a seeded order, as the other recipes take examples), samples
`ppo.samples` replies to each from the policy as it is now through the generation engine, scores them, and fixes
the iteration's targets (`ppo.rollout_targets`: log-probs and values at sampling time, rewards with the KL penalty
to the reference, GAE advantages). The Trainer then takes `epochs x minibatches` optimizer steps on them with
`ppo.ppo_loss`, and brings its checkpoints, fault handling, metrics and export. The batch source's state holds the
prompt position, the iteration and the rollouts of an iteration in progress, so a resumed run goes on where it
stopped. The Trainer counts optimizer steps; this recipe's `run.log_interval` and `checkpoint.interval` count
iterations (`trainer_config`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from herd.generate.sampling import SamplingParams
from herd.posttrain.data import DialogEncoder
from herd.rows import DataError
from herd.posttrain.finetune import REWARD_HEAD, ExampleBatches, Recipe, export, load_reward_model
from herd.posttrain.logprobs import token_logps
from herd.posttrain.lora import adapters_off, apply_lora
from herd.posttrain.ppo import (PolicyValue, PPOConfig, in_chunks, ppo_loss, reply_tokens, rollout_batch,
                                rollout_targets, sample_rollouts, sequence_kl)
from herd.posttrain.rejection import Scorer, prompt_rows, reward_scorer, verifier_scorer
from herd.posttrain.reward import RewardModel, body_lora
from herd.posttrain.verify import NEEDS, ROW_CHECKS, load_verifier
from herd.train.config import ConfigError
from herd.train.loop import autocast_dtype


class _Totals:
    """What the metrics report since the last logged step."""

    def __init__(self):
        self.iteration, self.rollouts, self.score, self.kl, self.reply_tokens, self.sample_s = -1, 0, 0.0, 0.0, 0, 0.0
        self.tokens, self.policy, self.value = 0, 0.0, 0.0


class Rollouts:
    """The Trainer's batch source for PPO: `next()` gives one optimizer step's micro-batches of rollout targets,
    sampling a new iteration's rollouts when the last one's steps are done; `loss` is the Trainer's loss_fn."""

    def __init__(self, model: PolicyValue, prompts: ExampleBatches, tokenizer, scorer: Scorer,
                 reference: Callable[[dict], torch.Tensor], config: PPOConfig, micro_batch_size: int | None,
                 pad_id: int, seed: int, autocast: torch.dtype | None = None):
        self.model, self.prompts, self.tokenizer, self.scorer = model, prompts, tokenizer, scorer
        # The Trainer's precision: old log-probs and values in float32 against a bf16 policy had put the ratio at
        # 0.92-1.17 before any update, most of the clip range.
        self.autocast = autocast
        self.reference, self.config, self.pad_id, self.seed = reference, config, pad_id, seed
        self.micro = micro_batch_size
        self.params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                                     top_p=config.top_p)
        self.steps_per_iteration = config.epochs * config.minibatches
        self.iteration = 0      # the iteration whose rollouts are (or are next) trained on
        self.step = 0           # optimizer steps taken on them
        self.targets: dict[str, torch.Tensor] | None = None
        self.totals = _Totals()

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if self.targets is None:
            self.targets = self._collect()
        targets = self.targets
        epoch, part = divmod(self.step, self.config.minibatches)
        rows = self._order(epoch)[part::self.config.minibatches]
        self.step += 1
        if self.step == self.steps_per_iteration:
            self.targets, self.step = None, 0
            self.iteration += 1
        micro = self.micro or len(rows)
        return [self._rows(targets, rows[i:i + micro]) for i in range(0, len(rows), micro)]

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.config.prompts * self.config.samples))
        if self.config.minibatches > 1:
            random.Random((self.seed * 1_000_003 + self.iteration) * 1_000_003 + epoch).shuffle(order)
        return order

    @staticmethod
    def _rows(targets: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        """These rows, cut to the longest of them (the rest is padding)."""
        index = torch.tensor(rows, device=targets["lengths"].device)
        width = int(targets["lengths"][index].max())
        return {k: v[index, :width] for k, v in targets.items() if v.dim() == 2}

    @torch.no_grad()
    def _collect(self) -> dict[str, torch.Tensor]:
        """Sample, score and lay out this iteration's rollouts; returns their targets."""
        policy, k = self.model.policy, self.config.samples
        device = next(policy.parameters()).device
        picked = next(self.prompts)[0]
        started = time.perf_counter()
        prompts, done = sample_rollouts(policy, self.tokenizer, [ids for _, ids in picked], k, self.params)
        sample_s = time.perf_counter() - started
        replies = [reply_tokens(c) for c in done]
        scores = torch.tensor(self.scorer([picked[i // k][0] for i in range(len(done))], [c.text for c in done]),
                              dtype=torch.float32)
        scores -= self.config.no_stop_penalty * torch.tensor([float(c.stop_token is None) for c in done])
        batch = {key: v.to(device) for key, v in rollout_batch(prompts, replies, self.pad_id).items()}
        with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
            reference = in_chunks(self.reference, batch, self.micro)
            targets = rollout_targets(policy, self.model.value, batch, scores.to(device), reference, self.config,
                                      self.micro)
        targets["lengths"] = torch.tensor([len(p) + len(r) for p, r in zip(prompts, replies)], device=device)
        t = self.totals
        t.iteration = self.iteration
        t.rollouts += len(done)
        t.score += float(scores.sum())
        t.kl += sequence_kl(targets) * len(done)
        t.reply_tokens += sum(map(len, replies))
        t.sample_s += sample_s
        return targets

    def loss(self, model: PolicyValue, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss, n, policy, value = ppo_loss(model, batch, self.config)
        self.totals.tokens += int(n)
        self.totals.policy += float(policy)
        self.totals.value += float(value)
        return loss, n

    def metrics(self) -> dict:
        """Since the last call: the iteration, its rollouts' mean score and KL to the reference (per reply), the
        per-token policy and value losses, mean reply length and sampling throughput (generated tokens/s)."""
        t, self.totals = self.totals, _Totals()
        out = {"iteration": t.iteration, "policy_loss": t.policy / max(t.tokens, 1),
               "value_loss": t.value / max(t.tokens, 1)}
        if t.rollouts:
            out.update(score=t.score / t.rollouts, kl=t.kl / t.rollouts, reply_tokens=t.reply_tokens / t.rollouts,
                       sample_tokens_per_s=t.reply_tokens / max(t.sample_s, 1e-9))
        return out

    def state_dict(self) -> dict:
        targets = None if self.targets is None else {k: v.cpu() for k, v in self.targets.items()}
        return {"prompts": self.prompts.state_dict(), "iteration": self.iteration, "step": self.step,
                "targets": targets}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.iteration, self.step = state["iteration"], state["step"]
        device = next(self.model.parameters()).device
        self.targets = None if state["targets"] is None else {k: v.to(device) for k, v in state["targets"].items()}


def check_config(config) -> None:
    """One-line errors for a ppo config that cannot run: exactly one reward source, and a usable one."""
    p = config.ppo
    if bool(p.reward_model) == bool(p.verifier):
        raise ConfigError("ppo: give exactly one reward source: ppo.verifier (answer, only_answer, python_tests, "
                          "module:function) or ppo.reward_model (the run.dir/model of a `recipe = \"rm\"` run)")
    if p.verifier:
        try:
            load_verifier(p.verifier)
        except ValueError as error:
            raise ConfigError(f"ppo.verifier: {error}") from None
    elif not (Path(p.reward_model) / REWARD_HEAD).is_file():
        raise ConfigError(f"ppo.reward_model: {p.reward_model} has no {REWARD_HEAD}; give the run.dir/model of a "
                          "`recipe = \"rm\"` run")
    if config.finetune.eval_data:
        raise ConfigError("finetune.eval_data: the ppo recipe has no held-out loss; its metrics report the "
                          "rollouts' scores")


def trainer_config(config):
    """The config the Trainer runs: ppo.iterations x (epochs x minibatches) optimizer steps, logs and checkpoints
    at iteration boundaries."""
    p, per = config.ppo, config.ppo.epochs * config.ppo.minibatches
    return dataclasses.replace(
        config, training=dataclasses.replace(config.training, steps=p.iterations * per),
        run=dataclasses.replace(config.run, log_interval=config.run.log_interval * per, eval_interval=0),
        checkpoint=dataclasses.replace(config.checkpoint, interval=config.checkpoint.interval * per))


def ppo_recipe(config, llm) -> Recipe:
    """Policy (LoRA-wrapped if asked), value model, reference, reward source and prompts of a ppo run."""
    p, t = config.ppo, config.training
    policy = llm.model
    context = policy.config.max_seq_len
    encoder = DialogEncoder(llm.chat_format)
    items = []
    for where, row in prompt_rows(config.finetune.data, NEEDS.get(p.verifier), ROW_CHECKS.get(p.verifier)):
        ids = encoder.prompt(row["messages"], row.get("tools"), where)
        if len(ids) >= context:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens; the model's context is {context}, "
                            "and the reply must fit in it too")
        items.append((row, ids))

    if p.reward_model:
        value, rm_llm = load_reward_model(p.reward_model)
        if rm_llm.model.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(f"ppo.reward_model: its vocabulary ({rm_llm.model.config.vocab_size}) is not the "
                              f"policy's ({policy.config.vocab_size}); the value model reads the policy's tokens")
        scorer = reward_scorer(p.reward_model)
    else:
        value = RewardModel(copy.deepcopy(policy)).to(llm.device)
        scorer = verifier_scorer(load_verifier(p.verifier))

    if config.lora.rank:
        apply_lora(policy, config.lora)
        apply_lora(value.body, body_lora(config.lora))
        value.head.requires_grad_(True)

        def reference(batch):   # the base model: the policy with its adapters off
            with adapters_off(policy):
                return token_logps(policy, batch, p.temperature)
    else:
        frozen = copy.deepcopy(policy).eval().requires_grad_(False)
        reference = functools.partial(token_logps, frozen, temperature=p.temperature)

    model = PolicyValue(policy, value)
    pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else 0
    rollouts = Rollouts(model, ExampleBatches(items, list, p.prompts, None, t.seed), llm.tokenizer, scorer,
                        reference, p, t.micro_batch_size, pad, t.seed, autocast_dtype(t.dtype, llm.device))
    return Recipe(model, rollouts, rollouts.loss, [],
                  functools.partial(export, llm=llm, fmt=config.checkpoint.export_format, lora=config.lora,
                                    base=config.finetune.model),
                  metrics=rollouts.metrics)
