"""Quantization schemes by name, and applying one to a built model by swapping its linear layers from outside.

    gguf              compute on a GGUF's own Q4_0 / Q4_1 / Q8_0 / Q4_K blocks (other types stay float32)
    int8              int8 weights, one scale per block of 32 (as GGUF's Q8_0); a few generated tokens' activations
                      int8 per block of 32, except the inputs of the value and down projections (kept float: they
                      carry half the error, measured in README)
    int8-wo           int8 weights per output channel, float32 activations (weight-only)
    int4[-gN][-gptq]  4-bit weights with a scale and min per group of N = 32 (default), 64 or 128; round to nearest,
                      or GPTQ (errors minimised against calibration text); the output layer int8 per block of 32
    fp8               e4m3 weights with one scale per row, activations e4m3 with one scale per token
    auto              gguf for a GGUF stored quantized when herd's kernel is built; else the checkpoint's precision

int8 and int4 keep the embedding table in int8 blocks of 32 as well (tied: the output layer's own blocks).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from herd.quant.blocks import BlockEmbedding, BlockLinear, quantize_int4, quantize_int8

# Layers of the int8 scheme whose activations stay float32: quantizing their inputs costs the most (per-layer KL on
# the default model: the down projection's heavy-tailed SwiGLU products 0.0023, the value projection 0.0020, every
# other kind <= 0.0012), and their matmul is as fast on float activations (the weights are what is read).
INT8_FLOAT_ACTIVATIONS = ("*.feed_forward.w2", "*.attention.wv")
KINDS = ("gguf", "int8", "int8-wo", "int4", "fp8")
_NAME = re.compile(r"^(gguf|int8|int8-wo|fp8|int4(?:-g(\d+))?(-gptq|-rtn)?)$")


class SchemeError(ValueError):
    pass


@dataclass(frozen=True)
class Calibration:
    """The text GPTQ takes its Hessians on: `files`, plain text or JSON Lines with a "text" field on every line, one
    document each (none: the Apache License 2.0 that ships with herd, about 2,400 tokens); their first `tokens`
    tokens, each document from a BOS, in windows of `window`. GPTQ's paper calibrated on 128 x 2,048 tokens of C4;
    on two CPU cores every block runs its forward twice over them, so herd takes fewer by default."""

    files: tuple[str, ...] = ()
    tokens: int = 2048
    window: int = 512

    def __post_init__(self):
        if self.tokens < 1 or self.window < 1:
            raise SchemeError(f"calibration tokens and window must be positive, not {self.tokens} and {self.window}")


@dataclass(frozen=True)
class Scheme:
    """kind: gguf, int8, int8-wo, int4 or fp8; group: int4's group size; method: rtn or gptq (int4);
    keep: module-name patterns (fnmatch, e.g. "output" or "layers.0.*") left in float32; calibration: GPTQ's text."""

    kind: str
    group: int = 32
    method: str = "rtn"
    keep: tuple[str, ...] = ()
    calibration: Calibration = Calibration()

    def __post_init__(self):
        # A scheme's name given as its kind (Scheme("int4-g64-gptq")) had loaded without quantizing as asked.
        if self.kind not in (*KINDS, "stored"):  # stored: a `herd quantize` output, as written (herd.quant.load)
            hint = (f"use Scheme.parse({self.kind!r}) for a scheme's name" if _NAME.match(str(self.kind))
                    else f"use one of {', '.join(KINDS)}")
            raise SchemeError(f"Scheme kind {self.kind!r} is not a kind of scheme: {hint}")
        if self.group not in (32, 64, 128):
            raise SchemeError(f"int4 group size {self.group} is not supported: use 32, 64 or 128")
        if self.method not in ("rtn", "gptq") or self.method == "gptq" and self.kind != "int4":
            raise SchemeError(f"method {self.method!r} is not one {self.kind} takes: use rtn, or gptq with int4")

    @property
    def name(self) -> str:
        if self.kind != "int4":
            return self.kind
        return f"int4-g{self.group}" + ("-gptq" if self.method == "gptq" else "")

    @classmethod
    def parse(cls, name: str, keep: tuple[str, ...] = ()) -> Scheme:
        match = _NAME.match(name.strip().lower())
        if not match:
            raise SchemeError(
                f"unknown quantization scheme {name!r}: use gguf, int8, int8-wo, int4, int4-g64, int4-g128-gptq, fp8, "
                "auto or none"
            )
        if match.group(1).startswith("int4"):
            return cls("int4", int(match.group(2) or 32), "gptq" if match.group(3) == "-gptq" else "rtn", keep)
        return cls(match.group(1), keep=keep)

    def keeps(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep)

    def check_keep(self, names: list[str]) -> None:
        """A keep pattern that matches none of the layers the scheme would quantize is a typo, which would otherwise
        quantize everything without a word."""
        for pattern in self.keep:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                example = next((name for name in names if name.startswith("layers.")), names[0]) if names else ""
                named = f"they are named like {example} or {names[-1]}" if names else "it has none"
                raise SchemeError(f"keep pattern {pattern!r} matches no quantized layer of this model: {named} "
                                  "(fnmatch patterns: layers.0.*, *.feed_forward.*)")

    def to_dict(self) -> dict:
        recorded = {"kind": self.kind, "group": self.group, "method": self.method, "keep": list(self.keep)}
        if self.method == "gptq":
            recorded["calibration"] = {"files": [Path(f).name for f in self.calibration.files],
                                       "tokens": self.calibration.tokens, "window": self.calibration.window}
        return recorded


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantize_weight(scheme: Scheme, weight: torch.Tensor, hessian: torch.Tensor | None = None):
    """One float weight [N, K] in the scheme's stored form (a BlockWeight, or an FP8Weight)."""
    n, k = weight.shape
    if scheme.kind == "fp8":
        from herd.quant.fp8 import quantize_fp8

        return quantize_fp8(weight)
    if scheme.kind in ("int8", "int8-wo"):
        if k % 32:
            raise SchemeError(f"{scheme.kind} needs widths that are multiples of 32 (its kernel reads blocks of 32); "
                              f"this layer's is {k}: keep it in float (--keep) or use fp8")
        # With activation blocks of 32, a scale per row would add most of the error; int8-wo is per output channel.
        return quantize_int8(weight, 32 if scheme.kind == "int8" else None)
    if k % scheme.group:
        method = "-gptq" if scheme.method == "gptq" else ""  # the way out had dropped the method asked for
        fits = [("int4" if g == 32 else f"int4-g{g}") + method for g in (32, 64, 128) if k % g == 0]
        raise SchemeError(f"int4 group size {scheme.group} does not divide the layer width {k}: " + (
            f"use {' or '.join(fits)}" if fits else "no int4 group (32, 64, 128) does; keep it in float (--keep) or "
                                                    "use fp8"))
    if scheme.method == "gptq":
        from herd.quant.gptq import gptq_int4

        return gptq_int4(weight, hessian, scheme.group)
    return quantize_int4(weight, scheme.group)


