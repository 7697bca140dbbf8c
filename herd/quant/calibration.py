"""Calibration statistics for error-minimising schemes, from real text that ships with herd (the Apache License
2.0, a text unlike the GPL the fidelity tests measure on)."""
from __future__ import annotations

from pathlib import Path

import torch

from herd.quant.gptq import hessians
from herd.quant.schemes import Scheme, linear_names

CALIBRATION_TEXT = Path(__file__).parent / "resources" / "calibration.txt"


def calibration_hessians(model, tokenizer, scheme: Scheme, *, tokens: int = 2048, window: int = 512,
                         text: str | None = None) -> dict[str, torch.Tensor]:
    ids = tokenizer.encode(text or CALIBRATION_TEXT.read_text(), bos=False)[:tokens]
    device = next(model.buffers()).device
    batches = [torch.tensor([ids[i : i + window]], device=device) for i in range(0, len(ids), window)]
    names = [n for n in linear_names(model) if not scheme.keeps(n)]
    return hessians(model, batches, names)
