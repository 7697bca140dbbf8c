"""What every format loads into: a config, lazily read weights under Meta's names, and the tokenizer."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.checkpoint.errors import CheckpointError
from herd.model.config import ModelConfig


@dataclass(frozen=True)
class LazyTensor:
    """A tensor not read yet: its shape is known from the file's header, `read` reads it as stored (in `stored`,
    where the header says), `load` also converts it to `dtype` (None: kept as stored)."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    dtype: torch.dtype | None = None
    stored: torch.dtype | None = None

    def load(self) -> torch.Tensor:
        # .to() of a tensor already in the dtype is the tensor itself: no copy is made.
        tensor = self.read()
        return tensor if self.dtype is None else tensor.to(self.dtype)


class LazyStateDict(MutableMapping[str, torch.Tensor]):
    """A state dict whose tensors are read from disk when looked up, one at a time.

    Nothing is cached: converting a checkpoint streams it tensor by tensor, so peak memory stays near one tensor,
    and loading a model keeps only the copies the model holds. Assigned tensors replace the lazy ones.
    """

    def __init__(self, entries: Mapping[str, LazyTensor | torch.Tensor] | None = None):
        self._entries: dict[str, LazyTensor | torch.Tensor] = dict(entries or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return entry.load() if isinstance(entry, LazyTensor) else entry

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._entries[name] = tensor

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: object) -> bool:
        # Mapping's own `in` looks the item up, which here would read (and dequantize) the tensor.
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name].shape)

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype `stored(name)` returns, from the file's header (None where it does not say)."""
        entry = self._entries[name]
        return entry.stored if isinstance(entry, LazyTensor) else entry.dtype

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as the file stores it (bfloat16, say), unconverted: for a reader that converts a part at a
        time, where the whole tensor in float32 would be the largest allocation of a load."""
        entry = self._entries[name]
        return entry.read() if isinstance(entry, LazyTensor) else entry

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors)"


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: MutableMapping[str, torch.Tensor]
    format: str = "memory"
    tokenizer: object | None = None
    source: Path | None = None
    meta: dict = field(default_factory=dict)
    # Quantized tensors as the file stores them, by Meta name: (type, bytes [rows, bytes per row]), mapped, so a
    # scheme can compute on the blocks themselves instead of the float32 the state dict would expand them to.
    blocks: dict[str, tuple[str, object]] = field(default_factory=dict)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `Transformer(config)` holds, in Meta's names and file order; a tied output is left out."""
    d, hd, hidden = config.dim, config.head_dim, config.hidden_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (config.n_heads * hd, d),
            p + "attention.wk.weight": (config.kv_heads * hd, d),
            p + "attention.wv.weight": (config.kv_heads * hd, d),
            p + "attention.wo.weight": (d, config.n_heads * hd),
            p + "feed_forward.w1.weight": (hidden, d),
            p + "feed_forward.w2.weight": (d, hidden),
            p + "feed_forward.w3.weight": (hidden, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        }
    shapes["norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


def tensor_shape(state_dict: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return state_dict.shape(name) if isinstance(state_dict, LazyStateDict) else tuple(state_dict[name].shape)


def check_shapes(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], where: str, culprit: str) -> None:
    """Raise unless `state_dict` holds exactly the tensors `config` implies (a tied output may also be present).

    `culprit` names the config file, e.g. "the params.json", for the message.
    """
    expected = expected_shapes(config)
    if config.tie_embeddings and "output.weight" in state_dict:
        expected["output.weight"] = expected["tok_embeddings.weight"]
    for name, shape in expected.items():
        if name not in state_dict:
            raise CheckpointError(f"{where}: tensor {name} is missing; {culprit} does not match the weights")
        actual = tensor_shape(state_dict, name)
        if actual != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(actual)}, expected {list(shape)} from the config; "
                f"{culprit} does not match the weights"
            )
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensors {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}; "
            f"{culprit} does not match the weights"
        )
