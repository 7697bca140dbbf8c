"""Reading any format, writing any format, and the two together."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from herd.atomic import atomic_directory, atomic_output, prepare_output
from herd.checkpoint.base import Checkpoint, check_shapes
from herd.checkpoint.checksums import CHECKLIST
from herd.checkpoint.detect import FORMATS, _has_gguf_magic, checkpoint_root, detect_format
from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.hf import INDEX

# The files of a checkpoint herd writes (Meta, Hugging Face, `herd quantize`): a directory holding a config, weights
# and nothing else is one herd wrote or could have, and may be replaced; any other file in it may be the user's.
_CONFIGS = frozenset(("params.json", "config.json"))
# What `herd finetune` writes beside a reward model's body: its scoring head, replaced with the body on a rerun.
REWARD_HEAD = "reward_head.safetensors"
_WEIGHTS = re.compile(r"consolidated\.\d{2,}\.pth|model(-\d{5,}-of-\d{5,})?\.safetensors|quantized\.safetensors")


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
    interrupted save leaves no half-written checkpoint. `out` is a directory for "meta" / "hf", a file for "gguf";
    one that exists is replaced only if it is a checkpoint (check_output).
    shards: Meta model-parallel files; max_shard_bytes: HF safetensors shard size; gguf_type: GGUF tensor type.
    """
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; use one of {', '.join(FORMATS)}")
    if shards < 1:
        raise CheckpointError(f"shards must be at least 1 (Meta's model-parallel files), not {shards}")
    if not isinstance(ckpt, Checkpoint):
        config, state_dict, *rest = ckpt
        ckpt = Checkpoint(config, state_dict, tokenizer=rest[0] if rest else None)
    check_shapes(ckpt.config, ckpt.state_dict, str(ckpt.source or "state dict"), "the config")
    out = check_output(out, format, ckpt.source)
    if format == "gguf":
        from herd.checkpoint.gguf import save_gguf

        with atomic_output(out) as tmp:
            save_gguf(ckpt, tmp, gguf_type)
        return out
    with atomic_directory(out) as tmp:
        if format == "meta":
            from herd.checkpoint.meta import save_meta

            save_meta(ckpt, tmp, shards)
        else:
            from herd.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES, save_hf

            save_hf(ckpt, tmp, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    return out


def check_output(out: str | Path, format: str, source: str | Path | None = None, option: str = "OUT") -> Path:
    """`out` resolved as prepare_output does for a `format` checkpoint, refused before any work where writing there
    would lose data: where it is, holds or lies inside the checkpoint read (`source`), or where it is an existing
    directory or file other than a checkpoint, which replacing would delete."""
    out = prepare_output(out, "file" if format == "gguf" else "directory", option)
    if source is not None:
        _check_apart(out, Path(source))
    if format == "gguf":
        _check_replaceable_file(out)
    else:
        _check_replaceable_directory(out)
    return out


def _check_apart(out: Path, source: Path) -> None:
    written, read = out.resolve(), source.resolve()
    if written == read or written in read.parents:
        raise CheckpointError(f"{out}: is or holds the checkpoint being read ({source}); write to another path")
    if read in written.parents:
        raise CheckpointError(f"{out}: lies inside the checkpoint being read ({source}); write to a path outside it")


def _check_replaceable_directory(out: Path) -> None:
    if not out.is_dir():
        return
    from herd.checkpoint.vocab import TOKENIZER_FILES  # imports gguf (0.14 s): not at herd's import

    known = _CONFIGS | {CHECKLIST, INDEX, REWARD_HEAD, *TOKENIZER_FILES}
    entries = sorted(out.iterdir())
    foreign = [entry.name for entry in entries
               if not (entry.is_file() and (entry.name in known or _WEIGHTS.fullmatch(entry.name)))]
    if foreign:
        raise CheckpointError(f"{out}: exists and holds {foreign[0]}, which is no checkpoint file, and replacing the "
                              "directory would delete it; give a path that does not exist, or an empty directory")
    names = {entry.name for entry in entries}
    if names and not (_CONFIGS & names and any(_WEIGHTS.fullmatch(name) for name in names)):
        raise CheckpointError(f"{out}: exists and holds no checkpoint (a config and its weights), and replacing it "
                              "would delete its files; give a path that does not exist, or an empty directory")


def _check_replaceable_file(out: Path) -> None:
    if out.is_file() and out.stat().st_size and not _has_gguf_magic(out):
        raise CheckpointError(f"{out}: exists and is no GGUF file, and replacing it would delete it; give a path that "
                              "does not exist")


def convert(src: str | Path, out: str | Path, format: str, *, dtype: torch.dtype | None = None, **kw) -> Path:
    """Read the checkpoint at `src` and write it to `out` in `format`, tensor by tensor.

    dtype None keeps the stored precision (bit-exact between Meta and HF); GGUF blocks are dequantized to float32.
    """
    return save_checkpoint(load_checkpoint(src, dtype=dtype), out, format, **kw)
