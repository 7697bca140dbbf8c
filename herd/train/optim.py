"""AdamW, the learning-rate schedule (linear warm-up, cosine decay to a floor, a final linear anneal to 0) and
gradient clipping that works on plain, FSDP-sharded, tensor-parallel and pipeline-split parameters alike.

    optimizer = build_optimizer(model, config.training)
    scheduler = build_scheduler(optimizer, config.training)   # a LambdaLR: step() once per optimizer step
    norm = clip_grad_norm(model.parameters(), config.training.grad_clip, pp_group)
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from herd.train.config import TrainingSection


def build_optimizer(model: nn.Module | Iterable[nn.Module], cfg: TrainingSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains (and biases) are not shrunk towards 0."""
    modules = [model] if isinstance(model, nn.Module) else list(model)
    seen, decay, no_decay = set(), [], []
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel makes one pass over each parameter and its two moments instead of a dozen: on these CPUs
    # it is 6-10x faster than foreach, which matters because the step is memory-bound.
    fused = {p.device.type for p in decay + no_decay} in ({"cpu"}, {"cuda"})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, cfg: TrainingSection) -> float:
    """The learning rate at optimizer step `step` (0-based), as a fraction of cfg.lr.

    Warm-up from ~0 to 1 over warmup_steps, cosine down to min_lr_ratio at the end of the main phase, then in
    the last anneal_steps a straight line from there to 0 (Llama 3's final annealing).
    """
    main = cfg.steps - cfg.anneal_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step >= main:
        start = _cosine(main, cfg) if cfg.anneal_steps else cfg.min_lr_ratio
        return start * (cfg.steps - step) / max(cfg.anneal_steps, 1)
    return _cosine(step, cfg)


def _cosine(step: int, cfg: TrainingSection) -> float:
    main = cfg.steps - cfg.anneal_steps
    span = max(main - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingSection) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def grad_norm(parameters: Iterable[torch.Tensor], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global L2 norm of the gradients: over DTensor shards (FSDP, TP) and over pipeline stages."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        total = torch.zeros((), dtype=torch.float32)
    else:
        squares = [torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]
        total = torch.stack([_full(s) for s in squares]).sum()
    if pp_group is not None:
        # Each stage holds other layers: the squares add up across stages.
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def _full(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's norm is a partial result on each rank; full_tensor() reduces it over the mesh.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None,
                   *, grad_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Multiply the gradients by `grad_scale`, then scale them so their global norm is at most `max_norm` (0: no
    clipping); returns the norm after `grad_scale`, before clipping. Both scalings are one pass over the gradients
    (for a model this size a pass costs a tenth of a step's forward and backward on a CPU)."""
    parameters = list(parameters)
    norm = grad_norm(parameters, pp_group) * grad_scale
    factor = torch.as_tensor(grad_scale, dtype=torch.float32, device=norm.device)
    clip = max_norm > 0 and bool(torch.isfinite(norm))
    if clip:
        factor = factor * (max_norm / (norm + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and (clip or not (isinstance(grad_scale, (int, float)) and grad_scale == 1)):
        torch._foreach_mul_(grads, factor.to(grads[0].device))
    return norm
