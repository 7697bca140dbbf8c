"""Where herd keeps what it derives once per machine and can derive again (compiled kernels, machine
translations): $HERD_CACHE, else $XDG_CACHE_HOME/herd, else ~/.cache/herd. Where that cannot be written (no home
directory, a read-only root, a service user), a directory of this user's under the temporary directory, as PyTorch's
inductor does: otherwise every process would go without the kernel, several times slower."""
from __future__ import annotations

import functools
import os
import stat
import sys
import tempfile
from pathlib import Path


def _preferred_base() -> Path | None:
    """None where no home directory can be determined (no HOME, a uid without a passwd entry)."""
    if os.environ.get("HERD_CACHE"):  # an empty one is unset, not the working directory
        return Path(os.environ["HERD_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative path is invalid and ignored
        return Path(xdg) / "herd"
    try:
        return Path.home() / ".cache" / "herd"
    except RuntimeError:
        return None


def _fallback_base() -> Path:
    return Path(tempfile.gettempdir()) / f"herd-cache-{os.getuid()}"


def _ours(base: Path) -> bool:
    """Whether `base` is a directory only this user can write: in a shared /tmp another user could have made the
    fallback first, and a kernel library loaded from there would run their code."""
    try:
        info = base.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def cache_dirs(name: str) -> list[Path]:
    """The directories a cached `name` ("kernels", "translations") may already be in, the preferred first: one made
    read-only with what it holds (a prebuilt image) still serves."""
    preferred, fallback = _preferred_base(), _fallback_base()
    return [base / name for base in ([preferred] if preferred else []) + ([fallback] if _ours(fallback) else [])]


def cached(name: str, filename: str) -> Path | None:
    """Where `filename` already is in `name`'s cache, or None."""
    return next((path for path in (d / filename for d in cache_dirs(name)) if path.is_file()), None)


def writable_cache_dir(name: str) -> Path:
    """The directory to write `name`'s new entries to, made where missing: the preferred one where it can be
    written, else the fallback (said once on stderr). An OSError naming HERD_CACHE where neither can be."""
    preferred = _preferred_base()
    if preferred is not None:
        try:
            (preferred / name).mkdir(parents=True, exist_ok=True)
            if os.access(preferred / name, os.W_OK):
                return preferred / name
            why = "is not writable"
        except OSError as error:
            why = f"cannot be made ({error.strerror or error})"
        where = f"{preferred / name} {why}"
    else:
        where = "no home directory"
    base = _fallback_base()
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        if not _ours(base):
            raise OSError(f"{base} is not a directory that only this user can write")
        (base / name).mkdir(exist_ok=True)
    except OSError as error:
        raise OSError(f"no cache directory can be written ({where}; {error}): set HERD_CACHE to a directory you "
                      "can write to") from None
    fallback = base / name
    _said(where, fallback)
    return fallback


@functools.cache
def _said(where: str, fallback: Path) -> None:
    print(f"herd: cache: {where}; using {fallback} (set HERD_CACHE to keep it elsewhere)", file=sys.stderr)
