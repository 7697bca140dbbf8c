"""Writing files: so that a crash leaves the old file or none, never a half-written one, and with the permissions
any other new file gets."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block finishes.

    A crash leaves either the old file or none, never a half-written one, which is what lets a re-run
    trust every file it finds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, leaving the file readable as the umask allows. safetensors 0.8 creates it 0600
    whatever the umask (safetensors issue 782), so a model written by one user, or by root in a container build,
    would be unreadable to everyone else."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    usual_mode(path)


def usual_mode(path: Path) -> None:
    """Give `path` the permissions a file or directory made with open() or mkdir() gets under the umask: what
    safetensors and tempfile.mkdtemp create is private to its owner."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_UMASK)
