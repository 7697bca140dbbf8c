"""A checkpoint built into a model under a quantization scheme (what `herd.load(quantize=...)` runs)."""
from __future__ import annotations

import torch

from herd.checkpoint.base import Checkpoint
from herd.quant.blocks import BlockEmbedding, BlockLinear
from herd.quant.decode import use_decode_blocks
from herd.quant.gguf import block_weight
from herd.quant.kernel import ops
from herd.quant.schemes import Scheme, apply_scheme, install

STORED = Scheme("stored")  # a `herd quantize` output, computed on as it was written


def resolve(quantize: str | Scheme | None, ckpt: Checkpoint, device: torch.device) -> Scheme | None:
    """"auto": a model quantized by `herd quantize` as stored; a GGUF's own blocks where herd's kernel runs
    (measured fastest: the shipped weights exactly, or rounded to int8 blocks for types that do not fit herd's, see
    herd.quant.gguf); else the stored precision, since expanding blocks on every call loses to one float32 matmul."""
    if isinstance(quantize, Scheme) or quantize is None:
        return quantize
    if quantize == "auto":
        kinds = {kind for kind, _ in ckpt.blocks.values()}
        if "herd" in kinds:
            return STORED
        return Scheme("gguf") if kinds and device.type == "cpu" and ops() is not None else None
    if quantize == "none":
        return None
    return Scheme.parse(quantize)


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


def build_quantized(ckpt: Checkpoint, quantize: str | Scheme | None, device, tokenizer=None):
    from herd.checkpoint import build_model

    device = torch.device(device)
    scheme = resolve(quantize, ckpt, device)
    if scheme is None:
        return build_model(ckpt, device)
    if scheme.kind in ("gguf", "stored"):
        modules = _gguf_modules(ckpt, scheme) if scheme.kind == "gguf" else {n: m for n, (k, m) in ckpt.blocks.items()}
        model = build_model(ckpt, device, skip=frozenset(modules))
        model = install(model, {name: module.to(device) for name, module in modules.items()})
    else:
        model = build_model(ckpt, device)
        hessians = None
        if scheme.method == "gptq":
            from herd.quant.calibration import calibration_hessians

            hessians = calibration_hessians(model, tokenizer or ckpt.tokenizer, scheme)
        model = apply_scheme(model, scheme, hessians)
    return use_decode_blocks(model) if device.type == "cpu" else model
