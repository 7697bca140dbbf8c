"""Generated tokens through a whole transformer block in herd's kernel: the per-token PyTorch calls removed.

A decode step of a quantized model spent as long in a thousand small PyTorch calls (norms, rotary embeddings,
attention, module dispatch) as in its matmuls. `DecodeBlock` takes a built model's block as it is (same modules,
same parameter names) and, when every token of an engine step is a generated one (`herd.quant.phase`: decoding
sequences, drafted tokens), computes the block in one kernel call for all the step's sequences, reading and
writing their keys in the paged cache; everything else (prompt tokens, forwards without the engine's cache, a
model on a GPU) runs the block's own PyTorch forward. Swapped in from outside, like the schemes.
"""
from __future__ import annotations

import ctypes

import torch

from herd.model.llama import TransformerBlock
from herd.quant.blocks import BlockLinear, in_place_version
from herd.quant.kernel import QWeight, Sequences, ops
from herd.quant.phase import prompt_mask

_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class DecodeBlock(TransformerBlock):
    def __init__(self, block: TransformerBlock):
        torch.nn.Module.__init__(self)
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self._weights: tuple[tuple[int, int], ctypes.Array, list] | None = None

    def forward(self, x, rotation, mask, cache, layer):
        tokens = x.shape[1]
        marked = prompt_mask(tokens) if hasattr(cache, "parts") else None
        if (marked is None or marked[1] != tokens or x.shape[0] != 1
                or x.dtype != torch.float32 or x.device.type != "cpu"):
            return super().forward(x, rotation, mask, cache, layer)
        if "decode" not in cache.scratch:  # once per step, for every layer
            cache.scratch["decode"] = (Sequences.of(cache.parts, cache.key_slots),
                                       torch.view_as_real(rotation[0, :, 0]).contiguous())
        seqs, cos_sin = cache.scratch["decode"]
        out = x[0].contiguous().clone()
        attention = self.attention
        ops().decode_block(out, self.attention_norm.weight, self.ffn_norm.weight, self.attention_norm.eps,
                           self._quantized(), cos_sin, cache.cache.k[layer], cache.cache.v[layer], seqs,
                           attention.n_heads, attention.head_dim)
        return out.unsqueeze(0)

    def _quantized(self) -> ctypes.Array:
        """The seven layers' QWeight array, rebuilt when their buffers moved or changed in place (`.to()`, a
        loaded state dict: the seven move and change together, so wq's codes stand for all)."""
        codes = self.attention.wq.codes
        key = (codes.data_ptr(), in_place_version(codes))
        if self._weights is None or self._weights[0] != key:
            linears = [self.get_submodule(name) for name in _LINEARS]
            packed = [m.packed() for m in linears]
            array = (QWeight * len(linears))(*(
                QWeight(m.codes.data_ptr(), m.scales.data_ptr(), m.mins.data_ptr() if m.mins is not None else None,
                        p.data_ptr() if p is not None else None, m.out_features, m.in_features, m.bits, m.group,
                        int(m.integer))
                for m, p in zip(linears, packed)))
            self._weights = (key, array, packed)  # the panels stay alive while the array points into them
        return self._weights[1]


def use_decode_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Swap in DecodeBlock for every block whose seven linear layers are all quantized blocks, where the kernel
    runs; in place."""
    if ops() is None:
        return model
    for i, block in enumerate(model.layers):
        if all(isinstance(block.get_submodule(name), BlockLinear) for name in _LINEARS):
            model.layers[i] = DecodeBlock(block)
    return model
