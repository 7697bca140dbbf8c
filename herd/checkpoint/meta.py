"""Meta's layout: params.json plus consolidated.NN.pth, one file per model-parallel rank."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from herd.checkpoint.base import Checkpoint, LazyStateDict, LazyTensor, check_shapes, expected_shapes
from herd.checkpoint.checksums import write_checklist
from herd.checkpoint.errors import CheckpointError, read_json_object
from herd.model.config import CONFIGS, ModelConfig, RopeScaling

# How Meta's reference model splits each tensor across model-parallel ranks (llama_models/llama3/model.py):
# ColumnParallelLinear and VocabParallelEmbedding split their output rows, RowParallelLinear its input columns.
_ROW_PARALLEL = re.compile(r"\.(wo|w2)\.weight$")
_REPLICATED = re.compile(r"norm\.weight$")
# Llama 2's checkpoints kept the rotary table; it is computed, not learnt.
_IGNORED = {"rope.freqs"}
_DEFAULT_SCALING = RopeScaling()


def _released_factor(params: dict) -> float:
    """The rope scaling factor of the release whose shape `params` has. Meta's params.json carries none, and its
    reference code hard-codes 8, which Meta says is wrong for Llama 3.2 1B and 3B (32, as their Hugging Face
    config.json has it; llama-models#166): with 8, their output degrades past some 80K tokens (llama-models#241)."""
    shape = {key: params.get(key) for key in ("dim", "n_layers", "n_heads", "n_kv_heads")}
    for config in CONFIGS.values():
        if config.rope_scaling is not None and shape == {"dim": config.dim, "n_layers": config.n_layers,
                                                          "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads}:
            return config.rope_scaling.factor
    return _DEFAULT_SCALING.factor


def split_dim(name: str) -> int | None:
    """The dim `name` is split along across ranks, None when every rank holds all of it."""
    if _REPLICATED.search(name):
        return None
    return 1 if _ROW_PARALLEL.search(name) else 0


# ---------------------------------------------------------------- params.json


def config_from_params(params: dict, where: str) -> ModelConfig:
    try:
        scaling = None
        if params.get("use_scaled_rope"):
            # A "rope_scaling" object (which herd writes) says it all; else the release's own factor.
            s = params.get("rope_scaling") or {}
            if not isinstance(s, dict):
                raise TypeError(f"rope_scaling is a JSON {type(s).__name__}, not an object")
            scaling = RopeScaling(
                factor=float(s.get("factor", _released_factor(params))),
                low_freq_factor=float(s.get("low_freq_factor", _DEFAULT_SCALING.low_freq_factor)),
                high_freq_factor=float(s.get("high_freq_factor", _DEFAULT_SCALING.high_freq_factor)),
                original_max_position=int(
                    s.get("original_max_position_embeddings", _DEFAULT_SCALING.original_max_position)
                ),
            )
        return ModelConfig(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=int(params.get("vocab_size", -1)),
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            # Meta's files name no context (its reference takes max_seq_len as an argument); herd's own say theirs
            max_seq_len=int(params.get("context_length", params.get("max_seq_len", _context(scaling)))),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: params.json lacks {e.args[0]!r}; it is not a Llama params.json") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: params.json is inconsistent ({e}); fix or replace it") from None


def params_from_config(config: ModelConfig, shards: int = 1) -> dict:
    """params.json for `config` split over `shards` files. With more shards than key-value heads each head is
    stored in several and counted once per copy, as Meta counts them (405B's mp16: 16 over 8 real heads), since
    its reference gives every rank n_kv_heads // world_size heads."""
    multiple_of, multiplier = _ffn_params(config)
    params = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": max(config.kv_heads, shards),
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None,
    }
    if config.max_seq_len != _context(config.rope_scaling):
        # Not "max_seq_len": Meta's Llama.build passes that beside the file's keys, which then fails as given twice.
        params["context_length"] = config.max_seq_len
    s = config.rope_scaling
    if s is not None and s != RopeScaling(factor=_released_factor(params)):  # what a reader would take it for
        params["rope_scaling"] = {
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    return params


def _context(scaling: RopeScaling | None) -> int:
    """The context a params.json that names none means: Llama 3.1's 128K with its rope scaling, else 3's 8K."""
    return 131072 if scaling else 8192


def _ffn_params(config: ModelConfig) -> tuple[int, float | None]:
    """multiple_of / ffn_dim_multiplier that Meta's formula turns into this config's SwiGLU width.

    HF and GGUF state the width outright; params.json can only say it through Meta's rounding formula.
    """
    hidden = config.hidden_dim
    base = config.replace(ffn_hidden_dim=None)
    candidates = [(base.multiple_of, base.ffn_dim_multiplier)]
    for multiple_of in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden % multiple_of == 0:
            exact = hidden / int(8 * config.dim / 3)
            candidates += [(multiple_of, None)] + [(multiple_of, round(exact, n)) for n in (1, 2, 3, 4, 6)]
            candidates.append((multiple_of, exact))
    for multiple_of, multiplier in candidates:
        if base.replace(multiple_of=multiple_of, ffn_dim_multiplier=multiplier).hidden_dim == hidden:
            return multiple_of, multiplier
    raise CheckpointError(f"no multiple_of / ffn_dim_multiplier gives a feed-forward width of {hidden}")


# ---------------------------------------------------------------- loading


def shard_paths(directory: Path) -> list[Path]:
    paths = sorted(directory.glob("consolidated.*.pth"))
    if not paths:
        raise CheckpointError(f"{directory}: params.json but no consolidated.00.pth; the weights are missing")
    for i, path in enumerate(paths):
        if path.name != f"consolidated.{i:02d}.pth":
            raise CheckpointError(
                f"{directory}: consolidated.{i:02d}.pth is missing (found {', '.join(p.name for p in paths)}); "
                "download every model-parallel shard"
            )
    return paths


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError… for a damaged file
        detail = str(e).split(". ")[0].splitlines()[0] if str(e) else "no detail"
        raise CheckpointError(
            f"{path}: cannot be read ({type(e).__name__}: {detail}); the file is truncated or damaged, download it again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if k not in _IGNORED}


def load_meta(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    params_path = directory / "params.json"
    params = read_json_object(params_path, "it must be Meta's params.json")
    config = config_from_params(params, str(directory))
    paths = shard_paths(directory)
    shards = [_load_shard(p) for p in paths]
    copies = _kv_copies(shards)
    if copies > 1 and config.kv_heads % copies == 0 and config.kv_heads >= len(shards):
        config = config.replace(n_kv_heads=config.kv_heads // copies)  # Meta counted each copy (405B's mp16)
    state = _merge(shards, paths, config, dtype)
    if config.vocab_size <= 0:
        config = config.replace(vocab_size=state.shape("tok_embeddings.weight")[0])
    if "output.weight" not in state or _same_tensor(shards, "output.weight", "tok_embeddings.weight"):
        # Meta's reference model always stores output.weight; Llama 3.2's small models store the embedding twice.
        config = config.replace(tie_embeddings=True)
        if "output.weight" in state:  # del, not pop: pop would read the tensor only to drop it
            del state["output.weight"]
    check_shapes(config, state, str(directory), "the params.json")
    from herd.checkpoint.vocab import load_dir_tokenizer

    tokenizer, note = load_dir_tokenizer(directory, prefer="tokenizer.model")
    meta = {"shards": len(paths)} | ({"tokenizer_note": note} if note else {})
    return Checkpoint(config, state, "meta", tokenizer, directory, meta)


def _merge(shards: list[dict], paths: list[Path], config: ModelConfig, dtype) -> LazyStateDict:
    names = list(shards[0])
    for shard, path in zip(shards[1:], paths[1:]):
        if set(shard) != set(names):
            odd = sorted(set(shard) ^ set(names))[0]
            raise CheckpointError(f"{path}: tensor {odd} is in one shard but not another; the shards do not belong together")
    entries = {}
    for name in names:
        parts = [s[name] for s in shards]
        if name.endswith(("attention.wk.weight", "attention.wv.weight")) and len(parts) > config.kv_heads:
            # More shards than key-value heads (405B's 16 over 8): each head is in len(parts) / kv_heads of them
            parts = parts[::len(parts) // config.kv_heads]
        dim = split_dim(name)
        if name == "tok_embeddings.weight" and len(parts) > 1 and parts[0].shape[1] * len(parts) == config.dim:
            dim = 1  # Llama 2's ParallelEmbedding split the embedding width, not the vocabulary
        if dim is None or len(parts) == 1:
            if dim is None and len(parts) > 1 and not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise CheckpointError(f"{paths[1]}: replicated tensor {name} differs between shards; the shards do not belong together")
            entries[name] = LazyTensor(tuple(parts[0].shape), lambda tensor=parts[0]: tensor, dtype, parts[0].dtype)
        else:
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            entries[name] = LazyTensor(tuple(shape), lambda parts=parts, dim=dim: torch.cat(parts, dim=dim), dtype,
                                       parts[0].dtype)
    return LazyStateDict(entries)


def _kv_copies(shards: list[dict]) -> int:
    """In how many consecutive shards each key-value head is stored: 1 unless there are more shards than heads."""
    names = ("layers.0.attention.wk.weight", "layers.0.attention.wv.weight")
    if len(shards) == 1 or not all(name in shards[0] for name in names):
        return 1
    same = [all(torch.equal(a[name], b[name]) for name in names) for a, b in zip(shards, shards[1:])]
    copies = 1
    while copies < len(shards) and same[copies - 1]:
        copies += 1
    if len(shards) % copies or any(same[i - 1] != (i % copies != 0) for i in range(1, len(shards))):
        return 1
    return copies


def _same_tensor(shards: list[dict], a: str, b: str) -> bool:
    """Whether two tensors hold the same values, compared in the mapped files (no conversion, no concatenation)."""
    if any(s[a].shape != s[b].shape for s in shards):
        return False
    # Untied models differ in their first row already; the full comparison only runs for tied ones.
    return all(torch.equal(s[a][0], s[b][0]) for s in shards) and all(torch.equal(s[a], s[b]) for s in shards)


# ---------------------------------------------------------------- saving


def save_meta(ckpt: Checkpoint, directory: Path, shards: int = 1) -> None:
    config = ckpt.config
    _check_divisible(config, shards)
    (directory / "params.json").write_text(json.dumps(params_from_config(config, shards), indent=2) + "\n")
    names = list(expected_shapes(config))
    if config.tie_embeddings:
        names.append("output.weight")  # Meta's reference model has no tie; it needs the matrix itself
    for rank in range(shards):
        state = {}
        for name in names:
            tied = name == "output.weight" and name not in ckpt.state_dict
            tensor = ckpt.state_dict["tok_embeddings.weight" if tied else name]
            dim = split_dim(name)
            if name.endswith(("attention.wk.weight", "attention.wv.weight")) and shards > config.kv_heads:
                tensor = tensor.chunk(config.kv_heads, dim=0)[rank * config.kv_heads // shards]  # replicated, as Meta
            elif dim is not None and shards > 1:
                tensor = tensor.chunk(shards, dim=dim)[rank]
            # clone: torch.save writes a view's whole storage, and the source may be a read-only mapping.
            state[name] = tensor.contiguous().clone()
        torch.save(state, directory / f"consolidated.{rank:02d}.pth")
        del state
    from herd.checkpoint.vocab import write_tokenizer

    write_tokenizer(ckpt, directory, "meta")
    write_checklist(directory)


def _check_divisible(config: ModelConfig, shards: int) -> None:
    if config.kv_heads % shards and shards % config.kv_heads:  # fewer heads than shards: each on several of them
        raise CheckpointError(f"cannot split kv heads {config.kv_heads} into {shards} model-parallel shards; pick a "
                              f"divisor or a multiple of {config.kv_heads}")
    for what, n in (("query heads", config.n_heads), ("vocab size", config.vocab_size),
                    ("ffn width", config.hidden_dim)):
        if n % shards:
            raise CheckpointError(f"cannot split {what} {n} into {shards} model-parallel shards; pick a divisor of {n}")
