"""Block-quantized weights and the linear layer that computes with them.

A weight [N, K] is stored as integer codes with one float scale (and, where the format has one, one float min) per
group of `group` consecutive elements of a row: w = code * scale + min. GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
Q5_K and Q6_K (int8 codes, groups of 16), herd's int4 (group 32/64/128) and int8 (group = the whole row) are all this
one format, so one kernel computes them all.

4-bit codes sit two per byte as GGUF lays them out: in each chunk of 32 elements, byte j holds element j in its low
nibble and element j + 16 in its high one.

The matmul: the activations are quantized to int8 per block of 32 and multiplied with the codes in integers, as
llama.cpp does, by herd's compiled kernel on a CPU. Prompt tokens, where the CPU has VNNI, add a second int8 level
for each block's rounding error, which makes them as good as float; elsewhere they multiply the stored weights
exactly with float activations, as weight-only layers always do: a short prompt's in the kernel's float loop, a long
one's by a BLAS GEMM over the expanded weight (`herd.quant.phase` says which prompt a row belongs to).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from herd.quant.kernel import Panels, ops
from herd.quant.phase import Marked, marked_rows

QK = 32  # activation block
# A forward the engine has not marked (`herd.quant.phase`) of up to this many tokens is taken for generated tokens.
MAX_INTEGER_TOKENS = 8
# Without the kernel, generated tokens take the integer path in PyTorch up to this many per forward.
MAX_GENERATED_TOKENS = 64
# A prompt of up to this many tokens takes its exact products (float activations) in the kernel's float loop over
# the stored codes; a longer one amortises expanding the weights once for a BLAS GEMM. Generated tokens always take
# the loop: a weight-only output layer (int8-wo) of a decode step of 64 sequences took 27 ms there against 79 ms
# expanding its 49K-row table for the GEMM.
MAX_FLOAT_LOOP_TOKENS = 32
# MKL's SGEMM rounds a row the same whatever rows share the call from 12 rows on (below, some row counts take
# other paths): a prompt's rows are padded to this many, so that they compute alike alone and in a batch.
MIN_GEMM_ROWS = 16
ROWS = ("codes", "scales", "mins")  # the tensors of a BlockWeight


@dataclass
class BlockWeight:
    """codes [N, K/2] uint8 (bits 4) or [N, K] int8 (bits 8); scales and mins [N, K / group] float32. group: a
    multiple of 32, or 16 for int8 codes without mins (GGUF's Q6_K)."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * (2 if self.bits == 4 else 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """codes, scales and mins (where it has them) by name, as modules hold and files store them."""
        return {name: t for name in ROWS if (t := getattr(self, name)) is not None}

    def rows(self, index: torch.Tensor) -> BlockWeight:
        """The rows `index` [n] (index_select: half the cost of indexing, which a decode step pays three times)."""
        codes, scales, mins = (None if t is None else t.index_select(0, index)
                               for t in (self.codes, self.scales, self.mins))
        return BlockWeight(codes, scales, mins, self.bits, self.group)

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


def quantize_activations(x: torch.Tensor, levels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → int8 codes as float [M, K/32, 32] and scales [M, K/32]: max |x| of a block maps to 127. levels 2:
    each block's rounding error quantized again at 1/254 of its scale; the codes returned are 254 * q + q2 and
    the scale that finer one."""
    blocks = x.float().view(x.shape[0], -1, QK)
    scale = blocks.abs().amax(dim=-1) / 127
    codes = torch.round(blocks * _inverse(scale)[..., None])
    if levels == 2:
        fine = scale / 254
        rest = torch.round((blocks - codes * scale[..., None]) * _inverse(fine)[..., None])
        codes, scale = codes * 254 + rest, fine
    return codes, scale


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))


def integer_matmul(x: torch.Tensor, w: BlockWeight, levels: int = 1) -> torch.Tensor:
    """What the kernel's integer paths compute, in PyTorch: x [M, K] (quantized to int8 blocks, in `levels`) @ w.T
    → [M, N]."""
    n, k = w.shape
    xq, xd = quantize_activations(x, levels)
    part = min(w.group, QK)  # int8 codes with a scale per 16 weights (Q6_K) sum each half block apart
    codes = codes_as_float(w.codes, w.bits).view(n, -1, part)
    # Exact integers: one level's sums stay far below 2**24; two levels' need float64.
    exact = torch.float64 if levels == 2 else torch.float32
    dots = torch.einsum("mbi,nbi->mnb", xq.view(len(x), -1, part).to(exact), codes.to(exact)).float()
    wscale = w.scales.repeat_interleave(w.group // part, dim=1)
    out = (dots * (xd.repeat_interleave(QK // part, dim=1)[:, None, :] * wscale[None])).sum(-1)
    if w.mins is not None:
        out += (xd * xq.sum(-1)) @ w.mins.repeat_interleave(w.group // QK, dim=1).T
    return out


def matmul(x: torch.Tensor, w: BlockWeight | Panels, *, integer: bool = True) -> torch.Tensor:
    """x [..., K] @ w.T in float32, w a BlockWeight or (on the CPU, with herd's kernel) its Panels. Prompt tokens
    and generated tokens (as `herd.quant.phase` tells them; unmarked, a forward of more than a few tokens is a
    prompt) are computed apart, each row the same way whatever shares the call, so that a sequence computes the
    same in a batch of any size, and a prompt the same however it is chunked. Generated tokens take int8
    activations (the kernel, or the same arithmetic in PyTorch) where the layer is an integer one. Prompt tokens
    take two levels of int8 where the kernel has VNNI (as good as float, about 1.7x faster than float32), else float
    activations times the stored weights, as every token of a weight-only layer (integer=False) does."""
    flat = x.reshape(-1, x.shape[-1]).float()
    kernel = ops() if flat.device.type == "cpu" else None
    rows = flat.shape[0]
    marked = marked_rows(rows)
    if marked is None:  # a few generated tokens, or one prompt of `rows` tokens
        marked = Marked.of(torch.full((rows,), 0 if rows <= MAX_INTEGER_TOKENS else rows))
    if marked.generated == 0:
        out = _prompt(kernel, flat, w, marked, integer)
    elif marked.generated == rows:
        out = _generated(kernel, flat, w, integer)
    else:
        prompt = marked.prompt
        out = flat.new_empty(rows, w.shape[0])
        out[prompt] = _prompt(kernel, flat[prompt], w, marked, integer)
        out[~prompt] = _generated(kernel, flat[~prompt], w, integer)
    return out.view(*x.shape[:-1], w.shape[0])


def _prompt(kernel, flat: torch.Tensor, w: BlockWeight | Panels, marked: Marked, integer: bool) -> torch.Tensor:
    """The prompt rows of a forward marked so, each by the way the size of its prompt picks."""
    if integer and kernel and kernel.vnni:
        return kernel.matmul_rows(flat, w, levels=2)
    if kernel is None:
        return flat @ dequantize(w).T
    # The float loop is as good as two int8 levels, and faster without VNNI.
    if marked.largest <= MAX_FLOAT_LOOP_TOKENS:
        return kernel.matmul_rows(flat, w, levels=0)
    if marked.smallest > MAX_FLOAT_LOOP_TOKENS:
        return gemm(flat, dequantize(w))
    return by_prompt_size(flat, marked.sizes[marked.prompt], lambda rows: kernel.matmul_rows(rows, w, levels=0),
                          lambda rows: gemm(rows, dequantize(w)))


def by_prompt_size(x: torch.Tensor, sizes: torch.Tensor, short, long) -> torch.Tensor:
    """short(rows) for the rows of x whose prompt has at most MAX_FLOAT_LOOP_TOKENS rows (or none: generated
    tokens, size 0), long(rows) for the others."""
    is_long = sizes > MAX_FLOAT_LOOP_TOKENS
    if not is_long.any():
        return short(x)
    if is_long.all():
        return long(x)
    few, many = short(x[~is_long]), long(x[is_long])
    out = x.new_empty(x.shape[0], few.shape[1])
    out[~is_long], out[is_long] = few, many
    return out


def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T by the BLAS, each row of x the same whatever rows share the call."""
    rows = x.shape[0]
    if rows < MIN_GEMM_ROWS:
        x = torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - rows, x.shape[1])])
    return (x @ weight.T)[:rows]


