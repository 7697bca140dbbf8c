"""The pretraining recipe: a config becomes shards, a model, its parallel layout, batches and a Trainer.

`check(config)` validates everything that can be known before any compute (shards, model shape, context length,
mesh, batch split, memory, run.dir) and raises ConfigError with one line; `pretrain(config)` then runs (or resumes)
the job. Fine-tuning reuses `require_memory`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

import torch

from herd.atomic import make_directory
from herd.model.config import CONFIGS, ModelConfig
from herd.model.llama import Transformer
from herd.train.config import MODEL_SHAPE, ConfigError, ModelSection, TrainConfig, TrainingSection, set_fields, to_toml
from herd.train.data import PackedBatches, held_out_batches, open_shards
from herd.train.parallel import DistEnv


def build_model_config(section: ModelSection, vocab_size: int | None) -> ModelConfig:
    """The named configuration with the fields `section` sets over it (and the tokenizer's vocabulary, when it
    differs), or the shape in `section`."""
    vocab = section.vocab_size or vocab_size
    if section.name:
        if section.name not in CONFIGS:
            raise ConfigError(f"model.name: unknown configuration {section.name!r}; known: {', '.join(CONFIGS)}")
        config = CONFIGS[section.name]
        changes = {name: getattr(section, name) for name in set_fields(section) & set(MODEL_SHAPE)}
        if vocab and vocab != config.vocab_size:
            changes["vocab_size"] = vocab
        try:
            return config.replace(**changes)
        except ValueError as e:
            raise ConfigError(f"model: {e} (the fields not set are {section.name}'s)") from None
    if not vocab:
        raise ConfigError("model.vocab_size is not set and the shards name no tokenizer vocabulary")
    try:
        return ModelConfig(dim=section.dim, n_layers=section.n_layers, n_heads=section.n_heads,
                           n_kv_heads=section.n_kv_heads, vocab_size=vocab, multiple_of=section.multiple_of,
                           ffn_dim_multiplier=section.ffn_dim_multiplier, norm_eps=section.norm_eps,
                           rope_theta=section.rope_theta, max_seq_len=section.max_seq_len,
                           tie_embeddings=section.tie_embeddings)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def init_weights(model: Transformer, std: float, seed: int) -> None:
    """Normal(0, std) weights, the residual projections (wo, w2) scaled down by sqrt(2 * layers) as in GPT-2,
    unit norms; seeded, so every rank starts from the same weights before they are sharded."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = std / (2 * model.config.n_layers) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                s = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=generator) * s)


def _tokenizer_named(info: dict) -> str:
    return f"{info.get('spec') or info.get('class')} (vocab_size {info.get('vocab_size')})"


