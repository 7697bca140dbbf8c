"""Hugging Face's layout: config.json plus (sharded) safetensors, with q/k rows in half-split rotary order."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from herd.atomic import save_safetensors
from herd.checkpoint.base import Checkpoint, LazyStateDict, LazyTensor, check_shapes, expected_shapes
from herd.checkpoint.errors import CheckpointError, read_json_object
from herd.model.config import ModelConfig, RopeScaling

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# The dtypes of safetensors headers (get_dtype()), as torch's.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_META_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
_META_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}


def meta_name(hf_name: str) -> str | None:
    """Meta's name for a HF tensor; None for tensors that are not weights (old checkpoints' rotary tables)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    return hf_name  # left as is, so the shape check reports it as unexpected


def hf_name(name: str) -> str:
    if name in _META_TOP_NAMES:
        return _META_TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{_META_LAYER_NAMES[rest]}"


# ---------------------------------------------------------------- the rotary permutation
# Meta rotates adjacent pairs (x[2i], x[2i+1]); HF rotates halves (x[i], x[i + d/2]). Converting reorders each
# head's rows; both directions are pure index shuffles, so a round trip is bit-exact.


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(name: str, config: ModelConfig) -> int | None:
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.kv_heads
    return None


# ---------------------------------------------------------------- config.json


def _rope(cfg: dict, where: str) -> tuple[dict, RopeScaling | None]:
    """config.json's rotary settings (transformers 5's rope_parameters, 4's rope_scaling) and the scaling they ask."""
    rope: dict = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = cfg.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: config.json's {key} is a JSON {type(value).__name__}, not an object")
        rope |= value
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return rope, None
    if kind != "llama3":
        raise CheckpointError(f"{where}: config.json asks for rope type {kind!r}; only 'llama3' scaling is supported")
    try:
        return rope, RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json's llama3 rope scaling lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json's rope scaling is invalid ({e})") from None


def config_from_hf(cfg: dict, where: str) -> ModelConfig:
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: config.json is for a {cfg.get('model_type')!r} model; only Llama models load")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{where}: config.json sets {flag}; Llama 3 has no biases, this model cannot load")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):  # one function, two names
        raise CheckpointError(f"{where}: config.json's hidden_act is {cfg['hidden_act']!r}; Llama uses silu")
    rope, scaling = _rope(cfg, where)
    try:
        config = ModelConfig(
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            ffn_hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json lacks {e.args[0]!r}; it is not a Llama config") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json is inconsistent ({e})") from None
    if cfg.get("head_dim") not in (None, config.head_dim):
        raise CheckpointError(
            f"{where}: config.json's head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads; unsupported"
        )
    return config


def hf_config(config: ModelConfig, dtype: torch.dtype, tokenizer) -> dict:
    rope = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        # transformers 4 reads rope_theta / rope_scaling, transformers 5 rope_parameters: write both.
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "rope_parameters": {"rope_type": "default", **(rope or {}), "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": getattr(tokenizer, "eos_id", None),
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ---------------------------------------------------------------- loading


def _weight_files(directory: Path) -> dict[str, Path]:
    """Which file holds each HF tensor name."""
    index = directory / INDEX
    if index.is_file():
        weight_map = read_json_object(index, "download it again").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: no weight_map of tensor names to files; download it again")
        files = {name: directory / file for name, file in weight_map.items()}
        # Files of the checkpoint's own: a name climbing out of it or absolute had read any file the user can
        # (links stay followed: a hub cache's snapshot links every file to its blobs/).
        outside = next((f for f in weight_map.values()
                        if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == ".."), None)
        if outside is not None:
            raise CheckpointError(f"{index}: lists {outside}, outside the checkpoint's directory; download it again")
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"{index}: lists {path.name}, which is missing; download every shard")
        return files
    single = directory / SINGLE
    if single.is_file():
        return {name: single for name in _open(single).keys()}
    others = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())  # a FIFO had hung the read
    if others:
        files = {}
        for name in others:
            files |= {key: directory / name for key in _open(directory / name).keys()}
        return files
    hint = " (pytorch_model.bin is not read: re-save it with safetensors)" if any(directory.glob("*.bin")) else ""
    raise CheckpointError(f"{directory}: config.json but no .safetensors weights{hint}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); it is truncated or damaged, "
            "download it again"
        ) from None


