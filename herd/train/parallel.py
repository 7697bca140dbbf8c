"""Parallelism on torch.distributed, applied to the model from outside (as torchtitan does): one DeviceMesh with
dims (pp, dp_replicate, dp_shard, tp); FSDP2 `fully_shard` over the data-parallel dims (HSDP when both are > 1),
DTensor tensor parallelism with sequence-parallel norms over `tp`, and torch.distributed.pipelining over `pp`.

    env = DistEnv.from_environment(config.parallel)     # init_process_group when launched by torchrun
    parts, pipeline = parallelize(model, env, config)   # the model parts this rank holds, a pipeline or None
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from herd.train.config import ConfigError, ParallelSection


@dataclass
class DistEnv:
    """Where this process sits: world, device, mesh and the process groups the Trainer reduces over."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    mesh: object | None = None  # a DeviceMesh with dims (pp, dp_replicate, dp_shard, tp), or None on one process

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        return self.mesh["dp_replicate"].get_local_rank() * self.dp_shard + self.mesh["dp_shard"].get_local_rank()

    def group(self, *dims: str) -> dist.ProcessGroup | None:
        """The process group over these mesh dims (None when they span one rank)."""
        if self.mesh is None:
            return None
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}
        if all(sizes[d] == 1 for d in dims):
            return None
        sub = self.mesh[dims] if len(dims) > 1 else self.mesh[dims[0]]
        if len(dims) > 1:
            sub = sub._flatten("_".join(dims))
        return sub.get_group()

    def all_reduce(self, tensor: torch.Tensor, *dims: str) -> torch.Tensor:
        """Sum `tensor` (in place) over the given mesh dims; a no-op on one rank."""
        group = self.group(*dims)
        if group is not None:
            dist.all_reduce(tensor, group=group)
        return tensor

    @classmethod
    def from_environment(cls, cfg: ParallelSection) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        pp, tp, rep = cfg.pp, cfg.tp, cfg.dp_replicate
        shard = cfg.dp if cfg.dp > 0 else world // max(pp * tp * rep, 1)
        if min(pp, tp, rep, shard) < 1 or pp * rep * shard * tp != world:
            raise ConfigError(
                f"parallel: pp {pp} x dp_replicate {rep} x dp {shard} x tp {tp} does not equal the world size {world}; "
                "make the degrees multiply to the number of processes"
            )
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        env = cls(rank, world, local_rank, device, pp, rep, shard, tp)
        if world == 1:
            return env
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=cfg.timeout_s)
            dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                    world_size=world, timeout=timeout)
        from torch.distributed.device_mesh import init_device_mesh

        env.mesh = init_device_mesh(device.type, (pp, rep, shard, tp),
                                    mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
        return env


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, under a prefix of its own for each restart of the job.

    torchrun's agent keeps one store across restarts, and gloo would read the previous attempt's addresses
    (dead ports: "connection refused") unless every attempt's keys are kept apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world, is_master=not agent_store and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"herd/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def parallelize(model: nn.Module, env: DistEnv, config) -> tuple[list[nn.Module], object | None]:
    """Apply TP, activation checkpointing, compile and FSDP to `model` (in that order, as torchtitan does), or
    split it into pipeline stages; returns the model parts this rank holds and the pipeline (None without PP)."""
    t = config.training
    model.to(env.device)
    if env.pp > 1:
        from herd.train.pipeline import build_pipeline

        return build_pipeline(model, env, config)
    _parallelize_part(model, env, t)
    return [model], None


def _parallelize_part(model: nn.Module, env: DistEnv, t) -> None:
    if env.tp > 1:
        apply_tp(model, env.mesh["tp"])
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        for block in _blocks(model):
            block.compile()
    if env.dp > 1:
        apply_fsdp(model, env, t)


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (FQNs are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.layers
    for key in (layers.keys() if isinstance(layers, nn.ModuleDict) else range(len(layers))):
        layers[key] = checkpoint_wrapper(layers[key], preserve_rng_state=False)


def apply_fsdp(model: nn.Module, env: DistEnv, t) -> None:
    """FSDP2 over the data-parallel dims: each block is one all-gather unit, the rest (embeddings, norm, output)
    the root's. bf16 parameters with float32 gradient reduction where autocast would use bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from herd.train.loop import autocast_dtype

    dims = ("dp_replicate", "dp_shard") if env.dp_replicate > 1 else ("dp_shard",)
    mesh = env.mesh[dims]
    low = autocast_dtype(t.dtype, env.device)
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by the backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def apply_tp(model: nn.Module, mesh) -> None:
    """Megatron-style tensor parallelism with sequence parallelism: q/k/v and w1/w3 split by output (column),
    wo and w2 by input (row); between blocks the activations stay split along the sequence, and the norms
    work on those shards (SequenceParallel). The output projection gathers the full logits."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in _blocks(model):
        parallelize_module(block, mesh, {
            "attention_norm": SequenceParallel(),
            # x arrives split along the sequence; rotation and mask are plain tensors, the cache and layer index
            # are not tensors at all.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
        # Each rank now computes its share of the heads; the module reshapes by these counts.
        block.attention.n_heads //= mesh.size()
        block.attention.n_kv_heads //= mesh.size()
