"""FP8 (e4m3) weights with one scale per output row and activations scaled per token, as Meta served Llama 3.1 405B.

On GPUs with FP8 tensor cores the matmul is torch._scaled_mm; elsewhere it is emulated exactly: e4m3 values are
expanded to float32 (every product of two of them is exact in float32) and multiplied with float32 accumulation, on
a CPU by herd's kernel: a short prompt's tokens and generated ones straight from the codes, a long prompt's through
one expanded weight and the BLAS GEMM (`herd.quant.phase` says which a row is, so that it computes the same alone
and in a batch).
PyTorch's own float8 conversion had made the default model decode at 3.7 tokens/s, against 36 in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from herd.quant.blocks import MAX_FLOAT_LOOP_TOKENS, by_prompt_size, gemm, in_place_version, row_chunks
from herd.quant.kernel import ops
from herd.quant.phase import marked_rows

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


@dataclass
class FP8Weight:
    codes: torch.Tensor  # [N, K] float8_e4m3fn
    scales: torch.Tensor  # [N] float32


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] → e4m3 codes and one float32 scale per row (its max |x| maps to 448)."""
    x = x.float()
    largest = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg())
    scale = (largest / E4M3_MAX).clamp(min=1e-12)
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale  # in place: one temporary the size of x


def quantize_fp8(weight: torch.Tensor) -> FP8Weight:
    w = weight.detach()
    codes = torch.empty(w.shape, dtype=E4M3, device=w.device)
    scales = torch.empty(w.shape[0], device=w.device)
    for rows in row_chunks(*w.shape):
        codes[rows], scale = to_fp8(w[rows])
        scales[rows] = scale.squeeze(-1)
    return FP8Weight(codes, scales)


def _kernel(codes: torch.Tensor):
    """herd's kernel, where it can compute with these codes: on the CPU, rows a multiple of 16 wide."""
    return ops() if codes.device.type == "cpu" and codes.shape[1] % 16 == 0 else None


def dequantize_fp8(weight: FP8Weight) -> torch.Tensor:
    """The weight as float32: its codes times their row's scale."""
    kernel = _kernel(weight.codes)
    if kernel:
        return kernel.fp8_dequantize(weight.codes, weight.scales)
    return weight.codes.float() * weight.scales[:, None]


def _has_scaled_mm(codes: torch.Tensor) -> bool:
    """FP8 tensor cores, for a weight both of whose widths are multiples of 16 (as they take them; a layer of other
    widths had failed on its first forward, and is emulated instead)."""
    return (codes.device.type == "cuda" and torch.cuda.get_device_capability(codes.device) >= (8, 9)
            and all(width % 16 == 0 for width in codes.shape))


_FLOAT32_REFUSED: set[torch.device] = set()  # devices whose torch takes no float32 out of a row-wise scaled product


def _scaled_matmul(xq: torch.Tensor, xs: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """xq @ codes.T, each scaled by its row's scale, on FP8 tensor cores; out in the activations' half precision.
    Float32 activations take float32 out where torch has it (SM 9.0 with cuBLAS 12.9 or later: a bfloat16 out had
    rounded every output 1e-3 away from the exact emulation) and bfloat16 elsewhere, where torch refuses float32 out
    of row-wise scales ("Only bf16 and fp16 high precision output types are supported"), which had failed every
    forward on Ada GPUs."""
    def product(out_dtype):
        return torch._scaled_mm(xq, codes.t(), scale_a=xs, scale_b=scales[None, :], out_dtype=out_dtype)

    if dtype in (torch.bfloat16, torch.float16):
        return product(dtype)
    if codes.device not in _FLOAT32_REFUSED:
        try:
            return product(torch.float32)
        except (RuntimeError, ValueError) as error:
            if "output types are supported" not in str(error):  # that refusal alone: not an out-of-memory
                raise
            _FLOAT32_REFUSED.add(codes.device)
    return product(torch.bfloat16)


class FP8Linear(nn.Module):
    integer = False  # its activations are e4m3, not int8 blocks: a prompt's stay on the PyTorch block

    def __init__(self, weight: FP8Weight):
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        kernel = _kernel(self.codes)
        if kernel:
            marked = marked_rows(flat.shape[0])
            sizes = marked.sizes if marked else torch.full((flat.shape[0],), flat.shape[0])  # unmarked: one prompt
            out = by_prompt_size(flat, sizes, lambda rows: kernel.fp8_matmul(rows, self.codes, self.scales),
                                 lambda rows: self._expanded(rows, kernel.fp8_dequantize(self.codes)))
        elif _has_scaled_mm(self.codes):
            xq, xs = to_fp8(flat)
            out = _scaled_matmul(xq, xs, self.codes, self.scales, x.dtype)
        else:
            out = self._expanded(flat, self.codes.float())
        return out.view(*x.shape[:-1], self.out_features).type_as(x)

    @property
    def short_prompt_tokens(self) -> int:
        """A prompt of up to this many tokens computes apart from longer ones (as BlockLinear's)."""
        return MAX_FLOAT_LOOP_TOKENS if _kernel(self.codes) else 0

    def _expanded(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x times the expanded e4m3 weight (its codes as float32, unscaled): each product exact in float32."""
        xq, xs = to_fp8(x)
        return gemm(xq.float(), weight) * xs * self.scales

    def version(self) -> tuple:
        """Changes whenever the codes or scales move or change in place (as BlockLinear.version)."""
        return tuple(x for t in (self.codes, self.scales) for x in (t.data_ptr(), in_place_version(t)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"
