"""A checkpoint built into a model under a quantization scheme (what `herd.load(quantize=...)` runs)."""
from __future__ import annotations

import ctypes
import dataclasses
import math
import re
from pathlib import Path

import torch

from herd.checkpoint.base import Checkpoint, LazyStateDict, expected_shapes
from herd.quant.blocks import BlockEmbedding, BlockLinear
from herd.quant.decode import use_decode_blocks
from herd.quant.gguf import block_weight
from herd.quant.kernel import ops
from herd.quant.schemes import Scheme, install, quantize_layers

STORED = Scheme("stored")  # a `herd quantize` output, computed on as it was written


def resolve(quantize: str | Scheme | None, ckpt: Checkpoint, device: torch.device) -> Scheme | None:
    """"auto": a model quantized by `herd quantize` as stored; a GGUF's own blocks where herd's kernel runs
    (measured fastest: the shipped weights exactly, or rounded to int8 blocks for types that do not fit herd's, see
    herd.quant.gguf); else the stored precision, since expanding blocks on every call loses to one float32 matmul."""
    if quantize is None or quantize == "none":
        return None
    if quantize == "auto":
        kinds = {kind for kind, _ in ckpt.blocks.values()}
        if "herd" in kinds:
            return STORED
        return Scheme("gguf") if kinds and device.type == "cpu" and ops() is not None else None
    scheme = quantize if isinstance(quantize, Scheme) else Scheme.parse(quantize)
    if scheme.kind == "gguf" and any(kind == "herd" for kind, _ in ckpt.blocks.values()):  # had been a TypeError
        raise ValueError("quantize 'gguf' computes a GGUF file's own blocks, and this is a `herd quantize` "
                         "directory: load it as stored (quantize 'auto'), or give another scheme")
    if scheme.kind == "fp8" and not scheme.keep and "fp8_unconverted" in ckpt.meta:
        # Meta's FP8 release leaves some layers in bf16 (the first and last blocks' attention, the output layer), as
        # transformers and vLLM keep them: "fp8" then computes the release as published, given by name or as the
        # Scheme `herd quantize` passes (which had quantized those layers too).
        return dataclasses.replace(scheme, keep=tuple(ckpt.meta["fp8_unconverted"]))
    return scheme


def _gguf_modules(ckpt: Checkpoint, scheme: Scheme) -> dict[str, torch.nn.Module]:
    """The GGUF's quantized tensors as modules computing on their blocks, except those the scheme keeps (expanded
    to float32 by build_model like the file's float tensors). A tied output layer is the embedding table: keeping
    either keeps both."""
    tied = ckpt.config.tie_embeddings and "tok_embeddings.weight" in ckpt.blocks
    names = [name.removesuffix(".weight") for name in ckpt.blocks] + (["output"] if tied else [])
    scheme.check_keep(names)
    modules = {}
    for name, (kind, raw) in ckpt.blocks.items():
        base = name.removesuffix(".weight")
        if scheme.keeps(base) or (tied and base == "tok_embeddings" and scheme.keeps("output")):
            continue
        weight = block_weight(kind, raw)
        modules[name] = BlockEmbedding(weight) if name == "tok_embeddings.weight" else BlockLinear(weight, scheme=kind)
    return modules


def build_quantized(ckpt: Checkpoint, quantize: str | Scheme | None, device, tokenizer=None, *,
                    dtype: torch.dtype = torch.float32):
    """The model of `ckpt` under `quantize`, its float tensors in `dtype`."""
    from herd.checkpoint import build_model

    device = torch.device(device)
    scheme = resolve(quantize, ckpt, device)
    _check_fits(ckpt, scheme, dtype, device)
    if scheme is None:
        return build_model(ckpt, device)
    if scheme.kind in ("gguf", "stored"):
        modules = _gguf_modules(ckpt, scheme) if scheme.kind == "gguf" else {n: m for n, (k, m) in ckpt.blocks.items()}
        model = build_model(ckpt, device, skip=frozenset(modules))
        model = install(model, {name: module.to(device) for name, module in modules.items()})
    else:
        modules = _quantized_as_read(ckpt, scheme, device, tokenizer or ckpt.tokenizer)
        model = install(build_model(ckpt, device, skip=frozenset(modules)), modules)
        _return_freed_memory()
    if device.type != "cpu":
        return model
    _pack_at_first_forward(model)
    return use_decode_blocks(model)


