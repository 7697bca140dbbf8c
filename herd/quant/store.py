"""A quantized model on disk: a Hugging Face directory (config.json, tokenizer) whose weights are one
`quantized.safetensors` of codes and scales, with the scheme, every quantized module, a SHA-256 per tensor and one
of all that (version 2) in its metadata. herd.load computes on it as stored; `herd convert` expands it back to float
weights.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from herd.atomic import save_safetensors
from herd.checkpoint.base import LazyStateDict, LazyTensor
from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.hf import SAFETENSORS_DTYPES
from herd.quant.blocks import BlockEmbedding, BlockLinear, BlockWeight, dequantize
from herd.quant.fp8 import FP8Linear, FP8Weight, dequantize_fp8

FILE = "quantized.safetensors"
KEY = "herd.quantization"
# 2: a SHA-256 of the header itself ("header_sha256") beside the tensors' (version 1, unnumbered, had only those), so
# that a changed scheme or module, which computes garbage without an error, fails the check as a changed tensor does.
VERSION = 2
KINDS = ("gguf", "int8", "int8-wo", "int4", "fp8")


def _hashed(items: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of `items` (name, tensor) and the SHA-256 of each one's bytes, hashed in place (no copy) on other
    threads while the next ones are read (hashlib lets go of the GIL). An 8B-shaped int8 file's 8.4 GB had taken
    11.3 s to hash after reading, one tensor at a time with a copy of each."""
    def digest(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()

    tensors, digests = {}, {}
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for name, tensor in items:
            tensors[name], digests[name] = tensor, pool.submit(digest, tensor)
    return tensors, {name: future.result() for name, future in digests.items()}


def save_quantized(model, scheme_dict: dict, path: Path) -> None:
    """Every tensor of `model` (quantized modules as codes/scales/mins, the rest as float) into one file."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, (BlockLinear, BlockEmbedding)):
            if name == "output" and isinstance(model.tok_embeddings, BlockEmbedding) and model.config.tie_embeddings:
                continue  # the tied output is the embedding table's blocks
            modules[name] = {"type": "embedding" if isinstance(module, BlockEmbedding) else "linear",
                             "bits": module.bits, "group": module.group, "integer": getattr(module, "integer", True)}
            tensors |= {f"{name}.{part}": t for part, t in module.weight_blocks.tensors().items()}
        elif isinstance(module, FP8Linear):
            modules[name] = {"type": "fp8"}
            tensors |= {f"{name}.codes": module.codes, f"{name}.scales": module.scales}
    tied = model.config.tie_embeddings
    for name, param in model.named_parameters(remove_duplicate=True):
        if not (tied and name == "output.weight"):
            tensors[name] = param.detach()
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {"version": VERSION, "scheme": scheme_dict, "modules": modules, "sha256": _hashed(tensors.items())[1]}
    header["header_sha256"] = _header_digest(header)
    save_safetensors(tensors, path, metadata={"format": "pt", KEY: json.dumps(header)})


def load_quantized(path: Path, dtype: torch.dtype | None) -> tuple[LazyStateDict, dict, dict]:
    """The file's float state dict (quantized weights expanded, for conversion), its quantized modules by
    parameter name, and its scheme; checksums are verified."""
    try:
        # Read, not mapped: the layers' panels replace their rows once the model runs, and rows mapped from the
        # file stayed resident beside them (an 8B-shaped int8 model: 13.5 GB after its first tokens, 9.0 read).
        with safe_open(str(path), framework="pt", device="cpu", backend="pread") as f:
            header = json.loads(f.metadata()[KEY])
            _check_header(path, header, {name: f.get_slice(name).get_shape() for name in f.keys()})
            _check_fits(path, f, header, dtype)
            tensors, digests = _hashed((name, f.get_tensor(name)) for name in f.keys())
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: not a readable herd quantized file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "it is truncated or damaged: quantize the model again"
        ) from None
    sums = header["sha256"]
    for name, digest in digests.items():
        if sums.get(name) != digest:
            raise CheckpointError(f"{path}: tensor {name} fails its SHA-256 check; the file was modified or damaged: "
                                  "quantize the model again")
    modules: dict[str, torch.nn.Module] = {}
    for name, spec in header["modules"].items():
        if spec["type"] == "fp8":
            codes, scales = tensors.pop(f"{name}.codes"), tensors.pop(f"{name}.scales")
            modules[f"{name}.weight"] = FP8Linear(FP8Weight(codes, scales))
            continue
        weight = BlockWeight(tensors.pop(f"{name}.codes"), tensors.pop(f"{name}.scales"),
                             tensors.pop(f"{name}.mins", None), spec["bits"], spec["group"])
        modules[f"{name}.weight"] = (BlockEmbedding(weight) if spec["type"] == "embedding"
                                     else BlockLinear(weight, integer=spec["integer"], scheme=header["scheme"]["kind"]))
    entries = {name: (t if dtype is None else t.to(dtype)) for name, t in tensors.items()}
    for name, module in modules.items():
        entries[name] = LazyTensor((module.out_features, module.in_features) if hasattr(module, "in_features")
                                   else (module.num_embeddings, module.embedding_dim), _expand(module))
    return LazyStateDict(entries), modules, header["scheme"]


def _header_digest(header: dict) -> str:
    """The SHA-256 of all the header records but this digest, as canonical JSON."""
    recorded = {key: value for key, value in header.items() if key != "header_sha256"}
    return hashlib.sha256(json.dumps(recorded, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_header(path: Path, header, shapes: dict[str, list[int]]) -> None:
    """Refuse, naming the field, a header herd cannot have written: a wrong group or bit width computes garbage
    without an error, and a wrong type had failed as some Python error naming no file."""
    def damaged(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {KEY} {field} {problem}; the file was modified or damaged: quantize the "
                               "model again")

    if not isinstance(header, dict):
        raise damaged("metadata", f"is {_shown(header)}, not an object")
    version = header.get("version", 1)
    if version not in (1, VERSION):
        raise damaged("version", f"is {_shown(version)}, not 1 or {VERSION}")
    for field in ("scheme", "modules", "sha256"):
        if not isinstance(header.get(field), dict):
            raise damaged(field, f"is {_shown(header.get(field))}, not an object")
    if header["scheme"].get("kind") not in KINDS:
        raise damaged("scheme.kind", f"is {_shown(header['scheme'].get('kind'))}, not one of {', '.join(KINDS)}")
    for name, spec in header["modules"].items():
        _check_module(f"modules.{name}", name, spec, shapes, damaged)
    if version == VERSION and header.get("header_sha256") != _header_digest(header):
        raise damaged("header_sha256", "does not match the header")


def _check_module(field: str, name: str, spec, shapes: dict[str, list[int]], damaged) -> None:
    """One quantized module's record against its tensors: blocks of `group` codes of `bits` along every row."""
    if not isinstance(spec, dict):
        raise damaged(field, f"is {_shown(spec)}, not an object")
    if spec.get("type") not in ("linear", "embedding", "fp8"):
        raise damaged(f"{field}.type", f"is {_shown(spec.get('type'))}, not linear, embedding or fp8")
    if (spec["type"] == "embedding") != (name == "tok_embeddings"):  # the module built is of the type it names
        raise damaged(f"{field}.type", f"is {_shown(spec['type'])}, but {name} is "
                                       f"{'the embedding table' if name == 'tok_embeddings' else 'a linear layer'}")
    if len(shapes.get(f"{name}.codes", ())) != 2 or f"{name}.scales" not in shapes:
        raise damaged(field, f"has no {name}.codes of rows by columns or no {name}.scales")
    if spec["type"] == "fp8":
        return
    bits, group = spec.get("bits"), spec.get("group")
    if type(bits) is not int or bits not in (4, 8):
        raise damaged(f"{field}.bits", f"is {_shown(bits)}, not 4 or 8")
    if type(spec.get("integer")) is not bool:
        raise damaged(f"{field}.integer", f"is {_shown(spec.get('integer'))}, not true or false")
    rows, width = shapes[f"{name}.codes"][0], shapes[f"{name}.codes"][-1] * (2 if bits == 4 else 1)
    if type(group) is not int or group < 1 or width % group:
        raise damaged(f"{field}.group", f"is {_shown(group)}, which does not divide the width {width}")
    if shapes[f"{name}.scales"] != [rows, width // group]:
        raise damaged(f"{field}.group", f"is {group}, but {name}.scales has shape {shapes[f'{name}.scales']}, "
                                        f"not {[rows, width // group]}")


def _shown(value) -> str:
    return "missing" if value is None else json.dumps(value)[:60]


def _check_fits(path: Path, f, header: dict, dtype: torch.dtype | None) -> None:
    """Refuse, before reading a tensor, a file whose load cannot fit in this machine's memory (the system would
    kill the process midway, without a word): its tensors as read, its float ones again where they are converted
    to `dtype`, and its largest tensor twice more for the first forward, which packs the layers for the kernel (an
    8B-shaped int8 file: 9.4 GiB estimated, 9.36 measured at its peak)."""
    from herd.quant.load import ModelTooLarge, shortfall

    sizes, converted = [], 0
    for name in f.keys():
        part = f.get_slice(name)
        elements, stored = math.prod(part.get_shape()), SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
        sizes.append(elements * stored.itemsize)
        floating = name.rsplit(".", 1)[0] not in header["modules"] and stored.is_floating_point
        if floating and dtype is not None and stored != dtype:
            converted += elements * dtype.itemsize
    needed = sum(sizes) + converted + 2 * max(sizes, default=0)
    available = shortfall(needed)
    if available is not None:
        gb, scheme = 2**30, header["scheme"].get("kind", "quantized")
        raise ModelTooLarge(f"{path}: this {scheme} model needs {needed / gb:.1f} GiB of memory but "
                            f"{available / gb:.1f} GiB are available: run it on a machine with more memory"
                            + ("" if scheme == "int4" else ", or quantize the float model with int4"))


def _expand(module):
    def load() -> torch.Tensor:
        if isinstance(module, FP8Linear):
            return dequantize_fp8(FP8Weight(module.codes, module.scales))
        return dequantize(module.weight_blocks)

    return load
