"""An engine step's tokens through a whole transformer block in herd's kernel: the per-token PyTorch calls removed.

A decode step of a quantized model (blocks of int8/int4 codes, or FP8) spent as long in a thousand small PyTorch
calls (norms, rotary embeddings, attention, module dispatch) as in its matmuls. `DecodeBlock` takes a built model's
block as it is (same modules, same parameter names) and, when every token of an engine forward is a generated one
(`herd.quant.phase`: decoding sequences, drafted tokens), computes the block in one kernel call for all the step's
sequences, reading and writing their keys in the paged cache. A forward of prompt tokens alone goes the same way
where the CPU has VNNI and all seven layers take integer activations (there a prompt takes two int8 levels, which
the kernel computes; elsewhere its float activations multiply faster through BLAS): its norms, rotary embeddings and
SwiGLU in PyTorch, and each layer quantizing its own copy of a shared input, had cost a fifth of a prompt's time.
Everything else (mixed forwards, forwards without the engine's cache, a model on a GPU) runs the block's own PyTorch
forward. `DecodeLayers` holds the blocks and runs a forward's consecutive fused blocks in one call (a Python call
per layer cost a tenth of a single sequence's decode step). Swapped in from outside, like the schemes.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from herd.model.llama import TransformerBlock
from herd.quant.blocks import BlockLinear
from herd.quant.fp8 import FP8Linear
from herd.quant.kernel import QWeight, Sequences, addresses, ops, pointers
from herd.quant.phase import marked_rows

_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class DecodeBlock(TransformerBlock):
    def __init__(self, block: TransformerBlock):
        torch.nn.Module.__init__(self)
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self._weights: tuple[tuple, ctypes.Array, list] | None = None

    def forward(self, x, rotation, mask, cache, layer):
        step = _fused_step(x, rotation, cache)
        if step is None or not self.takes(step):
            return super().forward(x, rotation, mask, cache, layer)
        return _run(0, 1, _Stack.of([self]), x, cache, step, layers=[layer])

    def takes(self, step: _Step) -> bool:
        """Whether the kernel computes this block for the step: generated tokens always; prompt tokens when all
        seven layers take integer activations (a weight-only layer's float loop is meant for a few tokens)."""
        return not step.prompt or all(self.get_submodule(name).integer for name in _LINEARS)

    def version(self) -> tuple:
        """Changes whenever the block's weights or norms move or change in place (`.to()`, a loaded state dict:
        the seven linear layers move and change together, so wq stands for all). Read past Module.__getattr__:
        every step asks every block."""
        modules = self._modules
        norms = (modules[name]._parameters["weight"] for name in ("attention_norm", "ffn_norm"))
        return *modules["attention"]._modules["wq"].version(), *(norm.data_ptr() for norm in norms)

    def _quantized(self) -> ctypes.Array:
        """The seven layers' QWeight array, rebuilt when the block's version changed (packing the layers' panels
        first, which changes it)."""
        if self._weights is None or self._weights[0] != self.version():
            read = [_read(self.get_submodule(name)) for name in _LINEARS]
            array = (QWeight * len(read))(*(weight for weight, _ in read))
            self._weights = (self.version(), array, [alive for _, alive in read])  # what the array points into
        return self._weights[1]


def _read(layer) -> tuple[QWeight, object]:
    """A linear layer as the kernel's block reads it, and what must stay alive for that: an FP8 layer's e4m3 codes
    and row scales, or a quantized layer's panels (packed now, where they are not yet) or rows."""
    if isinstance(layer, FP8Linear):
        n, k = layer.codes.shape
        return QWeight(layer.codes.data_ptr(), layer.scales.data_ptr(), None, None, n, k, 8, k, 0, 1), layer
    weight = layer.computed()
    return QWeight(*pointers(weight), *weight.shape, weight.bits, weight.group, int(layer.integer)), weight


@dataclass
class _Stack:
    """What the kernel reads of a run of blocks, block by block (empty entries for blocks it does not run)."""

    key: tuple
    weights: ctypes.Array  # seven QWeights a block
    attn_norms: ctypes.Array
    ffn_norms: ctypes.Array
    eps: float
    heads: int
    head_dim: int

    @classmethod
    def of(cls, blocks: list) -> _Stack:
        fused = [b if isinstance(b, DecodeBlock) else None for b in blocks]
        weights = (QWeight * (7 * len(blocks)))()
        for i, block in enumerate(fused):
            if block is not None:
                ctypes.memmove(ctypes.addressof(weights) + 7 * i * ctypes.sizeof(QWeight), block._quantized(),
                               7 * ctypes.sizeof(QWeight))
        some = next(b for b in fused if b is not None)
        return cls(_versions(blocks), weights, addresses([b and b.attention_norm.weight for b in fused]),
                   addresses([b and b.ffn_norm.weight for b in fused]), some.attention_norm.eps,
                   some.attention.n_heads, some.attention.head_dim)


def _versions(blocks) -> tuple:
    return tuple(b.version() if isinstance(b, DecodeBlock) else None for b in blocks)


class DecodeLayers(torch.nn.ModuleList):
    """The model's blocks (the same modules, names and order) as a stack that runs itself (`Transformer.forward`
    hands it the loop): a forward's consecutive DecodeBlocks that the kernel takes go through it in one call, with
    no Python per layer; every other block, and every other forward, runs as the plain loop would."""

    def __init__(self, layers):
        super().__init__(layers)
        self._stack: _Stack | None = None

    def run(self, h, rotation, mask, cache):
        step = _fused_step(h, rotation, cache)
        blocks = list(self)
        fused = [step is not None and isinstance(b, DecodeBlock) and b.takes(step) for b in blocks]
        if any(fused) and (self._stack is None or self._stack.key != _versions(blocks)):
            self._stack = _Stack.of(blocks)
        i = 0
        while i < len(blocks):
            j = i
            while j < len(blocks) and fused[j]:
                j += 1
            if j > i:
                h, i = _run(i, j - i, self._stack, h, cache, step), j
            else:
                h, i = blocks[i](h, rotation, mask, cache, i), i + 1
        return h


@dataclass
class _Step:
    seqs: Sequences
    cos_sin: torch.Tensor
    prompt: bool  # the forward's tokens are prompt tokens (else generated ones)


def _fused_step(x, rotation, cache) -> _Step | None:
    """The forward's sequences and rotations for the kernel when its tokens are all generated ones, or all prompt
    tokens where the kernel has VNNI, on the engine's paged cache (float32, on the CPU); else None."""
    tokens = x.shape[1]
    marked = marked_rows(tokens) if hasattr(cache, "parts") else None
    if (marked is None or marked.generated not in (0, tokens) or x.shape[0] != 1
            or x.dtype != torch.float32 or x.device.type != "cpu"):
        return None
    prompt = marked.generated == 0
    if prompt and not ops().vnni:
        return None
    if "fused" not in cache.scratch:  # once per forward, for every layer
        cache.scratch["fused"] = _Step(cache.sequences, torch.view_as_real(rotation[0, :, 0]).contiguous(), prompt)
    return cache.scratch["fused"]


def _run(first: int, count: int, stack: _Stack, x, cache, step: _Step, layers: list[int] | None = None) -> torch.Tensor:
    """Blocks first..first + count - 1 of the stack for x [1, T, dim] in one kernel call; layers: the model's
    layers they are (their keys and values), where the stack is not the whole model's."""
    out = x[0].contiguous().clone()
    k, v = cache.cache.addresses if layers is None else (addresses([cache.cache.k[i] for i in layers]),
                                                         addresses([cache.cache.v[i] for i in layers]))
    ops().decode_blocks(out, first, count, stack.attn_norms, stack.ffn_norms, stack.eps, stack.weights, step.cos_sin,
                        k, v, step.seqs, stack.heads, stack.head_dim, step.prompt)
    return out.unsqueeze(0)


def use_decode_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Swap in DecodeBlock for every block whose seven linear layers are all quantized (blocks, or FP8 rows a
    multiple of 16 wide), where the kernel runs, and make the blocks a DecodeLayers stack; in place."""
    if ops() is None:
        return model

    def fused(layer) -> bool:
        return isinstance(layer, BlockLinear) or (isinstance(layer, FP8Linear) and layer.in_features % 16 == 0)

    for i, block in enumerate(model.layers):
        if all(fused(block.get_submodule(name)) for name in _LINEARS):
            model.layers[i] = DecodeBlock(block)
    model.layers = DecodeLayers(model.layers)
    return model
