"""Meta's `checklist.chk`: the MD5 of every file of a checkpoint directory, in `md5sum`'s format, as Meta's
downloads ship it (`md5sum -c checklist.chk`, `llama model verify-download`). Loading reads no checksums (hashing
16 GB would add half a minute to every start), and damage to a tensor's bytes loads without complaint: `herd verify`
checks on demand, and herd writes the list with every Meta checkpoint it saves."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tqdm import tqdm

from herd.atomic import atomic_output
from herd.checkpoint.errors import CheckpointError

CHECKLIST = "checklist.chk"
_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")  # md5sum: digest, a space, then ' ' (text) or '*' (binary)
_CHUNK = 1 << 23


def write_checklist(directory: Path) -> None:
    """The MD5 of every file in `directory` (but the list itself), in md5sum's format."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKLIST)
    with atomic_output(directory / CHECKLIST) as tmp:
        tmp.write_text("".join(f"{_md5(p)}  {p.name}\n" for p in files))


def read_checklist(path: Path) -> list[tuple[str, str]]:
    """(md5, file name) of each line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); download it again") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line.rstrip("\r"))
        name = match and match[2].removeprefix("./")
        if not match or "/" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: line {number} is not an MD5 and a file name of this directory "
                                  f"({line[:60]!r}); download the list again")
        entries.append((match[1].lower(), name))
    if not entries:
        raise CheckpointError(f"{path}: lists no files; download it again")
    return entries


def verify_checklist(directory: Path, progress: bool = True) -> tuple[int, int]:
    """(files, bytes) checked against `directory`'s checklist.chk; a CheckpointError naming every file that is
    missing or differs."""
    entries = read_checklist(directory / CHECKLIST)
    missing = [name for _, name in entries if not (directory / name).is_file()]
    present = [(digest, directory / name) for digest, name in entries if name not in missing]
    total = sum(path.stat().st_size for _, path in present)
    with tqdm(total=total, unit="B", unit_scale=True, desc="md5", disable=not progress) as bar:
        differ = [path.name for digest, path in present if _md5(path, bar) != digest]
    if missing or differ:
        problems = [f"{name} differs" for name in differ] + [f"{name} is missing" for name in missing]
        raise CheckpointError(f"{directory}: {', '.join(problems)} (against {CHECKLIST}); "
                              f"download {'it' if len(problems) == 1 else 'them'} again")
    return len(present), total


def _md5(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()
