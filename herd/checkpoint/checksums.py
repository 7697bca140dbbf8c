"""The checksums a checkpoint came with, checked on demand (`herd verify`): loading reads none, since hashing 16 GB
would add half a minute to every start, and damage to a tensor's bytes loads without complaint.

- Meta's `checklist.chk`: the MD5 of every file, in `md5sum`'s format, as Meta's downloads ship it (`md5sum -c
  checklist.chk`, `llama model verify-download`); herd writes one with every Meta checkpoint it saves.
- What Hugging Face's downloader recorded: in its cache a snapshot's files link to blobs named by their digest, and
  a `--local-dir` download keeps each file's ETag in `.cache/huggingface/download/NAME.metadata`. Either is the
  file's SHA-256 (files stored with LFS: the weights) or its git blob SHA-1 (small files).
"""
from __future__ import annotations

import hashlib
import os
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
        tmp.write_text("".join(f"{_digest(p, 32)}  {p.name}\n" for p in files))


def file_md5(path: Path) -> str:
    return _digest(path, 32)


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


def hub_digests(directory: Path) -> list[tuple[str, Path]]:
    """(digest, file) of each file Hugging Face's downloader recorded in `directory`. The metadata files are read
    here, not through huggingface_hub, which ignores (and deletes) the record of a file changed since its download:
    the very case to report."""
    digest = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
    found = []
    for root, folders, files in os.walk(directory):  # subfolders too (Llama repositories keep original/), no links
        folders[:] = sorted(f for f in folders if f != ".cache")
        for path in (Path(root) / name for name in sorted(files)):
            blob = Path(os.readlink(path)).name if path.is_symlink() else ""
            if digest.fullmatch(blob):
                found.append((blob, path))
    records = directory / ".cache" / "huggingface" / "download"
    for record in sorted(records.rglob("*.metadata")) if records.is_dir() else ():
        lines = record.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) >= 2 and digest.fullmatch(lines[1].strip()):
            found.append((lines[1].strip(), directory / record.relative_to(records).with_suffix("")))
    return found


def verify(directory: Path, progress: bool = True) -> tuple[int, int, str]:
    """(files, bytes, against what) checked in `directory`: its checklist.chk, else what Hugging Face's downloader
    recorded; a CheckpointError naming every file that is missing or differs, or saying there is nothing to check."""
    if (directory / CHECKLIST).is_file():
        entries, source = read_checklist(directory / CHECKLIST), CHECKLIST
        entries = [(digest, directory / name) for digest, name in entries]
    else:
        entries, source = hub_digests(directory), "the digests Hugging Face's downloader recorded"
    if not entries:
        raise CheckpointError(f"{directory}: holds no checksums to check against (a Meta download's {CHECKLIST}, "
                              "a Hugging Face download's records, or a `herd quantize` directory's)")
    missing = [path for _, path in entries if not path.is_file()]
    present = [(digest, path) for digest, path in entries if path.is_file()]
    total = sum(path.stat().st_size for _, path in present)
    with tqdm(total=total, unit="B", unit_scale=True, desc="checksums", disable=not progress) as bar:
        differ = [path for digest, path in present if _digest(path, len(digest), bar) != digest]
    if missing or differ:
        problems = ([f"{p.relative_to(directory)} differs" for p in differ]
                    + [f"{p.relative_to(directory)} is missing" for p in missing])
        raise CheckpointError(f"{directory}: {', '.join(problems)} (against {source}); "
                              f"download {'it' if len(problems) == 1 else 'them'} again")
    return len(present), total, source


def _digest(path: Path, length: int, bar: tqdm | None = None) -> str:
    """The file's MD5 (32 hex digits), git blob SHA-1 (40: the hash of a header and the bytes) or SHA-256 (64)."""
    digest = {32: lambda: hashlib.md5(usedforsecurity=False), 40: hashlib.sha1, 64: hashlib.sha256}[length]()
    if length == 40:
        digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()
