"""GGUF's quantized tensors as BlockWeights, read straight from the file's blocks (no float32 model in between).

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K are codes with a scale (and min) per 32 weights, or per 16 for
Q6_K, so they become herd's block format exactly (5- and 6-bit codes as int8): a Q4_K_M, Q5_K_M or Q6_K file
computes as stored. The other types (the 2- and 3-bit k-quants, ...) do not fit, so each of their blocks of 32 is
rounded again to int8 with one scale, Q8_0's rule, which adds to each weight an error of at most 1/254 of its
block's largest (tests/quant/test_kernel.py checks the bound).
"""
from __future__ import annotations

import numpy as np
import torch

from herd.quant.blocks import BlockWeight, quantize_int8


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
    if qtype == "Q5_0":  # f16 d | 4 bytes of the codes' fifth bits | 16 bytes of nibbles; a weight is d * (q - 16)
        blocks = raw.reshape(rows, -1, 22)
        return _weight(_five_bits(blocks[..., 6:], blocks[..., 2:6]) - 16, _f16(blocks, 0), None, 8)
    if qtype == "Q5_1":  # f16 d, f16 m | fifth bits | nibbles; a weight is d * q + m
        blocks = raw.reshape(rows, -1, 24)
        return _weight(_five_bits(blocks[..., 8:], blocks[..., 4:8]), _f16(blocks, 0), _f16(blocks, 2), 8)
    if qtype == "Q8_0":
        blocks = raw.reshape(rows, -1, 34)
        return _weight(blocks[..., 2:].view(np.int8), _f16(blocks, 0), None, 8)
    if qtype == "Q4_K":
        return _q4_k(raw.reshape(rows, -1, 144))
    if qtype == "Q5_K":
        return _q5_k(raw.reshape(rows, -1, 176))
    if qtype == "Q6_K":
        return _q6_k(raw.reshape(rows, -1, 210))
    return _rounded_to_int8(qtype, raw)


def _weight(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int) -> BlockWeight:
    rows = codes.shape[0]
    return BlockWeight(
        torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, -1)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, -1)),
        None if mins is None else torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(rows, -1)),
        bits, 32,
    )


def _five_bits(nibbles: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Codes 0..31 of Q5_0/Q5_1 blocks of 32, as int8: element j's low four bits in byte j % 16 of `nibbles` (low
    nibble for j < 16), its fifth bit at bit j of the 32-bit `high`."""
    fifth = np.unpackbits(high, axis=-1, bitorder="little")
    return (np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1) | (fifth << 4)).astype(np.int8)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks of 256 start with f16 d and dmin and 12 bytes of 6-bit sub-scales and sub-mins for their
    eight blocks of 32: (d * sc, -dmin * m) [rows, n, 8], the scale and min of each block."""
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    s = blocks[..., 4:16].astype(np.uint8)
    # llama.cpp's get_scale_min_k4: blocks 0-3 use the low 6 bits of bytes 0-3 (scale) and 4-7 (min); blocks 4-7
    # combine a nibble of bytes 8-11 with the top two bits of bytes 0-3 / 4-7.
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return d * sc, -(dmin * mn)


def _q4_k(blocks: np.ndarray) -> BlockWeight:
    """Q4_K: after the scales, 128 bytes of nibbles (each 64 weights: 32 bytes, the first 32 in low nibbles, the
    next 32 in high ones). A weight is d * sc * q - dmin * m."""
    rows, n = blocks.shape[:2]
    q = blocks[..., 16:].reshape(rows, n, 4, 32)
    codes = np.stack([q & 0x0F, q >> 4], axis=3).reshape(rows, n, 8, 32)  # element order, 8 blocks of 32
    return _weight(codes[..., :16] | (codes[..., 16:] << 4), *_k_scales(blocks), 4)


def _q5_k(blocks: np.ndarray) -> BlockWeight:
    """Q5_K: after the scales, 32 bytes of fifth bits (block b's at bit b of each byte, element l of the block in
    byte l) and 128 bytes of nibbles laid out as Q4_K's. A weight is d * sc * q - dmin * m, q in 0..31."""
    rows, n = blocks.shape[:2]
    q = blocks[..., 48:].reshape(rows, n, 4, 32)
    low = np.stack([q & 0x0F, q >> 4], axis=3).reshape(rows, n, 8, 32)
    fifth = (blocks[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [rows, n, element, block]
    codes = low | (np.moveaxis(fifth, -1, -2) << 4)
    return _weight(codes.astype(np.int8), *_k_scales(blocks), 8)


def _q6_k(blocks: np.ndarray) -> BlockWeight:
    """Q6_K super-blocks of 256: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales (one per 16
    weights), f16 d. A weight is d * scale * (q - 32), q in 0..63. In each half of 128 weights, element 32k + l (k
    0..3) has its low nibble in byte l (+ 32 for odd k) of the half's 64, low for k < 2, and its top two bits at bits
    2k of byte l of the half's 32."""
    rows, n = blocks.shape[:2]
    low = blocks[..., :128].reshape(rows, n, 2, 2, 32)  # [half, byte group (k odd), l]
    nibbles = np.stack([low & 0x0F, low >> 4], axis=3)  # [half, k // 2, k % 2, l]
    high = blocks[..., 128:192].reshape(rows, n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    q = nibbles.reshape(rows, n, 2, 4, 32) | ((high & 3) << 4)
    scales = _f16(blocks, 208)[..., None] * blocks[..., 192:208].view(np.int8)
    return BlockWeight(torch.from_numpy((q.astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)),
                       torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, -1)), None, 8, 16)


_CHUNK_BYTES = 1 << 24  # of a type's raw blocks, expanded to float32 at a time


def _rounded_to_int8(qtype: str, raw: np.ndarray) -> BlockWeight:
    """A type that does not fit herd's blocks, rounded to int8 per block of 32: the gguf package expands a few rows at
    a time (never the whole tensor in float32), and Q8_0's rule rounds them."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype]
    step = max(1, _CHUNK_BYTES // max(raw.shape[1], 1))
    parts = [quantize_int8(torch.from_numpy(quants.dequantize(raw[r : r + step], kind)), 32)
             for r in range(0, raw.shape[0], step)]
    return BlockWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), None, 8, 32)
