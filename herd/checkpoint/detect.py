"""Which of the three layouts a path holds."""
from __future__ import annotations

from pathlib import Path

from herd.checkpoint.errors import CheckpointError

FORMATS = ("meta", "hf", "gguf")


def detect_format(path: str | Path) -> str:
    """"meta" (a dir with params.json), "hf" (a dir with config.json) or "gguf" (a .gguf file, or a dir with one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; give a checkpoint directory or a .gguf file")
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return "gguf"
        if path.name in ("params.json", "config.json") or path.suffix in (".pth", ".safetensors"):
            return detect_format(path.parent)
        raise CheckpointError(f"{path}: not a checkpoint file; give a .gguf file or a Meta / Hugging Face directory")
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise CheckpointError(f"{path}: holds several .gguf files ({names}); give the one to use")
    raise CheckpointError(
        f"{path}: no params.json (Meta), config.json (Hugging Face) or .gguf file here; give a checkpoint directory"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def checkpoint_root(path: str | Path, fmt: str) -> Path:
    """The directory (Meta, HF) or file (GGUF) a loader reads, from whatever the user pointed at."""
    path = Path(path)
    if fmt == "gguf":
        return path if path.is_file() else next(path.glob("*.gguf"))
    return path.parent if path.is_file() else path