def load_hf(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    from herd.checkpoint.vocab import load_dir_tokenizer

    config_path = directory / "config.json"
    cfg = read_json_object(config_path, "it must be a Hugging Face config.json")
    config = config_from_hf(cfg, str(directory))
    quantized = directory / "quantized.safetensors"
    if quantized.is_file():  # written by `herd quantize`
        from herd.quant.store import load_quantized

        state, modules, scheme = load_quantized(quantized, dtype)
        if config.tie_embeddings and "output.weight" in state:
            # fp8 and int8-wo quantize the output layer but not the table it was tied to: the model computes with its
            # own output (which a tied config would drop when expanded or converted, taking the float table instead).
            config = config.replace(tie_embeddings=False)
        check_shapes(config, state, str(directory), "the config.json")
        tokenizer, note = load_dir_tokenizer(directory, prefer="tokenizer.json")
        blocks = {name: ("herd", module) for name, module in modules.items()}
        meta = {"quantization": scheme} | ({"tokenizer_note": note} if note else {})
        return Checkpoint(config, state, "hf", tokenizer, directory, meta, blocks)
    fp8 = _fp8_scaled(cfg, str(directory))
    files = _weight_files(directory)
    entries = {}
    unconverted = []   # the linear layers an FP8 release left in bf16 (its modules_to_not_convert)
    for path in sorted(set(files.values())):
        handle = _open(path)
        for name in handle.keys():
            if files.get(name) != path or fp8 and name.endswith(_FP8_SCALE):
                continue
            target = meta_name(name)
            if target is None:
                continue
            part = handle.get_slice(name)
            heads, stored = rotary_heads(target, config), SAFETENSORS_DTYPES.get(part.get_dtype())
            if stored is None or not stored.is_floating_point:  # integers would load as numbers nobody trained
                raise CheckpointError(f"{path}: tensor {name} is stored as {part.get_dtype()}, not as floating point; "
                                      "the file is damaged or not a Llama checkpoint")
            scale = f"{name}_scale" if fp8 and stored == torch.float8_e4m3fn else None
            if scale is not None and scale not in files:
                raise CheckpointError(f"{path}: {name} is FP8 but {scale} is missing; download every shard")
            read = _reader(path, name, heads) if scale is None else _fp8_reader(path, name, files[scale], scale, heads)
            entries[target] = LazyTensor(tuple(part.get_shape()), read, dtype,
                                         stored if scale is None else torch.float32)
            if fp8 and scale is None and len(part.get_shape()) == 2 and target != "tok_embeddings.weight":
                unconverted.append(target.removesuffix(".weight"))
    missing = sorted(n for n, p in files.items() if meta_name(n) and meta_name(n) not in entries
                     and not (fp8 and n.endswith(_FP8_SCALE)))
    if missing:
        raise CheckpointError(f"{files[missing[0]]}: tensor {missing[0]} is listed in the index but not in the file")
    state = LazyStateDict(entries)
    if config.tie_embeddings:
        if "output.weight" in state:  # del, not pop: pop would read the tensor only to drop it
            del state["output.weight"]
    check_shapes(config, state, str(directory), "the config.json")
    tokenizer, note = load_dir_tokenizer(directory, prefer="tokenizer.json")
    meta = {"files": len(set(files.values())), "dtype": cfg.get("torch_dtype") or cfg.get("dtype")}
    meta |= {"tokenizer_note": note} if note else {}
    meta |= {"fp8_unconverted": sorted(n for n in unconverted if f"{n}.weight" in state)} if fp8 else {}
    return Checkpoint(config, state, "hf", tokenizer, directory, meta)


# Meta's FP8 release of Llama 3.1 (quant_method "fbgemm_fp8"): each quantized linear's weight is e4m3 codes
# beside a "<name>_scale" of one float32 per output row; the layers listed in modules_to_not_convert stay bf16.
_FP8_SCALE = ".weight_scale"


def _fp8_scaled(cfg: dict, where: str) -> bool:
    """Whether config.json declares Meta's FP8 weights; CheckpointError for any other quantization."""
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method in (None, "fbgemm_fp8"):
        return method is not None
    raise CheckpointError(f"{where}: config.json says the weights are quantized with {method!r}; herd reads float "
                          "and FP8 (fbgemm_fp8) Hugging Face weights, GGUF files and `herd quantize` output: use one "
                          "of those copies of this model")


def _fp8_reader(path: Path, name: str, scale_path: Path, scale_name: str, heads: int | None):
    """The weight as float32, codes times their row's scale (an e4m3 code times a float32 scale rounds once);
    `herd.load(..., quantize="fp8")` turns it back into the same codes where a row's largest code is 448."""
    def read() -> torch.Tensor:
        codes = _reader(path, name, None)()
        scale = _reader(scale_path, scale_name, None)().float().reshape(-1, 1)
        if scale.shape[0] != codes.shape[0]:
            raise CheckpointError(f"{scale_path}: {scale_name} has {scale.shape[0]} scales for {codes.shape[0]} rows")
        weight = codes.float() * scale
        return weight if heads is None else to_meta_rows(weight, heads)

    return read


def _reader(path: Path, name: str, heads: int | None):
    def read() -> torch.Tensor:
        # Opened per tensor with pread: no mapping of the whole file stays resident while the model is built.
        with safe_open(str(path), framework="pt", device="cpu", backend="pread") as f:
            tensor = f.get_tensor(name)
        return tensor if heads is None else to_meta_rows(tensor, heads)

    return read


# ---------------------------------------------------------------- saving


def save_hf(ckpt: Checkpoint, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    config, state = ckpt.config, ckpt.state_dict
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[Path] = []
    total = shard_bytes = 0
    dtype = None

    def flush():
        nonlocal shard, shard_bytes
        path = directory / f"model-{len(files) + 1:05d}.safetensors.part"
        save_safetensors(shard, path, metadata={"format": "pt"})
        files.append(path)
        weight_map.update({name: path.name for name in shard})
        shard, shard_bytes = {}, 0

    for name in expected_shapes(config):
        tensor = state[name]
        dtype = dtype or tensor.dtype
        heads = rotary_heads(name, config)
        tensor = (to_hf_rows(tensor, heads) if heads else tensor).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[hf_name(name)] = tensor
        shard_bytes += size
        total += size
    flush()
    names = {p.name: _shard_name(i, len(files)) for i, p in enumerate(files)}
    for path in files:
        path.rename(directory / names[path.name])
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(hf_config(config, dtype, ckpt.tokenizer), indent=2) + "\n")
    from herd.checkpoint.vocab import write_tokenizer

    write_tokenizer(ckpt, directory, "hf")


def _shard_name(i: int, n: int) -> str:
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