def quantized_module(scheme: Scheme, stored, name: str) -> nn.Module:
    if scheme.kind == "fp8":
        from herd.quant.fp8 import FP8Linear

        return FP8Linear(stored)
    integer = scheme.kind != "int8-wo" and not (
        scheme.kind == "int8" and any(fnmatch.fnmatchcase(name, p) for p in INT8_FLOAT_ACTIVATIONS))
    return BlockLinear(stored, integer=integer, scheme=scheme.name)


def quantize_layers(scheme: Scheme, weight: Callable[[str], torch.Tensor], linears: list[str], *, tied: bool,
                    table: bool, hessians: Mapping[str, torch.Tensor] | None = None,
                    quantized: Callable[[str, nn.Module], None] | None = None,
                    progress: bool = True) -> dict[str, nn.Module]:
    """The scheme's modules for the linear layers named (except the `keep` ones) and, where `table`, the embedding
    table, by parameter name ("layers.0.attention.wq.weight"). `weight(name)` gives a float weight by parameter
    name; each is read when its turn comes and dropped once quantized, so a checkpoint quantized as it loads never
    holds all its float weights at once (8B's take 32 GB in float32). `quantized(name, module)`, where given, hears of
    each layer's module as soon as it is made (GPTQ's calibration computes the next layers' inputs with it).

    int8 and int4 hold the embedding table in int8 blocks of 32 too, as llama.cpp does (in float32 a 128K-token
    vocabulary takes 2 GB at the width of 8B, 1 GB at 1B's; in blocks 0.56 and 0.28). A tied output layer and the
    table are one table: keeping either keeps both, and the table's blocks serve as the output layer (`install`)."""
    table = table and scheme.kind in ("int8", "int4")
    scheme.check_keep(linears + (["tok_embeddings"] if tied or table else []))
    table_kept = scheme.keeps("tok_embeddings") or (tied and scheme.keeps("output"))
    modules: dict[str, nn.Module] = {}
    for name in tqdm(linears, desc="quantizing", unit="layer", leave=False, disable=None if progress else True):
        if scheme.keeps(name) or (name == "output" and table_kept):
            continue
        w = weight(f"{name}.weight").detach()
        if not bool(torch.isfinite(w).all()):  # a block or row would quietly become all NaN
            raise SchemeError(f"{name}.weight holds NaN or infinite values: the checkpoint is damaged; download or "
                              "convert it again")
        if scheme.kind == "int4" and name == "output":
            # Its logits are what sampling sees: kept at 8 bits, as llama.cpp keeps it at 6-8. On the default model
            # this takes int4-g32's KL from the float model from 0.049 to 0.006 nats/token (128 tokens of GPL-3).
            # Its activations are int8 blocks like the other layers' (see install).
            k = w.shape[1]
            modules[f"{name}.weight"] = BlockLinear(quantize_int8(w, 32 if k % 32 == 0 else None), integer=k % 32 == 0,
                                                    scheme="int8")
            continue
        stored = quantize_weight(scheme, w, (hessians or {}).get(name))
        modules[f"{name}.weight"] = quantized_module(scheme, stored, name)
        if quantized:
            quantized(name, modules[f"{name}.weight"])
    if table and not table_kept:
        output = modules.get("output.weight")
        if tied and isinstance(output, BlockLinear) and output.bits == 8 and output.integer:
            modules["tok_embeddings.weight"] = BlockEmbedding(modules.pop("output.weight").weight_blocks)
        elif not tied:
            w = weight("tok_embeddings.weight").detach()
            if w.shape[1] % 32 == 0:
                modules["tok_embeddings.weight"] = BlockEmbedding(quantize_int8(w, 32))
    return modules


def apply_scheme(model: nn.Module, scheme: Scheme, hessians: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace the model's linear layers (except the `keep` ones) and, under int8 and int4, its embedding table
    with the scheme's, in place (see quantize_layers)."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    modules = quantize_layers(scheme, lambda name: model.get_parameter(name), linear_names(model), tied=tied,
                              table=hasattr(model, "tok_embeddings"), hessians=hessians)
    return install(model, modules)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Put quantized modules into the model by parameter name ("layers.0.attention.wq.weight"); an embedding
    table in blocks also serves as the tied output layer. That layer takes int8 activation blocks like the others:
    with float ones a decode step of 16 sequences spent a third of its time in it (the widened codes' float
    multiply-adds), for 0.0008 nats/token less KL from the float model (0.0033 against 0.0041, README)."""
    for name, module in modules.items():
        set_module(model, name.removesuffix(".weight"), module)
        if isinstance(module, BlockEmbedding) and model.config.tie_embeddings:
            output = BlockLinear(module.weight_blocks, scheme="tied")
            set_module(model, "output", output)
            module.tie(output)
    return model
