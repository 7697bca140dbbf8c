"""Token shards: what the pipeline hands the trainer.

A shard is `shard-NNNNN.bin` (the documents' tokens, little-endian uint32, back to back) and
`shard-NNNNN.idx` (little-endian uint64 offsets, one more than there are documents, so document i is
tokens[idx[i]:idx[i+1]]), plus `shard-NNNNN.ids` (the document ids, one a line, a backslash written `\\\\` and a
newline `\\n`, so that any id fits on its line; format /1, still read, wrote them unescaped). `manifest.json` lists
them with sha256 checksums and the tokenizer they were made with. Each document carries its own BOS/EOS,
so its boundaries survive any concatenation a reader does.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from herd.data.config import ConfigError, ShardConfig, file_sha256, import_object
from herd.atomic import atomic_output

MANIFEST = "manifest.json"
FORMAT = "herd-token-shards/2"
# /1 wrote ids unescaped, which an id holding a newline broke; its shards are read as they were written
FORMATS = ("herd-token-shards/1", FORMAT)
TOKEN_DTYPE = np.dtype("<u4")
INDEX_DTYPE = np.dtype("<u8")


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (256 = BOS, 257 = EOS): exact, dependency-free, and instant to load."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8")


_tokenizers: dict[str, Tokenizer] = {}


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a "module:callable" spec builds, once per process (loading a BPE takes a while)."""
    if spec not in _tokenizers:
        tokenizer = import_object(spec)()
        missing = [name for name in ("encode", "vocab_size", "bos_id", "eos_id") if not hasattr(tokenizer, name)]
        if missing:
            raise ConfigError(f"shards.tokenizer {spec!r} gives a {type(tokenizer).__name__}, not a tokenizer (it has "
                              f"no {', '.join(missing)}); name a callable that returns one")
        _tokenizers[spec] = tokenizer
    return _tokenizers[spec]


def encode_document(tokenizer: Tokenizer, text: str, config: ShardConfig) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, bos=config.bos, eos=config.eos), dtype=TOKEN_DTYPE)


def _token_id(token: int | None) -> int | None:
    return None if token is None else int(token)


def _encoded(tokenizer: Tokenizer, bos: bool, eos: bool) -> list[int]:
    """The tokens `tokenizer` gives an empty text: only the BOS and EOS it really adds."""
    return [int(t) for t in tokenizer.encode("", bos=bos, eos=eos)]


class ShardWriter:
    """Appends whole documents and starts a new shard when the next one would not fit."""

    def __init__(self, out: Path, config: ShardConfig, tokenizer: Tokenizer):
        self.out, self.config = Path(out), config
        bos_id, eos_id = _token_id(tokenizer.bos_id), _token_id(tokenizer.eos_id)
        # what the documents really hold, not what was asked: SmolLM2's tokenizer adds no BOS, whatever `bos` says
        bos = config.bos and bos_id is not None and _encoded(tokenizer, bos=True, eos=False)[:1] == [bos_id]
        eos = config.eos and eos_id is not None and _encoded(tokenizer, bos=False, eos=True)[-1:] == [eos_id]
        self.tokenizer_info = {"spec": config.tokenizer, "class": type(tokenizer).__name__,
                               "vocab_size": int(tokenizer.vocab_size), "bos_id": bos_id, "eos_id": eos_id,
                               "bos": bos, "eos": eos}
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._ids: list[str] = []
        self._size = 0

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        if self._pending and self._size + len(tokens) > self.config.max_tokens_per_shard:
            self._flush()
        self._pending.append(tokens)
        self._ids.append(doc_id)
        self._size += len(tokens)

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        lengths = np.fromiter((len(t) for t in self._pending), dtype=INDEX_DTYPE, count=len(self._pending))
        index = np.zeros(len(lengths) + 1, dtype=INDEX_DTYPE)
        np.cumsum(lengths, out=index[1:])
        entry = {"name": name, "documents": len(self._ids), "tokens": int(index[-1])}
        payloads = {
            "bin": (t.astype(TOKEN_DTYPE, copy=False).tobytes() for t in self._pending),
            "idx": [index.tobytes()],
            "ids": ["".join(f"{_escape_id(i)}\n" for i in self._ids).encode()],
        }
        for ext, chunks in payloads.items():
            path = self.out / f"{name}.{ext}"
            with atomic_output(path) as tmp, open(tmp, "wb") as fh:
                fh.writelines(chunks)
            entry[f"sha256_{ext}"] = file_sha256(path)
        self.shards.append(entry)
        self._pending, self._ids, self._size = [], [], 0

    def close(self) -> dict:
        if self._pending:
            self._flush()
        manifest = {"format": FORMAT, "dtype": "uint32", "tokenizer": self.tokenizer_info,
                    "documents": sum(s["documents"] for s in self.shards),
                    "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}
        with atomic_output(self.out / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest


class ChecksumError(ValueError):
    pass


REWRITE = "run the `herd data run` that wrote the shards again to rewrite them"


def _is_manifest(manifest: dict) -> bool:
    """Whether `manifest` holds all that reading the shards takes."""
    entries = manifest.get("shards")
    if not (isinstance(manifest.get("tokenizer"), dict) and _is_count(manifest.get("tokens"))
            and isinstance(entries, list)):
        return False
    return all(isinstance(e, dict) and isinstance(e.get("name"), str) and _is_count(e.get("documents"))
               and _is_count(e.get("tokens")) for e in entries)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _require_size(path: Path, size: int) -> None:
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; {REWRITE}") from None
    if found != size:
        raise ValueError(f"{path} holds {found:,} bytes where the manifest makes {size:,} (truncated or damaged); "
                         f"{REWRITE}")


def _escape_id(doc_id: str) -> str:
    return doc_id.replace("\\", "\\\\").replace("\n", "\\n")


_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def _unescape_id(line: str) -> str:
    return _ESCAPED.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), line)


