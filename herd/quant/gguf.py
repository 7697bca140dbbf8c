"""GGUF's quantized tensors as BlockWeights, read straight from the file's blocks (no float32 expansion).

Q4_0, Q4_1, Q8_0 and Q4_K are codes with a scale (and min) per 32 weights, so they become herd's block format
exactly; other types (Q6_K, Q5_*, ...) have no kernel here and are expanded to float32 by the checkpoint loader.
"""
from __future__ import annotations

import numpy as np
import torch

from herd.quant.blocks import BlockWeight

COMPUTED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(raw[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)


def block_weight(qtype: str, raw: np.ndarray) -> BlockWeight:
    """raw: the tensor's bytes as GGUF stores them, [rows, bytes per row] uint8."""
    rows = raw.shape[0]
    if qtype == "Q4_0":
        blocks = raw.reshape(rows, -1, 18)
        d = _f16(blocks, 0)
        return _weight(blocks[..., 2:], d, -8 * d, 4)
    if qtype == "Q4_1":
        blocks = raw.reshape(rows, -1, 20)
        return _weight(blocks[..., 4:], _f16(blocks, 0), _f16(blocks, 2), 4)
    if qtype == "Q8_0":
        blocks = raw.reshape(rows, -1, 34)
        return _weight(blocks[..., 2:].view(np.int8), _f16(blocks, 0), None, 8)
    if qtype == "Q4_K":
        return _q4_k(raw.reshape(rows, -1, 144))
    raise ValueError(f"no block kernel for GGUF type {qtype}")


def _weight(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int) -> BlockWeight:
    rows = codes.shape[0]
    return BlockWeight(
        torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, -1)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, -1)),
        None if mins is None else torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(rows, -1)),
        bits, 32,
    )


def _q4_k(blocks: np.ndarray) -> BlockWeight:
    """Q4_K super-blocks of 256: f16 d and dmin, 12 bytes of 6-bit sub-scales and sub-mins for its eight blocks of
    32, then 128 bytes of nibbles (each 64 weights: 32 bytes, the first 32 in low nibbles, the next 32 in high ones).
    A weight is d * sc * q - dmin * m."""
    rows, n = blocks.shape[:2]
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    s = blocks[..., 4:16].astype(np.uint8)
    # llama.cpp's get_scale_min_k4: blocks 0-3 use the low 6 bits of bytes 0-3 (scale) and 4-7 (min); blocks 4-7
    # combine a nibble of bytes 8-11 with the top two bits of bytes 0-3 / 4-7.
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    q = blocks[..., 16:].reshape(rows, n, 4, 32)
    codes = np.stack([q & 0x0F, q >> 4], axis=3).reshape(rows, n, 8, 32)  # element order, 8 blocks of 32
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return _weight(packed, d * sc, -(dmin * mn), 4)
