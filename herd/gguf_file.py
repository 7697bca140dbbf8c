"""A fast GGUF reader with the shape of gguf-py's GGUFReader (`fields`, `tensors`, `data`).

gguf-py builds a numpy view for every element of every metadata array, which takes seconds for a 49k-token
vocabulary and its merges; here the header is walked once with `struct` and the tensors are views of the mapped file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_LENGTH = struct.Struct("<Q")  # a string's byte count
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


@dataclass
class Field:
    name: str
    types: list[GGUFValueType]
    value: object

    def contents(self):
        return self.value


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # GGML's order: the row length first
    data_offset: int
    n_bytes: int
    data: np.ndarray  # plain types as their dtype; block types as bytes [..., bytes per row]


class GGUFFile:
    def __init__(self, path: str | Path):
        self.data = np.memmap(path, mode="c")  # copy-on-write: tensors handed out are writable, the file is not
        self._buffer = self.data._mmap
        self._pos = 0
        if self._read(4) != _MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string()
            kind = GGUFValueType(self._unpack("<I"))
            if kind == GGUFValueType.ARRAY:
                element = GGUFValueType(self._unpack("<I"))
                self.fields[key] = Field(key, [kind, element], self._array(element, self._unpack("<Q")))
            else:
                self.fields[key] = Field(key, [kind], self._value(kind))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, dims, GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")))
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]

    def _tensor(self, name, dims, kind, offset) -> Tensor:
        block, size = GGML_QUANT_SIZES[kind]
        count = int(np.prod(dims))
        n_bytes = count // block * size
        if offset + n_bytes > len(self.data):
            raise ValueError(f"tensor {name} runs past the end of the file")
        raw = self.data[offset : offset + n_bytes]
        if kind in _PLAIN:
            data = raw.view(_PLAIN[kind]).reshape(dims[::-1])
        else:
            data = raw.reshape(*dims[:0:-1], dims[0] // block * size)
        return Tensor(name, kind, np.array(dims), offset, n_bytes, data)

    def _read(self, n: int) -> bytes:
        if self._pos + n > len(self._buffer):
            raise ValueError("the header runs past the end of the file")
        out = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return out

    def _unpack(self, fmt: str):
        (value,) = struct.unpack(fmt, self._read(struct.calcsize(fmt)))
        return value

    def _string(self) -> str:
        return self._read(self._unpack("<Q")).decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row: a vocabulary's hundred thousand, in one tight loop (a quarter of load time
        went to reading them one call at a time)."""
        buffer, pos, end, length = self._buffer, self._pos, len(self._buffer), _LENGTH.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError("the header runs past the end of the file")
            (n,) = length(buffer, pos)
            pos += 8
            if pos + n > end:
                raise ValueError("the header runs past the end of the file")
            out.append(buffer[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _value(self, kind: GGUFValueType):
        return self._string() if kind == GGUFValueType.STRING else self._unpack(_SCALARS[kind])

    def _array(self, element: GGUFValueType, count: int) -> list:
        if element == GGUFValueType.STRING:
            return self._strings(count)
        if element == GGUFValueType.ARRAY:
            raise ValueError("nested GGUF arrays are not supported")
        fmt = _SCALARS[element]
        size = struct.calcsize(fmt)
        return np.frombuffer(self._read(size * count), dtype=np.dtype(fmt)).tolist()
