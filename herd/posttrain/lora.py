"""LoRA and QLoRA, wrapped around the model's linear layers from outside (the model knows nothing of them).

A LoRA layer computes base(x) + (α / r) · B A x with the base frozen and only A [r, in] and B [out, r] trained;
B starts at zero, so training starts from the base model exactly. QLoRA keeps the frozen base weights quantized
(herd.quant's block layers: int8 per row or int4 per group of 32, a quarter or an eighth of float32's bytes): the forward runs the quantized kernel and the backward
needs only the input gradient, for which the weight is dequantized one layer at a time.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.bounds import FRACTION_BELOW_ONE, NON_NEGATIVE, POSITIVE, require
from herd.quant.blocks import BlockLinear, quantize_int4, quantize_int8

QUANTIZED = (BlockLinear,)
# QLoRA base formats: how a float weight becomes the frozen quantized one.
BASE_FORMATS = {"int8": quantize_int8, "int4": lambda weight: quantize_int4(weight, 32)}


@dataclass
class LoRAConfig:
    rank: int = 0                      # 0: no LoRA (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0               # on the adapters' input; dpo and ppo refuse it (TRL turns it off there)
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    quantize: str = "none"             # "int8" or "int4": QLoRA over quantized base weights

    def __post_init__(self):
        require(self, NON_NEGATIVE, "rank")
        require(self, POSITIVE, "alpha")
        require(self, FRACTION_BELOW_ONE, "dropout")
        if self.quantize != "none" and self.quantize not in BASE_FORMATS:
            raise ValueError(f"unknown LoRA base quantization {self.quantize!r}: use none, int8 or int4")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight [out, in] of a linear layer, quantized or not."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, BlockLinear):
        return layer.dequantized()
    raise TypeError(f"cannot read the weight of a {type(layer).__name__}")


class _FrozenQuantized(torch.autograd.Function):
    """y = base(x) with the input gradient only: quantized kernels have no autograd of their own."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx, grad):
        weight = dequantized_weight(ctx.layer)
        return (grad.to(weight.dtype) @ weight).to(grad.dtype), None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, name: str = "layer"):
        super().__init__()
        n_in, n_out = base.in_features, base.out_features
        if not 0 < rank <= min(n_in, n_out):
            raise ValueError(f"LoRA rank {rank} does not fit {name} ({n_in} -> {n_out}): "
                             f"use a rank between 1 and {min(n_in, n_out)}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        device = next(iter(base.buffers()), None)
        device = dequantized_weight(base).device if device is None else device.device
        self.lora_a = nn.Parameter(torch.empty(rank, n_in, device=device))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.in_features, self.out_features = n_in, n_out
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = _FrozenQuantized.apply(x, self.base) if isinstance(self.base, QUANTIZED) else self.base(x)
        if not self.enabled:
            return base
        # The adapter trains in float32 whatever the base computes in (as peft does): bf16 steps are too coarse for it.
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return base + update.to(base.dtype)

    def merged(self) -> nn.Linear:
        """A plain linear layer computing base + adapter in one weight."""
        weight = dequantized_weight(self.base).detach().float()
        dtype = self.base.weight.dtype if isinstance(self.base, nn.Linear) else torch.float32
        merged = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_(weight + (self.lora_b @ self.lora_a).float() * self.scale)
        return merged


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and wrap every linear layer named in `config.targets` (in place); returns the model.

    With config.quantize "int8" or "int4" each wrapped base layer is first quantized (QLoRA).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name not in config.targets or not isinstance(child, (nn.Linear, *QUANTIZED)):
                continue
            if config.quantize != "none" and isinstance(child, nn.Linear):
                child = BlockLinear(BASE_FORMATS[config.quantize](child.weight), scheme=config.quantize)
            where = f"{module_name}.{name}" if module_name else name
            setattr(module, name, LoRALinear(child, config.rank, config.alpha, config.dropout, name=where))
            wrapped += 1
    if not wrapped:
        raise ValueError(f"no linear layer is named any of {config.targets}; LoRA targets are layer names "
                         "such as wq, wk, wv, wo, w1, w2, w3, output")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its merged linear layer, in place; the result is a plain model again.

    An adapted output layer of a model with tied embeddings gets a weight of its own, and the model's config then
    says so: a config still tied would have the exported checkpoint read the embeddings for the output layer."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and model.output.weight is not model.tok_embeddings.weight:
        model.config = config.replace(tie_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, within the block: every LoRA layer computes its frozen base alone (PPO's reference without
    a second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


# herd's layer names as Hugging Face's Llama names its modules, which PEFT's target_modules list
_HF_MODULES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
               "w3": "up_proj", "output": "lm_head"}


def peft_base(model: str) -> str:
    """The base as PEFT's AutoPeftModel finds it: the default model's hub id ("default" named nothing to it), a path
    made absolute (a relative one named nothing from anywhere else), a hub id as given."""
    from herd.llm import _DEFAULT_ALIASES, DEFAULT_HUB_ID

    if model.lower() in _DEFAULT_ALIASES:
        return DEFAULT_HUB_ID
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def save_peft_adapter(model: nn.Module, config: LoRAConfig, directory: Path, base: str) -> None:
    """The adapters in PEFT's layout (adapter_config.json, adapter_model.safetensors), for the base model in Hugging
    Face's format: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), directory)`, vLLM's
    --lora-modules and torchtune read it. Written before merging, as torchtune writes its adapter beside the
    merged model. `base` goes to base_model_name_or_path. Query and key adapters' B rows are reordered as the
    base's own rows are for Hugging Face's rotary layout, so the adapter applies to the converted base exactly."""
    from herd.atomic import atomic_directory, save_safetensors
    from herd.checkpoint.hf import hf_name, rotary_heads, to_hf_rows

    tensors, targets = {}, set()
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        module = hf_name(f"{name}.weight").removesuffix(".weight")
        b = layer.lora_b.detach().float().cpu()
        if (heads := rotary_heads(f"{name}.weight", model.config)) is not None:
            b = to_hf_rows(b, heads)
        tensors[f"base_model.model.{module}.lora_A.weight"] = layer.lora_a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        targets.add(_HF_MODULES[name.rsplit(".", 1)[-1]])
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": peft_base(base),
                "r": config.rank,
                "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": sorted(targets),
                "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}
    with atomic_directory(Path(directory)) as tmp:
        save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (A and B of every layer), for saving beside a base checkpoint."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}