def _pack_at_first_forward(model: torch.nn.Module) -> None:
    """At the model's first forward, pack every layer the kernel takes into its panels, which replace its rows, and
    hand the freed rows back to the system: freed layer by layer as each first ran, glibc kept most of them (Llama
    3.2 1B under int8: 2.1 GB resident after its first tokens, 1.6 GB, the size after the load, with this). Not at
    load: packing the default model takes longer than loading it."""
    def pack(module, args):
        handle.remove()
        for layer in module.modules():
            if isinstance(layer, BlockLinear):
                layer.computed()
        _return_freed_memory()

    handle = model.register_forward_pre_hook(pack)


def _quantized_as_read(ckpt: Checkpoint, scheme: Scheme, device: torch.device, tokenizer) -> dict[str, torch.nn.Module]:
    """The scheme's modules, each float weight read from the checkpoint (on `device`) only to be quantized: the
    model never holds its float weights (Llama 3.1 8B: 32 GB in float32, 8.5 in int8 blocks). GPTQ's calibration
    runs the model a block at a time beside it, through the blocks quantized so far (herd.quant.calibration)."""
    config = ckpt.config
    linears = _linear_names(config)
    if scheme.method == "gptq":
        from herd.quant.calibration import LayerwiseHessians

        calibration = LayerwiseHessians(ckpt, tokenizer, device, scheme.calibration)
        return quantize_layers(scheme, calibration.weight, linears, tied=config.tie_embeddings, table=True,
                               hessians=calibration, quantized=calibration.quantized)

    def weight(name: str) -> torch.Tensor:
        tied_output = name == "output.weight" and config.tie_embeddings
        _return_freed_memory()  # the last float weight's pages, before the next is read (see the function)
        # As stored (bfloat16, say): the quantizers take it to float32 a few rows at a time, where the whole of
        # 8B's output layer in float32 (2 GB) had been the load's largest allocation.
        return ckpt.state_dict.stored("tok_embeddings.weight" if tied_output else name).to(device)

    return quantize_layers(scheme, weight, linears, tied=config.tie_embeddings, table=True)


def _linear_names(config) -> list[str]:
    """The model's linear layers ("layers.0.attention.wq", ..., "output"), a tied output layer included."""
    return [name.removesuffix(".weight") for name, shape in expected_shapes(config).items()
            if len(shape) == 2 and name != "tok_embeddings.weight"] + (["output"] if config.tie_embeddings else [])


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system. Weights quantized one after another leave their codes among
    the freed float weights and temporaries, which glibc keeps mapped (the default model under int8: 700 MB resident
    after the load, 410 MB after this, in 20 ms); so do rows freed for panels."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


class ModelTooLarge(MemoryError):
    pass


