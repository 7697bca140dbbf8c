"""Where a configuration's numbers may lie (a model's shape, a training run's settings, sampling parameters),
checked when the dataclass is made, so that a width of 0, a negative step count or a NaN temperature is one line
naming the field instead of a ZeroDivisionError deep in a run (or, worse, a run that goes ahead: a model of -1
layers trained as one of none, a NaN temperature sampled an empty reply)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral


@dataclass(frozen=True)
class Bounds:
    """A finite number from low to high, each end included unless it is open."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_ONE = Bounds(1)
NON_NEGATIVE = Bounds(0)
POSITIVE = Bounds(0, low_open=True)
FRACTION = Bounds(0, 1)
NONZERO_FRACTION = Bounds(0, 1, low_open=True)  # top_p: some mass is kept
FRACTION_BELOW_ONE = Bounds(0, 1, high_open=True)  # a dropout, a held-out share, Adam's betas
FINITE = Bounds()


def require_kind(config: object, kind: type, *names: str, optional: bool = False) -> None:
    """TypeError naming the first of `config`'s fields `names` that is no `kind` (Integral or Real; a bool is
    neither, True being no count), None allowed where `optional`: a float block size or a string temperature had
    failed deep in a run, or compared with a bound as some other error."""
    for name in names:
        value = getattr(config, name)
        if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, kind)):
            raise TypeError(f"{name} must be {'an integer' if kind is Integral else 'a number'}, got {value!r}")


def require(config: object, bounds: Bounds, *names: str) -> None:
    """ValueError naming the first of `config`'s fields `names` that is set (not None) and outside `bounds`."""
    for name in names:
        require_value(name, getattr(config, name), bounds)


def require_value(name: str, value: float | None, bounds: Bounds) -> None:
    """ValueError naming `name` where `value` is set (not None) and outside `bounds`."""
    if value is not None and not bounds.holds(value):
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def ordered(config: object, low: str, high: str) -> None:
    """ValueError where `config`'s field `low` is above its field `high` (a range no value can fall in)."""
    if getattr(config, low) > getattr(config, high):
        raise ValueError(f"{low} ({getattr(config, low)!r}) must not exceed {high} ({getattr(config, high)!r})")


# Far past any model trained (Llama 3.1 405B has 126 layers), short of what hangs the process that builds it: a
# configuration of 4e9 layers had `herd info` build modules until memory ran out.
MAX_LAYERS = 10_000


def check_shape(config: object) -> None:
    """A ValueError naming the first of a model's shape fields out of its range: a ModelConfig's, or a training
    config's model section's, which has the same fields (kept here, since the training config imports no torch)."""
    require(config, AT_LEAST_ONE, "dim", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len")
    require(config, Bounds(1, MAX_LAYERS), "n_layers")
    require(config, POSITIVE, "ffn_dim_multiplier", "rope_theta")
    require(config, NON_NEGATIVE, "norm_eps")
