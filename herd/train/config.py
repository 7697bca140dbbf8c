"""Training configuration: dataclasses read from TOML, every field overridable on the command line.

A config is a dataclass whose fields are sections (themselves dataclasses of scalars, lists and optionals);
the TOML mirrors it one to one:

    [model]
    dim = 256
    [training]
    steps = 1000
    lr = 3e-4

`load_config(TrainConfig, "run.toml", ["--training.lr", "1e-3", "--parallel.tp=2"])` reads the TOML, applies the
overrides (values parsed as TOML literals, then converted to the annotated type) and returns the dataclass; an
unknown section or field, or a value of the wrong type, raises `ConfigError` with one line naming it. The loader
is generic: post-training recipes declare their own config dataclass reusing these sections (and adding their
own) and load it the same way. `to_toml(config)` writes a complete TOML back (what `--print-config` prints).
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.bounds import AT_LEAST_ONE, FRACTION, FRACTION_BELOW_ONE, NON_NEGATIVE, POSITIVE, check_shape, require


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending section, field or value."""


# ---------------------------------------------------------------- sections


# The fields of ModelSection a named configuration gives; vocab_size is the tokenizer's, where the shards name one.
MODEL_SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
               "rope_theta", "max_seq_len", "tie_embeddings")


@dataclass
class ModelSection:
    """A named configuration (herd.model.config.CONFIGS) or the shape given here; fields set to other values than
    these defaults override a name's. A field at its default is the name's: `--print-config` writes every field, and
    a file printed before a name was filled in must still build the named model."""

    name: str | None = None
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None
    vocab_size: int | None = None  # None: the shards' tokenizer's
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        check_shape(self)  # here too, so that --print-config refuses what the run would
        require(self, AT_LEAST_ONE, "vocab_size")
        require(self, POSITIVE, "init_std")


@dataclass
class DataSection:
    shards: str = ""  # a `herd data run` output directory
    held_out: float = 0.01  # fraction of documents kept out of training for evaluation
    anneal_shards: str = ""  # the high-quality mix for the final annealing stage ("" = keep `shards`)
    verify: bool = False  # check the shards' sha256 against the manifest before training

    def __post_init__(self):
        require(self, FRACTION_BELOW_ONE, "held_out")


@dataclass
class TrainingSection:
    steps: int = 1000
    batch_size: int = 8  # the global batch, in sequences, split across data-parallel ranks
    micro_batch_size: int | None = None  # sequences per forward on each rank (None: all at once)
    seq_len: int = 8192
    # Llama 3 grew the batch and the sequence during training: [[from_step, value], ...], later entries win.
    batch_size_schedule: list[list[int]] = field(default_factory=list)
    seq_len_schedule: list[list[int]] = field(default_factory=list)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    anneal_steps: int = 0  # the last steps: lr linearly to 0 (on data.anneal_shards, if given), as Llama 3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    dtype: str = "auto"  # auto (bf16 autocast where the hardware has fast bf16, else float32), float32, bfloat16
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self):
        require(self, AT_LEAST_ONE, "steps", "batch_size", "micro_batch_size", "seq_len")
        require(self, NON_NEGATIVE, "lr", "warmup_steps", "anneal_steps", "weight_decay", "grad_clip", "seed")
        require(self, FRACTION, "min_lr_ratio")
        require(self, FRACTION_BELOW_ONE, "beta1", "beta2")
        require(self, POSITIVE, "eps")
        for name in ("batch_size_schedule", "seq_len_schedule"):
            for entry in getattr(self, name):
                if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
                    raise ValueError(f"{name}: {entry} is not [from_step, value] with from_step >= 0 and value >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}: use auto, float32 or bfloat16")


@dataclass
class CheckpointSection:
    interval: int = 500  # steps between checkpoints (0: only at the end)
    keep: int = 3  # the newest K are kept
    async_save: bool = False
    average_last: int = 0  # export the average of the last N checkpoints' weights (Llama 3 annealing); 0: final
    export_format: str = "meta"  # the final weights with the tokenizer in run.dir: meta or hf
    # checklist.chk in each checkpoint (every file's MD5, the ranks hashing a share each), checked before a resume:
    # damaged bytes load without an error otherwise. It costs a read of the checkpoint at each save and load.
    checksums: bool = True

    def __post_init__(self):
        require(self, NON_NEGATIVE, "interval", "average_last")
        require(self, AT_LEAST_ONE, "keep")
        if self.export_format not in ("meta", "hf"):
            raise ValueError(f"export_format {self.export_format!r}; use meta or hf")


PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")  # torch.distributed.pipelining's, by name


