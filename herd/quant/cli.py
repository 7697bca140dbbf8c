"""`herd quantize MODEL --scheme ... --out DIR`: quantize once, load many times."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer


def quantize(
    model: str = typer.Argument("default", help="a checkpoint path (Meta, HF or GGUF), or default"),
    scheme: str = typer.Option(..., help="int8, int8-wo, int4, int4-g64, int4-g128-gptq, fp8 or gguf"),
    out: Path = typer.Option(..., help="the output directory (loadable by herd.load; `herd convert` expands it)"),
    keep: Optional[List[str]] = typer.Option(None, help="module names or patterns left in float32, e.g. output"),
    calibration: Optional[List[Path]] = typer.Option(None, help="-gptq: text to calibrate on, plain or JSON Lines "
                                                     "with a \"text\" field (repeatable; default: the Apache "
                                                     "License that ships with herd)"),
    calibration_tokens: Optional[int] = typer.Option(None, min=1, help="-gptq: how many of the calibration text's "
                                                     "tokens (default 2048)"),
):
    """Quantize a model's weights and write them with the scheme and a checksum per tensor."""
    import torch

    import herd
    from herd.atomic import atomic_directory
    from herd.checkpoint.base import Checkpoint
    from herd.checkpoint.convert import check_output
    from herd.checkpoint.hf import hf_config
    from herd.checkpoint.vocab import write_tokenizer
    from herd.llm import resolve_model_path
    from herd.quant.blocks import BlockEmbedding, BlockLinear
    from herd.quant.schemes import Calibration, Scheme
    from herd.quant.store import FILE, save_quantized

    parsed = Scheme.parse(scheme, tuple(keep or ()))
    if parsed.method != "gptq" and (calibration or calibration_tokens):
        raise ValueError(f"--calibration and --calibration-tokens calibrate GPTQ; {parsed.name} takes none: use a "
                         "-gptq scheme such as int4-gptq")
    missing = [str(path) for path in calibration or () if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"calibration file {missing[0]} not found: give a text or JSON Lines file")
    tokens = {"tokens": calibration_tokens} if calibration_tokens else {}
    parsed = dataclasses.replace(parsed, calibration=Calibration(tuple(map(str, calibration or ())), **tokens))
    started = time.perf_counter()
    model = None if model == "default" else model
    out = check_output(out, "hf", resolve_model_path(model), "--out")
    with atomic_directory(out) as tmp:  # an interruption leaves no half a model
        llm = herd.load(model, quantize=parsed, device="cpu")
        if parsed.kind == "gguf" and not any(isinstance(m, (BlockLinear, BlockEmbedding)) for m in llm.model.modules()):
            raise ValueError(f"{model or 'the default model'} holds no GGUF quantized tensors for the gguf scheme to "
                             "keep: choose int8, int4 or fp8 to quantize it")
        save_quantized(llm.model, parsed.to_dict(), tmp / FILE)
        config = hf_config(llm.model.config, torch.float32, llm.tokenizer)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(Checkpoint(llm.model.config, {}, tokenizer=llm.tokenizer), tmp, "hf")
    print(f"wrote {out} ({parsed.name}) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