def _read_ids(path: Path, documents: int, escaped: bool) -> list[str]:
    """A shard's document ids, one a line (split at newlines alone: an id may hold any other line separator), unescaped
    where the format escaped them."""
    try:
        ids = path.read_bytes().decode("utf-8").split("\n")[:-1]
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; {REWRITE}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); {REWRITE}") from None
    if len(ids) != documents:
        raise ValueError(f"{path} holds {len(ids)} document ids for the manifest's {documents}; {REWRITE}")
    return [_unescape_id(i) for i in ids] if escaped else ids


@dataclass(frozen=True)
class _Shard:
    tokens: np.ndarray  # memory-mapped
    index: np.ndarray
    ids: list[str]


class TokenShards:
    """The trainer's view of a shard directory: documents in order, random access, checksum verification."""

    def __init__(self, directory: str | Path, verify: bool = False):
        self.dir = Path(directory)
        self.manifest = self._read_manifest()
        if verify:
            self.verify()
        self._shards = [self._open(entry) for entry in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [len(s.ids) for s in self._shards])

    def _read_manifest(self) -> dict:
        path = self.dir / MANIFEST
        try:
            manifest = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"no {MANIFEST} in {self.dir}: not a token shard directory") from None
        except ValueError as e:  # not JSON, or not UTF-8
            raise ValueError(f"{path}: not JSON ({e}); {REWRITE}") from None
        if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise ValueError(f"{self.dir}: unsupported shard format {found!r}")
        if manifest.get("dtype", "uint32") != "uint32":  # the only one written; another would be misread
            raise ValueError(f"{path}: tokens stored as {manifest['dtype']!r}, where herd's shards hold uint32; "
                             f"{REWRITE}")
        if not _is_manifest(manifest):
            raise ValueError(f"{path}: not a complete manifest (the tokenizer, and each shard's name, documents and "
                             f"tokens); {REWRITE}")
        return manifest

    def _open(self, entry: dict) -> _Shard:
        """A shard's files, checked against the manifest as far as their sizes and offsets go: a truncated file is
        named here, where reading it had raised an IndexError or found no tokens."""
        tokens, index, ids = (self.dir / f"{entry['name']}.{ext}" for ext in ("bin", "idx", "ids"))
        _require_size(tokens, entry["tokens"] * TOKEN_DTYPE.itemsize)
        _require_size(index, (entry["documents"] + 1) * INDEX_DTYPE.itemsize)
        offsets = np.fromfile(index, dtype=INDEX_DTYPE)
        if offsets[0] != 0 or offsets[-1] != entry["tokens"] or (offsets[1:] < offsets[:-1]).any():
            raise ValueError(f"{index}: its offsets do not run from 0 up to the shard's {entry['tokens']} tokens; "
                             f"{REWRITE}")
        doc_ids = _read_ids(ids, entry["documents"], escaped=self.manifest["format"] != FORMATS[0])
        data = np.memmap(tokens, dtype=TOKEN_DTYPE, mode="r") if entry["tokens"] else np.zeros(0, TOKEN_DTYPE)
        return _Shard(data, offsets, doc_ids)

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard, j = self._locate(i)
        return np.asarray(shard.tokens[shard.index[j]:shard.index[j + 1]])

    def doc_id(self, i: int) -> str:
        shard, j = self._locate(i)
        return shard.ids[j]

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shards[s], i - int(self._starts[s])

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard in self._shards:
            for j in range(len(shard.ids)):
                yield np.asarray(shard.tokens[shard.index[j]:shard.index[j + 1]])

    def verify(self) -> None:
        """Raise ChecksumError naming the first file whose bytes differ from the manifest."""
        for entry in self.manifest["shards"]:
            for ext in ("bin", "idx", "ids"):
                path = self.dir / f"{entry['name']}.{ext}"
                if not path.exists() or file_sha256(path) != entry[f"sha256_{ext}"]:
                    raise ChecksumError(f"{path}: checksum mismatch or missing")
