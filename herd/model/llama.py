"""The Llama 3 transformer: RMSNorm, rotary embeddings (with 3.1 scaling), grouped-query attention, SwiGLU.

Parameter names follow Meta's checkpoints, so a Meta state dict loads as is and the other formats map onto it.
Parallelism, quantization and checkpointing wrap this module from outside; it holds no such logic itself.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype: the reference does, and bf16 variance underflows.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair angular frequencies [head_dim // 2], with Llama 3.1's wavelength-dependent slow-down applied."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return freqs
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    slowed = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    in_ramp = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_ramp, (1 - smooth) * slowed / scaling.factor + smooth * slowed, slowed)


def rotations(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The unit complex rotations [batch, seq, 1, head_dim / 2] of tokens at `positions` [batch, seq]."""
    angles = positions.to(freqs.dtype).unsqueeze(-1) * freqs
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(2)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) — Meta's layout — as complex numbers.

    x: [B, S, H, D]; rotation: complex [B, S, 1, D/2], e^(i * position * frequency).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every layer for a batch of sequences, one slot per column of the batch.

    Row b of a batch of prompts with different lengths is left-padded: its tokens occupy slots
    `start[b]:`, and attention never looks at the slots before `start[b]`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32,
                 start: torch.Tensor | None = None):
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0  # slots filled so far, the same for every row
        self.start = start if start is not None else torch.zeros(batch_size, dtype=torch.long, device=device)

    def expand(self, batch_size: int) -> None:
        """Continue a single sequence as `batch_size` rows (each a copy of what is cached so far)."""
        if len(self.start) != 1:
            raise ValueError("only a cache of one sequence can be expanded")
        self.k = [k.expand(batch_size, -1, -1, -1).clone() for k in self.k]
        self.v = [v.expand(batch_size, -1, -1, -1).clone() for v in self.v]
        self.start = self.start.expand(batch_size).clone()

    @property
    def padded(self) -> bool:
        return bool(self.start.any())


class PagedAttention(Protocol):
    """A cache that stores each layer's new keys and values itself and attends over what it holds."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, heads, tokens, head_dim], k and v [1, kv_heads, tokens, head_dim] -> [1, heads, tokens, head_dim]."""
        ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, rotation, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, s, _ = x.shape
        q = apply_rope(self.wq(x).view(b, s, self.n_heads, self.head_dim), rotation).transpose(1, 2)
        k = apply_rope(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), rotation).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and not isinstance(cache, KVCache):
            # A paged cache (the generation engine's) stores the keys and attends sequence by sequence itself.
            return self.wo(cache.attend(layer, q, k, v).transpose(1, 2).reshape(b, s, -1))
        if cache is not None:
            end = cache.length + s
            cache.k[layer][:, :, cache.length:end] = k
            cache.v[layer][:, :, cache.length:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        # With no mask, a multi-token chunk is causal over itself (the forward only omits the mask when no earlier
        # tokens are visible); a single token sees every key.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and s > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rotation, mask, cache, layer):
        h = x + self.attention(self.attention_norm(x), rotation, mask, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "rope_freqs", rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling), persistent=False
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | PagedAttention | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Float logits [batch, seq, vocab] (seq = 1 with `last_only`, len(logits_at) with `logits_at`).

        positions: rotary position of every token [batch, seq]; by default 0.. (restarting at each document when
            `document_ids` is given, continuing after the cached tokens when `cache` is given).
        document_ids: [batch, seq] ids of the packed documents; a token attends only within its own document.
        cache: a KVCache to read earlier tokens from and append these to, or a PagedAttention (then `positions`
            are required: the tokens of several sequences are laid end to end in one row).
        logits_at: the positions (indices into seq) whose logits are wanted; the others skip the output layer.
        hidden: the final normalised hidden states [batch, seq, dim] instead of logits, for a loss that applies
            the output layer itself (herd.train.fused_loss).
        """
        b, s = tokens.shape
        paged = cache is not None and not isinstance(cache, KVCache)
        if paged and positions is None:
            raise ValueError("a paged cache needs explicit positions")
        if isinstance(cache, KVCache) and cache.length + s > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens: {cache.length} cached + {s} new do not fit")
        positions = self._default_positions(b, s, document_ids, cache, tokens.device) if positions is None else positions
        rotation = rotations(positions, self.rope_freqs)
        mask = None if paged else self._mask(s, document_ids, cache, tokens.device)

        h = self.tok_embeddings(tokens)
        run = getattr(self.layers, "run", None)  # a stack of blocks that runs itself (herd.quant's fused decode)
        if run is not None:
            h = run(h, rotation, mask, cache)
        else:
            for i, layer in enumerate(self.layers):
                h = layer(h, rotation, mask, cache, i)
        if isinstance(cache, KVCache):
            cache.length += s
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[:, logits_at]
        h = self.norm(h)
        return h if hidden else self.output(h).float()

    @staticmethod
    def _default_positions(b, s, document_ids, cache, device) -> torch.Tensor:
        if document_ids is not None:
            starts = torch.ones_like(document_ids, dtype=torch.bool)
            starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            index = torch.arange(s, device=device).expand(b, s)
            doc_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
            return index - doc_start
        offset = cache.length if cache is not None else 0
        positions = torch.arange(offset, offset + s, device=device).expand(b, s)
        return positions - cache.start.unsqueeze(1) if cache is not None else positions

    @staticmethod
    def _mask(s, document_ids, cache, device) -> torch.Tensor | None:
        """A boolean [batch, 1, seq, keys] mask, or None where plain causal attention is meant."""
        if document_ids is not None:
            same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
            return (same_doc & torch.ones(s, s, dtype=torch.bool, device=device).tril()).unsqueeze(1)
        if cache is None or not (cache.padded or (cache.length and s > 1)):
            return None
        t = cache.length + s
        key_slot = torch.arange(t, device=device)
        query_slot = torch.arange(cache.length, t, device=device)
        causal = key_slot.unsqueeze(0) <= query_slot.unsqueeze(1)
        valid = key_slot.unsqueeze(0) >= cache.start.unsqueeze(1)
        # A padding slot sees only itself: a query with no visible key would make the softmax NaN, and a NaN
        # stored in the cache poisons every later query, masked or not (0 * NaN).
        itself = key_slot.unsqueeze(0) == query_slot.unsqueeze(1)
        return ((causal.unsqueeze(0) & valid.unsqueeze(1)) | itself.unsqueeze(0)).unsqueeze(1)
