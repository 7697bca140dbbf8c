"""GPTQ (Frantar et al., 2022) for herd's int4 groups: weights rounded one column at a time, each rounding error
spread over the columns not yet rounded so that the layer's output on calibration text moves as little as possible.

The Hessian of a layer is X^T X / tokens over the calibration tokens that reach it (`hessians`, `HessianSum`).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn

from herd.quant.blocks import BlockWeight, pack_nibbles


class HessianSum:
    """X^T X / tokens over the inputs added ([..., K] each), summed in float64 as they add up."""

    def __init__(self):
        self.sum, self.count = None, 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        self.sum = x.T @ x if self.sum is None else self.sum + x.T @ x
        self.count += x.shape[0]

    def value(self) -> torch.Tensor | None:
        return None if self.sum is None else (self.sum / self.count).float()


@torch.inference_mode()
def hessians(layers: Mapping[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The Hessian of each layer's input while `run()` feeds them. Layers that read one tensor (a block's query,
    key and value projections; its gate and up projections) share one sum and one Hessian: Llama 3.1 8B's three
    4096-wide ones took a few seconds a block in float64, and GPTQ inverts a shared Hessian once."""
    sums: dict[str, HessianSum] = {}
    last: list = [None, None]  # the input seen last, and the sum it went into

    def record(name: str, x: torch.Tensor) -> None:
        if name not in sums:
            sums[name] = last[1] if x is last[0] else HessianSum()
        if x is not last[0]:
            last[:] = [x, sums[name]]
            sums[name].add(x)

    handles = [layer.register_forward_pre_hook(lambda module, args, name=name: record(name, args[0]))
               for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    values = {id(total): total.value() for total in sums.values()}
    return {name: values[id(total)] for name, total in sums.items() if values[id(total)] is not None}


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor | None, group: int, *, damp: float = 0.01,
              block: int = 128) -> BlockWeight:
    """4-bit codes with a scale and min per group (as quantize_int4 stores them), chosen by GPTQ."""
    if hessian is None:
        raise ValueError("GPTQ needs calibration statistics for every layer it quantizes")
    w = weight.detach().float().clone()
    n, k = w.shape
    dead = hessian.diagonal() == 0
    w[:, dead] = 0
    hinv = _inverse_factor(hessian, damp)
    # Rounded column by column, so held transposed, each column contiguous: a 4096 x 4096 weight took 3.5 s, 2.8 so.
    codes = torch.empty(k, n, device=w.device)
    scales = torch.empty(k // group, n, device=w.device)
    mins = torch.empty(k // group, n, device=w.device)
    block = max(group, block // group * group)  # groups never straddle blocks
    for i1 in range(0, k, block):
        i2 = min(k, i1 + block)
        w1, hinv1 = w[:, i1:i2].T.clone(), hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(w1)
        for i in range(i2 - i1):
            column = i1 + i
            if column % group == 0:
                g = column // group
                current = w1[i : i + group]
                low, high = current.amin(0), current.amax(0)
                scales[g] = ((high - low) / 15).clamp(min=1e-12)
                mins[g] = low
            s, m = scales[column // group], mins[column // group]
            q = torch.round((w1[i] - m) / s).clamp(0, 15)
            codes[column] = q
            error = (w1[i] - (q * s + m)) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:, None] * error[None, :]
            errors[i] = error
        w[:, i2:] -= errors.T @ hinv[i1:i2, i2:]
    return BlockWeight(pack_nibbles(codes.T.contiguous()), scales.T.contiguous(), mins.T.contiguous(), 4, group)


# The last call's Hessian (a weak reference: the factor goes when the Hessian does), damp and factor.
_last_factor: list = [None, None, None]


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped H^-1 (row i holds how the later columns absorb column i's error),
    kept while the Hessian lives for the next call with it: a block's query, key and value projections share theirs
    (an 8B down projection's 14336-wide one takes 18 s to invert on two cores)."""
    if _last_factor[0] is not None and _last_factor[0]() is hessian and _last_factor[1] == damp:
        return _last_factor[2]
    h = hessian.clone().float()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    _last_factor[:] = [weakref.ref(hessian, _forget), damp, factor]
    return factor


def _forget(ref: weakref.ref) -> None:
    if _last_factor[0] is ref:
        _last_factor[:] = [None, None, None]