def _check_fits(ckpt: Checkpoint, scheme: Scheme | None, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before reading a weight, a load that cannot fit in this machine's memory: the system would otherwise
    kill the process midway, without a word (Llama 3.1 8B in float32 is 32 GB; 70B even under int4, 54)."""
    if device.type != "cpu":
        return
    needed = memory_needed(ckpt, scheme, dtype)
    available = shortfall(needed)
    if available is None:
        return
    gb = 2**30
    held = f"in {str(dtype).removeprefix('torch.')}" if scheme is None else f"as {scheme.name}"
    smaller = {name: memory_needed(ckpt, Scheme.parse(name), dtype) for name in ("int8", "int4")}
    fits = [f"{name} (about {n / gb:.1f} GiB)" for name, n in smaller.items() if shortfall(n) is None and n < needed]
    if fits:
        advice = f"load it with quantize {' or '.join(fits)}, which quantize each weight as it is read"
    elif min(smaller.values()) < needed:
        advice = f"even int4 needs about {min(smaller.values()) / gb:.1f} GiB: run it on a machine with more memory"
    else:
        advice = "run it on a machine with more memory"
    raise ModelTooLarge(f"this model needs {needed / gb:.1f} GiB of memory {held} but {available / gb:.1f} GiB are "
                        f"available: {advice}")


def shortfall(needed: int) -> int | None:
    """The bytes available, where `needed` would not fit in them with a margin for the rest of the process; None
    where it fits, or where the system does not say."""
    available = available_memory()
    return available if available is not None and needed > 0.95 * available else None


def memory_needed(ckpt: Checkpoint, scheme: Scheme | None, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a load of `ckpt` under `scheme` holds at its peak. A GGUF's blocks: as herd holds them (one row of each
    converted) and the rest in `dtype`. Quantizing as it loads: the model as it will be held and the largest weight
    as it is read (as the checkpoint stores it, read into a buffer and then a tensor) and quantized. The quantized
    modules are built for one row of each weight (every format stores a row's codes, scales and mins with the row),
    in milliseconds; on the meta device torch's reference ops took seconds. The peaks measured on Llama 3.1 8B's
    shapes (README): int8 10.3 GB against 10.4 GiB estimated, int4 8.3 against 7.9."""
    config = ckpt.config
    shapes = expected_shapes(config)
    params = {name: math.prod(shape) for name, shape in shapes.items()}
    if scheme is None:
        return sum(params.values()) * dtype.itemsize
    if scheme.kind == "stored":
        return 0  # read already, as stored, after herd.quant.store checked that it fits
    if scheme.kind == "gguf":
        held = {name: block_weight(kind, raw[:1]).nbytes * raw.shape[0] for name, (kind, raw) in ckpt.blocks.items()
                if not scheme.keeps(name.removesuffix(".weight"))}
        return sum(held.values()) + sum(n for name, n in params.items() if name not in held) * dtype.itemsize

    def shape(name: str) -> tuple[int, ...]:
        return shapes.get(name, shapes["tok_embeddings.weight"])  # a tied output layer is the table

    rtn = dataclasses.replace(scheme, method="rtn")  # what GPTQ stores too
    modules = quantize_layers(rtn, lambda name: torch.zeros(1, shape(name)[1]), _linear_names(config),
                              tied=config.tie_embeddings, table=True, progress=False)
    quantized = sum(t.element_size() * t.numel() * shape(name)[0] for name, module in modules.items()
                    for t in module.buffers())
    rest = sum(n for name, n in params.items() if name not in modules) * dtype.itemsize
    largest = 2 * max(n * _stored_itemsize(ckpt, name) for name, n in params.items())
    if scheme.method == "gptq":  # a block's float matrices, their inputs' Hessians and the text's hidden states
        block = [name for name in params if name.startswith("layers.0.") and len(shapes[name]) == 2]
        largest += sum(params[name] * 4 + shapes[name][1] ** 2 * 8 for name in block)
        largest += 2 * scheme.calibration.tokens * config.dim * 4
    return quantized + rest + largest


def _stored_itemsize(ckpt: Checkpoint, name: str) -> int:
    """Bytes per element of weight `name` as the checkpoint stores it (read into a buffer, then a tensor, hence
    twice in memory_needed); bfloat16's 2, as checkpoints ship, where its header does not say."""
    state = ckpt.state_dict
    stored = state.stored_dtype(name) if isinstance(state, LazyStateDict) and name in state else None
    return stored.itemsize if stored is not None else 2


def available_memory() -> int | None:
    """Bytes this process may still allocate: the system's available memory, or less under a cgroup's limit; None
    where the system does not say."""
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    if not found:
        return None
    available = int(found.group(1)) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available
