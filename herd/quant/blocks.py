"""Block-quantized weights and the linear layer that computes with them.

A weight [N, K] is stored as integer codes with one float scale (and, for 4-bit codes, one float min) per group of
`group` consecutive elements of a row: w = code * scale + min. GGUF's Q4_0, Q4_1, Q8_0 and Q4_K, herd's int4
(group 32/64/128) and int8 (group = the whole row) are all this one format, so one kernel computes them all.

4-bit codes sit two per byte as GGUF lays them out: in each chunk of 32 elements, byte j holds element j in its low
nibble and element j + 16 in its high one.

The matmul: a few tokens at a time (decoding), the activations are quantized to int8 per block of 32 and multiplied
with the codes in integers, as llama.cpp does (herd's compiled kernel, or the same arithmetic in PyTorch); a prompt
expands the weights to float32 a tile at a time and uses the float GEMM (exact for the stored weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from herd.quant.kernel import ops
from herd.quant.phase import prompt_mask

QK = 32  # activation block
# Up to this many tokens per call take the integer path; more amortise expanding the weights into a float GEMM.
MAX_INTEGER_TOKENS = 8
# Rows the engine marks as generated (`herd.quant.phase`) take it up to here: a decode step of many sequences
# (a busy server) computes them 2-3x faster in integers than through the expanded weights. Unmarked forwards keep
# the small cap, so a direct forward of a dozen tokens stays exact.
MAX_GENERATED_TOKENS = 64
# Exact products (float activations) of up to this many rows run the kernel's float loop over the stored codes;
# more rows amortise expanding the weights once for a BLAS GEMM. The tied output layer of a decode step of many
# sequences took 20-30 ms a step expanding its 49K-row table.
MAX_FLOAT_LOOP_TOKENS = 32


@dataclass
class BlockWeight:
    """codes [N, K/2] uint8 (bits 4) or [N, K] int8 (bits 8); scales and mins [N, K / group] float32."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * (2 if self.bits == 4 else 1)

    def rows(self, index: torch.Tensor) -> BlockWeight:
        return BlockWeight(self.codes[index], self.scales[index], None if self.mins is None else self.mins[index],
                           self.bits, self.group)

    def to(self, device) -> BlockWeight:
        return BlockWeight(self.codes.to(device), self.scales.to(device),
                           None if self.mins is None else self.mins.to(device), self.bits, self.group)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        return (codes_as_float(self.codes, self.bits).view(n, -1, self.group) * self.scales[..., None]
                + (0 if self.mins is None else self.mins[..., None])).view(n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)