def check(config: TrainConfig, world_size: int | None = None) -> tuple[ModelConfig, object]:
    """Everything that can fail before compute: returns (model config, shards). run.dir is made here, last, so that
    one that cannot be is refused before any worker starts, and a config refused for anything else leaves none."""
    t, p = config.training, config.parallel
    shards = open_shards(config.data.shards, config.data.verify)
    if config.data.anneal_shards:
        anneal = open_shards(config.data.anneal_shards, config.data.verify)
        ours, theirs = _tokenizer_named(shards.tokenizer), _tokenizer_named(anneal.tokenizer)
        if ours != theirs:
            raise ConfigError(f"data.anneal_shards were tokenized with {theirs}, data.shards with {ours}: tokenize "
                              "both with one tokenizer")
    model_config = build_model_config(config.model, shards.tokenizer.get("vocab_size"))
    vocab = shards.tokenizer.get("vocab_size") or 0
    if vocab > model_config.vocab_size:
        raise ConfigError(f"model: vocab_size {model_config.vocab_size} is smaller than the shards' tokenizer's {vocab}")
    longest = max([t.seq_len] + [v for _, v in t.seq_len_schedule])
    if longest > model_config.max_seq_len:
        raise ConfigError(f"training.seq_len {longest} is longer than the model's context ({model_config.max_seq_len});"
                          " shorten it or raise model.max_seq_len")
    if t.anneal_steps >= t.steps:
        raise ConfigError(f"training.anneal_steps {t.anneal_steps} must be fewer than training.steps {t.steps}")
    if t.anneal_steps and t.warmup_steps + t.anneal_steps > t.steps:
        # the learning rate had gone on rising into the anneal, which then started from the peak
        raise ConfigError(f"training.warmup_steps {t.warmup_steps} and anneal_steps {t.anneal_steps} overlap in "
                          f"{t.steps} steps; make them add up to at most training.steps")
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    degrees = p.pp * p.tp * p.dp_replicate * (p.dp if p.dp > 0 else 1)
    if (p.dp > 0 and degrees != world) or (p.dp <= 0 and world % degrees):
        raise ConfigError(f"parallel: pp {p.pp} x dp_replicate {p.dp_replicate} x dp {p.dp} x tp {p.tp} does not "
                          f"match the world size {world}")
    if p.tp > 1 and (model_config.n_heads % p.tp or model_config.kv_heads % p.tp):
        raise ConfigError(f"parallel.tp {p.tp} does not divide the model's heads ({model_config.n_heads} query, "
                          f"{model_config.kv_heads} key/value)")
    for name in ("tp", "pp"):  # a stage's embedding and output would each train a copy of the one table
        if getattr(p, name) > 1 and model_config.tie_embeddings:
            raise ConfigError(f"parallel.{name} > 1 needs untied embeddings (model.tie_embeddings = false)")
    if p.tp > 1:
        # sequence-parallel norms split each sequence over the ranks, and the feed-forward its hidden width
        for length in {t.seq_len, *(v for _, v in t.seq_len_schedule)}:
            if length % p.tp:
                raise ConfigError(f"training.seq_len {length} does not split over parallel.tp {p.tp} ranks")
        if model_config.hidden_dim % p.tp:
            raise ConfigError(f"parallel.tp {p.tp} does not divide the model's feed-forward width "
                              f"{model_config.hidden_dim}")
        if t.compile:
            # torch 2.13's compiled DTensor blocks fail their first backward ("'Tensor' object has no attribute
            # '_local_tensor'" in redistribute), after the model and data have been set up on every rank
            raise ConfigError(f"training.compile does not work with parallel.tp {p.tp} in this torch "
                              f"({torch.__version__}): turn one of them off")
    stages = p.pp * (2 if p.pp_schedule == "Interleaved1F1B" else 1)
    if p.pp > 1 and model_config.n_layers < stages:
        raise ConfigError(f"parallel.pp {p.pp} under {p.pp_schedule} is {stages} stages, more than the model's "
                          f"{model_config.n_layers} layers")
    n_micro = p.pp_microbatches or p.pp
    if p.pp > 1 and p.pp_schedule == "1F1B" and n_micro < p.pp:
        raise ConfigError(f"parallel.pp_microbatches {n_micro} is fewer than the {p.pp} stages 1F1B needs")
    if p.pp > 1 and t.micro_batch_size:
        raise ConfigError("training.micro_batch_size does not apply with parallel.pp > 1: the pipeline cuts each "
                          "rank's batch into parallel.pp_microbatches")
    dp = world // (p.pp * p.tp)
    for b in [t.batch_size] + [v for _, v in t.batch_size_schedule]:
        if b % dp:
            raise ConfigError(f"training.batch_size {b} does not split over {dp} data-parallel ranks")
        split, into = (n_micro, "parallel.pp_microbatches") if p.pp > 1 else (t.micro_batch_size, None)
        if split and (b // dp) % split:
            what = f"{into} {split}" if into else f"training.micro_batch_size {split}"
            raise ConfigError(f"{what} does not divide the {b // dp} sequences per rank of training.batch_size {b}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # the ranks that share this machine's memory
    _check_memory(model_config, world, p.dp_replicate, local)
    _check_batch_memory(t, dp, local)
    _make_run_dir(Path(config.run.dir))
    return model_config, shards


def _make_run_dir(run_dir: Path) -> None:
    try:
        make_directory(run_dir, "run.dir")
    except OSError as e:
        raise ConfigError(str(e)) from None


def _check_memory(model_config: ModelConfig, world: int, replicas: int, local: int) -> None:
    """Refuse, before the model is built, a run whose training state cannot fit in this machine's memory. Each rank
    builds the whole model in float32 before it is sharded, and then holds its share of 16 bytes a parameter
    (float32 weights, gradients, AdamW's two moments); the ranks of this machine share its memory (on a GPU, the
    state is the GPU's to hold: only the first is counted). Activations come on top."""
    from herd.model.summary import parameter_count

    n = parameter_count(model_config)
    shards = world // replicas  # the ranks one copy of the state is split over
    per_rank = 4 * n if torch.cuda.is_available() else max(4 * n, 16 * n // shards)
    require_memory(local * per_rank, f"model: {n / 1e9:.2f}B parameters need at least {{}} of memory to train here "
                   f"({local} rank{'s' * (local > 1)}, 16 bytes a parameter: float32 weights, gradients and AdamW's "
                   "moments)", "make the model smaller (model.dim, model.n_layers) or shard it over more machines")


# Bytes a token of a batch takes while it is packed (herd.train.data.pack): int64 tokens, labels and document ids,
# the window index, and the temporaries that gather them.
PACKED_TOKEN_BYTES = 80


def _check_batch_memory(t: TrainingSection, dp: int, local: int) -> None:
    """Refuse a batch whose token buffers alone cannot fit in memory: packing one of 1e8 sequences had run for hours
    before the system killed it. Each rank packs its share of the largest batch at the longest sequence, and its share
    of a held-out batch."""
    rows = max([t.batch_size] + [v for _, v in t.batch_size_schedule]) // dp
    seq_len = max([t.seq_len] + [v for _, v in t.seq_len_schedule])
    held_out = t.batch_size // dp * t.seq_len
    require_memory(local * PACKED_TOKEN_BYTES * (rows * seq_len + held_out),
                   f"training: a batch of {rows} sequences of {seq_len} tokens per rank needs {{}} of memory to pack "
                   f"({local} rank{'s' * (local > 1)})", "lower training.batch_size or training.seq_len")


def require_memory(needed: int, what: str, advice: str) -> None:
    """A ConfigError where `needed` bytes do not fit in the memory this process may still take: past it the system
    kills a run without a word. `what` says what needs them, its {} where the amount goes."""
    from herd.quant.load import shortfall

    available = shortfall(needed)
    if available is not None:
        gb = 2**30
        raise ConfigError(f"{what.format(f'{needed / gb:.1f} GiB')} but {available / gb:.1f} GiB are available: {advice}")


def make_export(model_config: ModelConfig, tokenizer, fmt: str):
    """The Trainer's final step: rank 0 writes the weights (averaged when asked) and tokenizer into run.dir."""
    from herd.train.checkpoint import export_model

    def export(trainer) -> None:
        if trainer.is_main:
            steps = [path for _, path in trainer.checkpointer.steps()]
            n = max(trainer.config.checkpoint.average_last, 1)
            export_model(trainer.run_dir, steps[-n:], model_config, tokenizer, fmt)
            trainer.log.note(f"exported {'the average of ' + str(n) + ' checkpoints' if n > 1 else 'the weights'} "
                             f"to {trainer.run_dir} ({fmt})")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    return export


def pretrain(config: TrainConfig) -> dict:
    from herd.data.shards import load_tokenizer
    from herd.train.loop import Trainer, autocast_dtype
    from herd.train.metrics import flops_per_token, measure_peak_flops
    from herd.train.parallel import parallelize

    model_config, shards = check(config)
    env = DistEnv.from_environment(config.parallel)
    torch.manual_seed(config.training.seed)
    model = Transformer(model_config)
    init_weights(model, config.model.init_std, config.training.seed)
    parts, pipeline = parallelize(model, env, config)
    anneal = open_shards(config.data.anneal_shards) if config.data.anneal_shards else None
    batches = PackedBatches(shards, config.training, held_out=config.data.held_out, dp_rank=env.dp_rank,
                            dp_size=env.dp, anneal=anneal)
    # a pipeline cuts each rank's batch into its own micro-batches, in evaluation as in training
    eval_training = dataclasses.replace(config.training, micro_batch_size=None) if pipeline else config.training
    eval_batches = held_out_batches(shards, eval_training, config.data.held_out, config.run.eval_batches,
                                    env.dp_rank, env.dp)
    try:
        tokenizer = load_tokenizer(shards.tokenizer["spec"])
    except Exception as error:  # noqa: BLE001 - weights still export; only the tokenizer is missing
        tokenizer = None
        if env.rank == 0:  # a run directory without one had failed only when loaded, with no word of why
            print(f"herd train: the shards' tokenizer ({shards.tokenizer['spec']}) cannot be loaded "
                  f"({str(error).splitlines()[0] if str(error) else type(error).__name__}): the exported model "
                  "will hold no tokenizer; put one beside its weights to use it", file=sys.stderr, flush=True)
    peak = config.run.peak_flops
    if not peak:
        # The ceiling of the precision the run computes in: a float32 peak under bf16 autocast read ~15x high on a
        # GPU.
        dtype = autocast_dtype(config.training.dtype, env.device) or torch.float32
        peak = measure_peak_flops(env.device, dtype)
        if env.rank == 0:
            print(f"herd train: MFU is against a {str(dtype).removeprefix('torch.')} matmul peak of "
                  f"{peak / 1e12:.3g} TFLOP/s per device, measured now (set run.peak_flops to fix it)",
                  file=sys.stderr, flush=True)
    trainer = Trainer(config, parts, batches, env=env, pipeline=pipeline, eval_batches=eval_batches,
                      flops_per_token=functools.partial(flops_per_token, model_config), peak_flops=peak,
                      export=make_export(model_config, tokenizer, config.checkpoint.export_format),
                      record=to_toml(config))
    return trainer.fit()


def with_overrides(config, **sections) -> TrainConfig:
    """A copy of `config` with some fields of some sections replaced: with_overrides(c, training={"steps": 5})."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **fields)
                                          for name, fields in sections.items()})

