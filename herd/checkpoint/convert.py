"""Reading any format, writing any format, and the two together."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from herd.atomic import atomic_output, usual_mode
from herd.checkpoint.base import Checkpoint, check_shapes
from herd.checkpoint.detect import FORMATS, checkpoint_root, detect_format
from herd.checkpoint.errors import CheckpointError


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """Config, lazily read weights (Meta names, converted to `dtype`; None keeps the stored dtype, and
    dequantizes GGUF blocks to float32), and the tokenizer of the checkpoint at `path`."""
    fmt = detect_format(path)
    root = checkpoint_root(path, fmt)
    if fmt == "meta":
        from herd.checkpoint.meta import load_meta

        return load_meta(root, dtype)
    if fmt == "hf":
        from herd.checkpoint.hf import load_hf

        return load_hf(root, dtype)
    from herd.checkpoint.gguf import load_gguf

    return load_gguf(root, dtype)


def save_checkpoint(
    ckpt: Checkpoint | tuple,
    out: str | Path,
    format: str,
    *,
    gguf_type: str = "F16",
    shards: int = 1,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `ckpt` (or a `(config, state_dict[, tokenizer])` tuple) to `out` in `format`, atomically.

    Everything is written beside `out` under a temporary name and renamed into place at the end, so an
    interrupted save leaves no half-written checkpoint. `out` is a directory for "meta" / "hf", a file for "gguf".
    shards: Meta model-parallel files; max_shard_bytes: HF safetensors shard size; gguf_type: GGUF tensor type.
    """
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(ckpt, Checkpoint):
        config, state_dict, *rest = ckpt
        ckpt = Checkpoint(config, state_dict, tokenizer=rest[0] if rest else None)
    check_shapes(ckpt.config, ckpt.state_dict, str(ckpt.source or "state dict"), "the config")
    out = Path(out)
    if ckpt.source is not None and out.exists() and out.resolve() == Path(ckpt.source).resolve():
        raise CheckpointError(f"{out}: is the checkpoint being read; write to another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "gguf":
        from herd.checkpoint.gguf import save_gguf

        with atomic_output(out) as tmp:
            save_gguf(ckpt, tmp, gguf_type)
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        usual_mode(tmp)
        if format == "meta":
            from herd.checkpoint.meta import save_meta

            save_meta(ckpt, tmp, shards)
        else:
            from herd.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES, save_hf

            save_hf(ckpt, tmp, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is set aside first and removed only once the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output path")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def convert(src: str | Path, out: str | Path, format: str, *, dtype: torch.dtype | None = None, **kw) -> Path:
    """Read the checkpoint at `src` and write it to `out` in `format`, tensor by tensor.

    dtype None keeps the stored precision (bit-exact between Meta and HF); GGUF blocks are dequantized to float32.
    """
    return save_checkpoint(load_checkpoint(src, dtype=dtype), out, format, **kw)
