"""Writing files: so that a crash leaves the old file or none, never a half-written one, and with the permissions
any other new file gets."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def temporary_path(path: Path, kind: str = "tmp") -> Path:
    """Where this process writes `path` (kind "tmp") or sets the old `path` aside ("old"): `.NAME.KIND-PID` beside
    it, a name by which the next run to `path` knows what a killed run left there (see prepare_output)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block finishes.

    A crash leaves either the old file or none, never a half-written one, which is what lets a re-run
    trust every file it finds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty directory beside `path`; it replaces `path` (a directory, or nothing) only if the block
    finishes, and an old `path` is removed only once the new one is in place. Whether `path` may be replaced is for
    the caller to decide, before the work.

    A mount point (`docker -v`), which no rename can replace, or an existing empty `path` (maybe one, under a
    parent this user cannot write) is written into instead, through a temporary directory inside it whose files
    replace what it held at the end."""
    into = _written_into(path)
    if not into:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path / temporary_path(path).name if into else temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a run killed under this process id (PIDs repeat in containers)
    tmp.mkdir()
    try:
        yield tmp
        if into:
            for old in path.iterdir():  # a second run into a mount point had failed here, after all its work
                if old != tmp:
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            for entry in tmp.iterdir():
                entry.rename(path / entry.name)
        else:
            _replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _written_into(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (os.path.ismount(path) or next(path.iterdir(), None) is None)


def _replace_directory(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`, an existing `path` set aside first and put back if that fails, even on an interrupt:
    a set-aside copy left behind would be taken for a killed run's and removed by the next run."""
    if not path.exists():
        tmp.rename(path)
        return
    old = temporary_path(path, "old")
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def make_directory(path: Path, name: str) -> None:
    """`path` made where it is missing; an OSError naming `name` (the option or field that gave it) and the path
    where it cannot be made or written, which had read as a bare Errno line or "not found"."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{name} {path} cannot be made ({e.strerror or e}); give a directory you can write to") from None
    if not os.access(path, os.W_OK):
        raise OSError(f"{name} {path} is not writable; give a directory you can write to")


def prepare_output(path: str | Path, kind: str, option: str) -> Path:
    """`path` as it will be written ("." and ".." resolved to real names, which a rename needs), once it is clear
    that a `kind` ("file" or "directory") can be written there, with what runs to it that were killed left beside
    it removed. Refused in one line naming `path` and what to give `option` instead, before the work: such a
    failure after an hour's work, or naming a temporary file, helps no one."""
    path = Path(path)
    if path.name in ("", ".."):
        path = path.resolve()

    def refuse(reason: str) -> OSError:
        return OSError(f"cannot write {path}: {reason}; give {option} a {kind} you can write to")

    if not path.name:
        raise refuse("it is the root directory")
    if kind == "file" and path.is_dir():
        raise refuse(os.strerror(errno.EISDIR))
    if kind == "directory" and path.exists() and not path.is_dir():
        raise refuse(os.strerror(errno.ENOTDIR))
    # an empty directory is written into (atomic_directory), so only it need be writable: a mount point's parent
    # often is not
    nearest = path if kind == "directory" and _written_into(path) else \
        next(parent for parent in path.absolute().parents if parent.exists())
    try:  # a file made and removed tells what permissions do not (root passes them; /proc refuses even root)
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=nearest)
    except OSError as error:
        raise refuse(error.strerror or type(error).__name__) from None
    os.close(handle)
    os.unlink(probe)
    _remove_stale(path)
    return path


def _remove_stale(path: Path) -> None:
    """Remove the temporary and set-aside copies of `path` (temporary_path) whose process is gone: SIGKILL, a
    power cut or a container stopped leave them behind, as large as the output (a 514 MB model)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d{{1,7}})")  # PIDs stay under 2**22
    beside = path.parent.iterdir() if path.parent.is_dir() else ()
    inside = path.iterdir() if path.is_dir() and not path.is_symlink() else ()  # atomic_directory's, writing into it
    for entry in [*beside, *inside]:
        found = pattern.fullmatch(entry.name)
        if found and not _alive(int(found.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether another process `pid` runs; this one's own leftovers are from a killed run under a repeated PID."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process killed with the parent that would reap it (`timeout -s KILL` ends both) stays a zombie, whom
    os.kill still finds, until init reaps it: seconds, in a container."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[:1] == [b"Z"]
    except OSError:
        return False


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
