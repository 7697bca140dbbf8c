"""Pipeline parallelism with torch.distributed.pipelining: the model cut into stages of consecutive blocks.

Each stage is a `Stage` module holding the original model's submodules under their original names (so
checkpoints, which DCP merges across ranks, look like the unsplit model's). A stage passes its hidden states and
the document ids on; the last one returns logits, which the schedule's loss turns into a summed cross-entropy.
With `Interleaved1F1B` each rank holds two stages, round-robin (rank r: stages r and r + pp).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.llama import Transformer, rotations
from herd.train.config import ConfigError
from herd.train.data import IGNORE


class Stage(nn.Module):
    def __init__(self, model: Transformer, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("rope_freqs", model.rope_freqs, persistent=False)

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor):
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)
        b, s = document_ids.shape
        # The same rotation and mask the whole model computes in its forward (herd.model.llama.Transformer).
        positions = Transformer._default_positions(b, s, document_ids, None, x.device)
        rotation = rotations(positions, self.rope_freqs)
        mask = Transformer._mask(s, document_ids, None, x.device)
        for i, layer in self.layers.items():
            x = layer(x, rotation, mask, None, int(i))
        if self.output is not None:
            return self.output(self.norm(x)).float()
        return x, document_ids


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


class Pipeline:
    """Runs one optimizer step's forward and backward (or an evaluation's forward) through the schedule; the
    Trainer's `pipeline`. `build()` makes the schedule and its stages: torch's schedule keeps the shapes it
    inferred on its first step, so a batch of another shape (a batch-size or sequence-length schedule, a held-out
    batch) gets a new one over the same modules (it had failed at the step where the shape changed)."""

    def __init__(self, build, n_microbatches: int):
        self.build, self.n_microbatches = build, n_microbatches
        self.schedule, stages = build()
        self.first = any(s.is_first for s in stages)
        self.last = any(s.is_last for s in stages)
        self.shape: tuple[int, ...] | None = None

    def step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run({k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}, train=True)

    def evaluate(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss and the count of labelled tokens of a batch, forward only."""
        return self._run(batch, train=False)

    def _run(self, batch: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if len(batch["tokens"]) % self.n_microbatches:
            raise ConfigError(f"parallel.pp_microbatches {self.n_microbatches} does not divide the "
                              f"{len(batch['tokens'])} sequences per rank")
        shape = tuple(batch["tokens"].shape)
        if self.shape is not None and shape != self.shape:
            self.schedule, _ = self.build()
        self.shape = shape
        losses: list[torch.Tensor] = []
        args = (batch["tokens"], batch["document_ids"]) if self.first else ()
        kwargs = {"target": batch["labels"], "losses": losses} if self.last else {}
        (self.schedule.step if train else self.schedule.eval)(*args, return_outputs=False, **kwargs)
        device = batch["tokens"].device
        if not self.last:  # the loss lives on the last stage; the Trainer sums over stages
            return torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        return torch.stack(losses).sum().detach(), (batch["labels"] != IGNORE).sum()


def build_pipeline(model: Transformer, env, config) -> tuple[list[nn.Module], Pipeline]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from herd.train.parallel import _parallelize_part

    p = config.parallel
    schedules = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
    per_rank = 2 if p.pp_schedule == "Interleaved1F1B" else 1
    n_stages = env.pp * per_rank
    n_layers = model.config.n_layers
    if n_layers < n_stages:
        raise ConfigError(f"{n_stages} pipeline stages need at least as many layers (the model has {n_layers})")
    bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    pp_rank = env.mesh["pp"].get_local_rank()
    group = env.group("pp")
    parts, indices = [], list(range(pp_rank, n_stages, env.pp))
    for index in indices:
        stage = Stage(model, list(range(bounds[index], bounds[index + 1])), index == 0, index == n_stages - 1)
        _parallelize_part(stage, env, config.training)
        parts.append(stage)
    n_micro = p.pp_microbatches or env.pp

    def build():
        stages = [PipelineStage(part, index, n_stages, env.device, group=group) for part, index in zip(parts, indices)]
        schedule = schedules[p.pp_schedule](stages if per_rank > 1 else stages[0], n_microbatches=n_micro,
                                            loss_fn=_summed_cross_entropy, scale_grads=False)
        return schedule, stages

    return parts, Pipeline(build, n_micro)
