"""int8 weights, one scale per output channel.

On x86 CPUs the matmul is FBGEMM's dynamic int8 GEMM (activations quantized per token, AVX2 integer dot products):
decoding is bound by reading the weights, and a quarter of the bytes of float32 makes it about twice as fast.
Elsewhere the weights are dequantized into the matmul (torch's int8 weight-only kernel).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, *, fbgemm: bool | None = None):
        """fbgemm: use FBGEMM's int8 GEMM (None: wherever it can run, i.e. on x86 CPUs)."""
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free linear layers only (Llama has no biases)")
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        can_fbgemm = weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
        self.use_fbgemm = can_fbgemm if fbgemm is None else fbgemm
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10)
        if self.use_fbgemm:
            # Full 8-bit activations (reduce_range off): FBGEMM's AVX2 kernel does not clip u8 x s8 pair sums at
            # 16 bits (tests/quant checks the worst case), and on SmolLM2 it is a third of the KL divergence from
            # float32 that 7-bit activations give.
            with warnings.catch_warnings():
                # Quantized tensors are deprecated upstream but still FBGEMM's only way in; torch is pinned (2.13).
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch.quantize_per_channel(
                    weight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
                )
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        else:
            self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).to(torch.int8))
            self.register_buffer("scales", scales.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fbgemm:
            xf = x.float()
            if xf.numel() == self.in_features:  # one token: its own scale already
                return torch.ops.quantized.linear_dynamic(xf, self.packed, False).type_as(x)
            # FBGEMM quantizes the activations with one scale for the whole tensor, and in a prompt a few tokens
            # (the first above all) are orders of magnitude larger than the rest, which would leave the others a
            # handful of levels. The layer is linear in each row, so scaling every token to unit max first and
            # back after gives each its own scale.
            row_max = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
            return (torch.ops.quantized.linear_dynamic(xf / row_max, self.packed, False) * row_max).type_as(x)
        flat = x.reshape(-1, self.in_features)
        return torch._weight_int8pack_mm(flat, self.weight_int8, self.scales).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` in place with an Int8Linear; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model