def codes_as_float(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes in element order, as float32 [N, K]."""
    if bits == 8:
        return codes.float()
    n = codes.shape[0]
    chunks = codes.view(n, -1, QK // 2)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=-1).view(n, -1).float()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 → [N, K/2] bytes in the layout above."""
    chunks = codes.to(torch.uint8).view(codes.shape[0], -1, QK)
    return (chunks[..., : QK // 2] | (chunks[..., QK // 2 :] << 4)).view(codes.shape[0], -1)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → int8 codes as float [M, K/32, 32] and scales [M, K/32]: max |x| of a block maps to 127."""
    blocks = x.float().view(x.shape[0], -1, QK)
    scale = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return torch.round(blocks * inverse[..., None]), scale


def integer_matmul(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    """What the kernel's integer path computes, in PyTorch: x [M, K] (quantized to int8 blocks) @ w.T → [M, N]."""
    n, k = w.shape
    xq, xd = quantize_activations(x)
    codes = codes_as_float(w.codes, w.bits).view(n, -1, QK)
    per_group = w.group // QK
    dots = torch.einsum("mbi,nbi->mnb", xq, codes)  # exact: integers far below 2**24
    wscale = w.scales.repeat_interleave(per_group, dim=1)
    out = (dots * (xd[:, None, :] * wscale[None])).sum(-1)
    if w.mins is not None:
        out += (xd * xq.sum(-1)) @ w.mins.repeat_interleave(per_group, dim=1).T
    return out


def matmul(x: torch.Tensor, w: BlockWeight, *, integer: bool = True) -> torch.Tensor:
    """x [..., K] @ w.T in float32. integer: a few generated tokens take the int8-activation path; prompt tokens
    (as `herd.quant.phase` tells them; else any forward of more than a few tokens) take the stored weights times
    the float activations, always."""
    flat = x.reshape(-1, x.shape[-1]).float()
    rows = flat.shape[0]
    marked = prompt_mask(rows) if integer else None
    prompt, generated = marked if marked is not None else (None, rows)
    cap = MAX_INTEGER_TOKENS if prompt is None else MAX_GENERATED_TOKENS
    if not integer or generated == 0 or generated > cap:
        out = _matmul(flat, w, False)  # many generated tokens: one float GEMM serves them better
    elif generated == rows:
        out = _matmul(flat, w, True)
    else:
        out = flat.new_empty(rows, w.shape[0])
        out[prompt] = _matmul(flat[prompt], w, False)
        out[~prompt] = _matmul(flat[~prompt], w, True)
    return out.view(*x.shape[:-1], w.shape[0])


def _matmul(flat: torch.Tensor, w: BlockWeight, integer: bool) -> torch.Tensor:
    """integer: int8 activation blocks (the caller bounds the rows); else exactly the stored weights, by the
    kernel's float path for a few rows and a float GEMM over the expanded weights for more."""
    kernel = ops() if flat.device.type == "cpu" else None
    args = (w.codes, w.scales, w.mins, w.bits, w.group)
    if kernel and (integer or flat.shape[0] <= MAX_FLOAT_LOOP_TOKENS):
        return kernel.matmul_rows(flat, *args, integer)
    if integer:
        return integer_matmul(flat, w)
    return flat @ (kernel.dequantize(*args) if kernel else w.dequantize()).T


class _Blocks(nn.Module):
    """A module holding one BlockWeight as buffers (so .to(), state_dict and save see them)."""

    def __init__(self, weight: BlockWeight):
        super().__init__()
        self.bits, self.group = weight.bits, weight.group
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("mins", weight.mins)

    @property
    def weight_blocks(self) -> BlockWeight:
        return BlockWeight(self.codes, self.scales, self.mins, self.bits, self.group)


class BlockLinear(_Blocks):
    """A bias-free linear layer over a BlockWeight."""

    def __init__(self, weight: BlockWeight, *, integer: bool = True, scheme: str = ""):
        super().__init__(weight)
        self.out_features, self.in_features = weight.shape
        self.integer, self.scheme = integer, scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight_blocks, integer=self.integer).type_as(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme or f'{self.bits}-bit'}"


class BlockEmbedding(_Blocks):
    """An embedding table kept in blocks; the rows looked up are expanded to float32."""

    def __init__(self, weight: BlockWeight):
        super().__init__(weight)
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def weight(self) -> torch.Tensor:
        # Callers read the table's dtype and device (that of the activations it produces), never its values.
        return self.scales[:0, :0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.weight_blocks.rows(tokens.reshape(-1))
        return rows.dequantize().view(*tokens.shape, self.embedding_dim)


# ---------------------------------------------------------------- from float weights


def quantize_int4(weight: torch.Tensor, group: int) -> BlockWeight:
    """Round to nearest, one scale and min per group: the group's range split in 15 steps (Q4_1's rule)."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.view(n, -1, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).view(n, k)
    return BlockWeight(pack_nibbles(codes), scale, low, 4, group)


def quantize_int8(weight: torch.Tensor, group: int | None = None) -> BlockWeight:
    """Symmetric int8, one scale per row (or per group): the largest magnitude maps to 127."""
    w = weight.detach().float()
    n, k = w.shape
    group = group or k
    groups = w.view(n, -1, group)
    scale = (groups.abs().amax(-1) / 127).clamp(min=1e-12)
    codes = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return BlockWeight(codes, scale, None, 8, group)