def _generated(kernel, flat: torch.Tensor, w: BlockWeight | Panels, integer: bool) -> torch.Tensor:
    if kernel:
        return kernel.matmul_rows(flat, w, levels=1 if integer else 0)
    # PyTorch's einsum grows with the batch: a decode step of very many sequences multiplies exactly instead.
    if integer and flat.shape[0] <= MAX_GENERATED_TOKENS:
        return integer_matmul(flat, w)
    return flat @ dequantize(w).T


def dequantize(w: BlockWeight | Panels) -> torch.Tensor:
    """w as float32 [N, K]: by herd's kernel on the CPU (4-15x faster than PyTorch's expression on the default
    model's and 8B's widths), else by PyTorch."""
    kernel = ops() if isinstance(w, Panels) or w.codes.device.type == "cpu" else None
    return kernel.dequantize(w) if kernel else w.dequantize()


class _Blocks(nn.Module):
    """A module holding one BlockWeight as buffers (so .to(), state_dict and save see them)."""

    def __init__(self, weight: BlockWeight):
        super().__init__()
        self.bits, self.group = weight.bits, weight.group
        for name in ROWS:
            self.register_buffer(name, getattr(weight, name))

    @property
    def weight_blocks(self) -> BlockWeight:
        return BlockWeight(self.codes, self.scales, self.mins, self.bits, self.group)


