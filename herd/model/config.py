"""Model configuration: one dataclass, and the named Llama 3 / 3.1 / 3.2 configurations."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from herd.bounds import AT_LEAST_ONE, POSITIVE, check_shape, require


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        # The ramp divides by high - low: equal factors made every rotary frequency NaN, and so every logit.
        require(self, POSITIVE, "factor", "low_freq_factor")
        require(self, AT_LEAST_ONE, "original_max_position")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"rope scaling's high_freq_factor ({self.high_freq_factor}) must exceed its "
                             f"low_freq_factor ({self.low_freq_factor})")


# A hundred times Llama 3.1 405B: past it a configuration is a typo (an ffn_dim_multiplier of 1e30), which had reached
# the memory allocator.
MAX_PARAMETERS = 4e13


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # Meta's checkpoints derive the SwiGLU width from multiple_of / ffn_dim_multiplier; HF and GGUF state it outright.
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self):
        # vocab_size is left out: Meta's params.json may say -1, for the embedding's rows.
        check_shape(self)
        require(self, AT_LEAST_ONE, "ffn_hidden_dim")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"the head width dim / n_heads = {self.head_dim} is odd: rotary embeddings turn pairs")
        if (size := self._size()) > MAX_PARAMETERS:
            raise ValueError(f"the configuration describes {size:.3g} parameters, past the {MAX_PARAMETERS:.0e} herd "
                             "can hold: check dim, vocab_size and the feed-forward width (ffn_dim_multiplier)")

    def _size(self) -> float:
        """The parameter count, in floating point: a width of 1e30 (ffn_dim_multiplier) is counted, not built."""
        hidden = self.ffn_hidden_dim or 8 * self.dim / 3 * (self.ffn_dim_multiplier or 1)
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        per_layer = attention + 3 * self.dim * float(hidden) + 2 * self.dim
        return max(self.vocab_size, 0) * self.dim * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, n_kv_heads=8)
_SCALED = RopeScaling(factor=8.0)
# Llama 3.2's small models were released with the same ramp but a larger slow-down (factor 32).
_SCALED_32 = RopeScaling(factor=32.0)

CONFIGS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama3-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama3.1-8b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3,
        rope_scaling=_SCALED, max_seq_len=131072, **_LLAMA3,
    ),
    "llama3.1-70b": ModelConfig(
        dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3,
        rope_scaling=_SCALED, max_seq_len=131072, **_LLAMA3,
    ),
    "llama3.1-405b": ModelConfig(
        dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2,
        rope_scaling=_SCALED, max_seq_len=131072, **_LLAMA3,
    ),
    "llama3.2-1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5,
        rope_scaling=_SCALED_32, max_seq_len=131072, tie_embeddings=True, **_LLAMA3,
    ),
    "llama3.2-3b": ModelConfig(
        dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0,
        rope_scaling=_SCALED_32, max_seq_len=131072, tie_embeddings=True, **_LLAMA3,
    ),
}