@dataclass
class ParallelSection:
    dp: int = -1  # FSDP (sharded) data parallel degree; -1: what the world size leaves
    dp_replicate: int = 1  # replicated data parallel degree (HSDP); replicas are checksummed against each other
    tp: int = 1  # tensor parallel (DTensor, sequence-parallel norms)
    pp: int = 1  # pipeline parallel stages
    pp_schedule: str = "1F1B"  # 1F1B, GPipe, Interleaved1F1B
    pp_microbatches: int | None = None  # None: as many as stages
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0  # a collective hung this long fails the rank (and the launcher restarts the job)
    max_restarts: int = 3  # `--nproc`: restarts the launcher makes after a worker dies

    def __post_init__(self):
        require(self, AT_LEAST_ONE, "dp_replicate", "tp", "pp", "pp_microbatches")
        require(self, NON_NEGATIVE, "max_restarts")
        require(self, POSITIVE, "timeout_s")
        if self.dp == 0 or self.dp < -1:
            raise ValueError(f"dp must be at least 1, or -1 for what the world size leaves; got {self.dp}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"pp_schedule {self.pp_schedule!r}; use one of {', '.join(PP_SCHEDULES)}")


@dataclass
class RunSection:
    dir: str = "out/train"
    log_interval: int = 1
    eval_interval: int = 0  # steps between held-out evaluations (0: at the end only)
    eval_batches: int = 4
    tensorboard: bool = False
    progress: bool = True
    peak_flops: float | None = None  # per device, for MFU; None: measured (a matmul) at start-up
    time_limit_s: float = 0.0  # stop (checkpoint and export) after this long, wherever the schedule is (0: off)

    def __post_init__(self):
        require(self, AT_LEAST_ONE, "log_interval", "eval_batches")
        require(self, NON_NEGATIVE, "eval_interval", "time_limit_s")
        require(self, POSITIVE, "peak_flops")


@dataclass
class FaultSection:
    nonfinite: str = "skip"  # a NaN/Inf loss or gradient: skip the batch, or rollback to the last checkpoint
    spike_factor: float = 0.0  # a loss above factor x its running mean counts as a spike (0: off)
    spike_warmup: int = 20  # steps before spikes are judged
    # consecutive skipped or rolled-back steps, or rollbacks in a row that never get past the step that failed,
    # before the run gives up
    max_bad_steps: int = 5
    # a training step taking longer than this kills the rank so the launcher restarts (0: off); evaluations and
    # saves are not timed (collective time-outs catch a hang there)
    watchdog_s: float = 0.0
    checksum_interval: int = 0  # steps between cross-replica parameter checksums (0: off)

    def __post_init__(self):
        require(self, NON_NEGATIVE, "spike_factor", "spike_warmup", "watchdog_s", "checksum_interval")
        require(self, AT_LEAST_ONE, "max_bad_steps")
        if self.nonfinite not in ("skip", "rollback"):
            raise ValueError(f"nonfinite {self.nonfinite!r}; use skip or rollback")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)
    fault: FaultSection = field(default_factory=FaultSection)


# ---------------------------------------------------------------- loading


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """`cls` (a dataclass of sections) from the TOML at `path` (None: defaults) and `--section.field VALUE` args."""
    raw: dict[str, Any] = {}
    if path is not None:
        from herd.data.config import ConfigError as DataConfigError, read_toml

        try:
            raw = read_toml(path)
        except DataConfigError as e:
            raise ConfigError(str(e)) from None
    for key, value in parse_overrides(overrides or []):
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"--{key}: give --section.field VALUE")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--{key}: {section!r} is not a section")
        table[name] = _Override(value)
    return _build(cls, raw, "")


class _Override(str):
    """A value as typed on the command line, read by the field's type: text for a text field (a run.dir of
    "2024-01-01" or "1e3" had been read as a TOML date or number), a TOML literal otherwise."""


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """["--a.b", "1", "--c.d=2"] -> [("a.b", "1"), ("c.d", "2")]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            value = args[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


def _parse_literal(text: str) -> Any:
    """A TOML literal (3, 1e-3, true, [[0, 8]], "x"), or the text itself when it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build(cls: type, raw: dict, where: str, base: Any = None):
    """`cls` with the fields `raw` sets, the rest as in `base` (None: the class's defaults). A section is built on
    its parent's default for it, so that a recipe's own defaults (fine-tuning's learning rate) stay when one field
    of the section is set."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        kind = "field" if where else "section"
        raise ConfigError(f"unknown {kind} {where}{unknown[0]}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            section = getattr(base, name) if base is not None else _default(fields[name])
            kwargs[name] = _build(hints[name], value, f"{where}{name}.", section)
        else:
            kwargs[name] = _convert(value, hints[name], f"{where}{name}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {e}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def set_fields(section) -> set[str]:
    """The fields of `section` set to other values than its defaults."""
    defaults = type(section)()
    return {f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(defaults, f.name)}


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, _Override) and origin not in (typing.Union, types.UnionType):
        value = str(value) if hint in (str, bool) else _parse_literal(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a [{where}] table")
        return _build(hint, value, f"{where}.")
    if origin in (typing.Union, types.UnionType):
        if value == "none" or value == "None":
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


# ---------------------------------------------------------------- writing


def to_toml(config) -> str:
    """Every section and field, with its value; an unset optional, or a named model's field that is the name's, is
    written as a comment."""
    lines: list[str] = []
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        lines.append(f"[{f.name}]")
        # Written out, the defaults would override the name's values when the TOML is read back.
        named = isinstance(section, ModelSection) and section.name
        from_name = set(MODEL_SHAPE) - set_fields(section) if named else set()
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            if g.name in from_name:
                lines.append(f"# {g.name} =  ({section.name}'s)")
            elif value is None:
                lines.append(f"# {g.name} =  (unset)")
            else:
                lines.append(f"{g.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