class BlockLinear(_Blocks):
    """A bias-free linear layer over a BlockWeight.

    An integer layer on a CPU with herd's kernel packs its weight into the kernel's panels the first time it runs
    and from then on keeps only those: with rows and panels side by side every code was held twice (a Llama 3.1
    8B under int8 grew from 8.6 to 14.7 GB with its first tokens). Reading the rows (`codes`, `scales`, `mins`)
    unpacks them again, exactly, and drops the panels; `weight_blocks`, `state_dict()` and `.to()` see the same rows
    whichever form the layer is in."""

    def __init__(self, weight: BlockWeight, *, integer: bool = True, scheme: str = ""):
        super().__init__(weight)
        self.out_features, self.in_features = weight.shape
        self.integer, self.scheme = integer, scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.computed(), integer=self.integer).type_as(x)

    @property
    def short_prompt_tokens(self) -> int:
        """A prompt of up to this many tokens computes apart from longer ones (`herd.quant.phase`): the kernel's
        float loop, where a longer one takes a GEMM. 0 where every prompt computes one way: two int8 levels with
        VNNI, one GEMM without the kernel."""
        kernel = ops() if next(self.buffers()).device.type == "cpu" else None
        return 0 if kernel is None or (self.integer and kernel.vnni) else MAX_FLOAT_LOOP_TOKENS

    def computed(self) -> BlockWeight | Panels:
        """The weight as the matmul reads it: its panels, packed now if they are not yet, where the kernel takes
        this layer (integer, on the CPU); else its rows."""
        kernel = ops()
        if kernel is None or not self.integer:
            return self.weight_blocks
        if "packed" in self._buffers:
            return self.panels
        if self.codes.device.type != "cpu":
            return self.weight_blocks
        panels = kernel.pack(self.weight_blocks)
        self._has_mins = panels.has_mins
        for name in ROWS:
            del self._buffers[name]
        self.register_buffer("packed", panels.data, persistent=False)
        return panels

    @property
    def panels(self) -> Panels | None:
        packed = self._buffers.get("packed")
        return None if packed is None else Panels(packed, (self.out_features, self.in_features), self.bits,
                                                  self.group, self._has_mins)

    @property
    def weight_blocks(self) -> BlockWeight:
        panels = self.panels
        return super().weight_blocks if panels is None else BlockWeight(*panels.rows(), self.bits, self.group)

    def __getattr__(self, name: str):
        if name in ROWS and "packed" in self._buffers:
            self._unpack()
        return super().__getattr__(name)

    def _unpack(self) -> None:
        """Back to rows, for anything that reads or changes them; the next forward packs them again."""
        rows = self.weight_blocks
        del self._buffers["packed"]
        for name in ROWS:
            self.register_buffer(name, getattr(rows, name))

    def _apply(self, fn, recurse=True):
        if "packed" in self._buffers:  # a move or conversion applies to the rows, not the kernel's panels
            self._unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "packed" in self._buffers:
            destination.update({prefix + name: t for name, t in self.weight_blocks.tensors().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if "packed" in self._buffers:
            self._unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized(self) -> torch.Tensor:
        """The weight as float32 [out, in] (LoRA's backward, a conversion back to float), from whichever form the
        layer holds."""
        return dequantize(self.panels if "packed" in self._buffers else self.weight_blocks)

    def version(self) -> tuple:
        """Changes whenever what the matmul reads moves or changes in place (`.to()`, a loaded state dict, an edit
        of the rows)."""
        packed = self._buffers.get("packed")
        if packed is not None:
            return (packed.data_ptr(),)
        codes = self._buffers["codes"]
        return codes.data_ptr(), in_place_version(codes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme or f'{self.bits}-bit'}"


def in_place_version(t: torch.Tensor) -> int:
    """How often `t` changed in place (inference tensors keep no count: they change only in inference mode)."""
    return 0 if t.is_inference() else t._version


class BlockEmbedding(_Blocks):
    """An embedding table kept in blocks; the rows looked up are expanded to float32. A tied table (`tie`) holds
    nothing of its own: it is the output layer's weight, read from that layer's rows, or its panels once it has
    run (a second copy of Llama 3.2 1B's table would be 290 MB)."""

    def __init__(self, weight: BlockWeight):
        super().__init__(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self._tied: list[BlockLinear] = []  # the output layer, in a list to keep it out of this module's children

    def tie(self, output: BlockLinear) -> None:
        """Read the table from `output`, which holds the same blocks, from now on."""
        for name in ROWS:
            del self._buffers[name]
        self._tied = [output]

    def __getattr__(self, name: str):
        if name in ROWS and self._tied:
            return getattr(self._tied[0], name)
        return super().__getattr__(name)

    @property
    def weight_blocks(self) -> BlockWeight:
        return self._tied[0].weight_blocks if self._tied else super().weight_blocks

    @property
    def weight(self) -> torch.Tensor:
        # Callers read the table's dtype and device (that of the activations it produces), never its values.
        holder = self._tied[0] if self._tied else self
        scales = holder._buffers.get("scales")
        return scales[:0, :0] if scales is not None else torch.empty(0, 0, device=holder._buffers["packed"].device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        index = tokens.reshape(-1)
        panels = self._tied[0].panels if self._tied else None
        rows = (panels.dequantize_rows(index) if panels is not None
                else self.weight_blocks.rows(index).dequantize())
        return rows.view(*tokens.shape, self.embedding_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tied:
            destination.update({prefix + name: t for name, t in self.weight_blocks.tensors().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        (self._tied[0] if self._tied else super())._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---------------------------------------------------------------- from float weights


def row_chunks(n: int, k: int) -> list[slice]:
    """Row ranges of an [n, k] weight of about 16M elements each: the quantizers' float32 temporaries stay that
    size, not the weight's (an 8B output layer is 2 GB in float32), and rows are quantized independently."""
    step = max(1, (1 << 24) // k)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def quantize_int4(weight: torch.Tensor, group: int) -> BlockWeight:
    """Round to nearest, one scale and min per group: the group's range split in 15 steps (Q4_1's rule)."""
    w = weight.detach()
    n, k = w.shape
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scale, low = (torch.empty(n, k // group, device=w.device) for _ in range(2))
    for rows in row_chunks(n, k):
        groups = w[rows].float().view(-1, k // group, group)
        low[rows], high = groups.amin(-1), groups.amax(-1)
        scale[rows] = ((high - low[rows]) / 15).clamp(min=1e-12)
        step = (groups - low[rows, :, None]).div_(scale[rows, :, None]).round_().clamp_(0, 15)
        codes[rows] = pack_nibbles(step.view(-1, k))
    return BlockWeight(codes, scale, low, 4, group)


def quantize_int8(weight: torch.Tensor, group: int | None = None) -> BlockWeight:
    """Symmetric int8, one scale per row (or per group): the largest magnitude maps to 127."""
    w = weight.detach()
    n, k = w.shape
    group = group or k
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scale = torch.empty(n, k // group, device=w.device)
    for rows in row_chunks(n, k):
        groups = w[rows].float().view(-1, k // group, group)
        scale[rows] = (torch.maximum(groups.amax(-1), groups.amin(-1).neg()) / 127).clamp(min=1e-12)
        codes[rows] = (groups / scale[rows, :, None]).round_().clamp_(-127, 127).view(-1, k)
    return BlockWeight(codes, scale, None, 8, group)
