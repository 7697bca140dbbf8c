"""herd's compiled CPU kernel for block-quantized matmuls (csrc/blockmm.cpp), built once per machine and cached.

A plain shared library called through ctypes (no torch headers: it compiles in seconds). `scripts/setup.sh`
builds it (`python -m herd.quant.kernel`), and so does the first use if it is missing. Where it cannot be built
(no compiler, not an x86 CPU with AVX2) `ops()` is None and the schemes compute the same arithmetic in PyTorch: each
layer's outputs agree to rounding (~3e-5), which a whole model's int8 activations carry on to logits ~1% apart.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from herd.cache import cache_dirs, cached, writable_cache_dir

SOURCE = Path(__file__).parent / "csrc" / "blockmm.cpp"
E4M3_ACTIVATIONS = -1  # herd_matmul_rows' levels for FP8 weights (Acts::E4M3)


def _flags() -> list[str]:
    """For this CPU, or for the CPU class HERD_KERNEL_MARCH names (`haswell`: AVX2 without VNNI, the brief's
    machines), to measure or test that build on a newer CPU."""
    march = os.environ.get("HERD_KERNEL_MARCH", "native")
    return ["-O3", f"-march={march}", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= set(_cpu_flags().split())


def library_name() -> str:
    """One file per source, compiler flags and CPU, so a stale build is never picked up."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(_flags()), _cpu_flags()]).encode()).hexdigest()[:16]
    return f"blockmm-{key}.so"


def library_path() -> Path:
    """The library in herd's cache, or where a build would put it (see herd.cache)."""
    return cached("kernels", library_name()) or writable_cache_dir("kernels") / library_name()


def build() -> Path:
    path = writable_cache_dir("kernels") / library_name()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    print("herd: building the quantized-matmul kernel for this CPU (about a minute, once)", file=sys.stderr, flush=True)
    try:
        done = subprocess.run([compiler, *_flags(), str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{Path(compiler).name} failed: {_compiler_error(done.stderr)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed build's partial output, one file per process otherwise
    return path


def _compiler_error(stderr: str) -> str:
    """The compiler's own reason (a missing omp.h, an -march it does not know), not its closing "compilation
    terminated"."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line), lines[-1] if lines else "no message")


@dataclass
class Panels:
    """A weight [N, K] as the kernel's integer matmuls read it (herd_pack's panels: see csrc/blockmm.cpp): an
    integer layer keeps only these once it has run."""

    data: torch.Tensor  # uint8
    shape: tuple[int, int]
    bits: int
    group: int
    has_mins: bool

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The codes, scales and mins (or None) that were packed, exactly."""
        return ops().unpack(self)

    def dequantize_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` [n] of the weight as float32 [n, K]."""
        return ops().dequantize_rows(self, index)


def pointers(w) -> tuple:
    """codes, scales, mins and panels of w (a BlockWeight or Panels) for the C calls, null where it has none."""
    if isinstance(w, Panels):
        return None, None, None, w.data.data_ptr()
    return w.codes.data_ptr(), w.scales.data_ptr(), w.mins.data_ptr() if w.mins is not None else None, None


class QWeight(ctypes.Structure):
    """One quantized linear layer as the fused block reads it (the C struct of the same name)."""

    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("packed", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("group", ctypes.c_int64), ("integer", ctypes.c_int64), ("fp8", ctypes.c_int64)]


class Sequences(ctypes.Structure):
    """The sequences of an engine step and where their keys lie (the C struct of the same name); `arrays` keeps
    the int64 arrays it points into alive."""

    _fields_ = [("count", ctypes.c_int64), ("tokens", ctypes.c_void_p), ("cached", ctypes.c_void_p),
                ("slot_offset", ctypes.c_void_p), ("slots", ctypes.c_void_p)]

    @classmethod
    def of(cls, parts: list[tuple[list[int], int, int]], key_slots: list) -> Sequences:
        """parts: (blocks, tokens cached, tokens in this step) of each sequence, in the step's order; key_slots:
        each one's cache slot per position (StepAttention.key_slots: int arrays)."""
        lengths = np.fromiter((len(slots) for slots in key_slots), dtype=np.int64, count=len(key_slots))
        arrays = [np.array([n for _, _, n in parts], dtype=np.int64),
                  np.array([c for _, c, _ in parts], dtype=np.int64),
                  np.cumsum(lengths) - lengths, np.concatenate(key_slots).astype(np.int64, copy=False)]
        out = cls(len(parts), *(a.ctypes.data for a in arrays))
        out.arrays = arrays
        return out


class _Kernel:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.herd_dequantize.argtypes = [p, p, p, p, i64, i64, i64, i64, p, i32]
        lib.herd_unpack.argtypes = [p, i64, i64, i64, i64, p, p, p, i32]
        lib.herd_dequantize_packed_rows.argtypes = [p, p, i64, i64, i64, i64, p]
        lib.herd_matmul_rows.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i32, p, i32]
        lib.herd_packed_bytes.argtypes = [i64, i64, i64, i64, i32, i32]
        lib.herd_packed_bytes.restype = i64
        lib.herd_pack.argtypes = [p, p, p, i64, i64, i64, i64, i32, p, i32]
        lib.herd_has_vnni.restype = i32
        lib.herd_decode_blocks.argtypes = [p, i64, i64, i64, p, p, f32, p, p, p, p, i32, i64, p, i64, i64, i64, i32, i32]
        lib.herd_attention.argtypes = [p, i64, p, p, p, i32, i64, i64, i64, i64, p, i32]
        lib.herd_fp8_dequantize.argtypes = [p, p, i64, i64, p, i32]
        lib.herd_use_amx.argtypes = [i32]
        lib.herd_use_amx.restype = i32
        self._lib = lib
        self.vnni = bool(lib.herd_has_vnni())  # prompts take two int8 levels only where bytes multiply fast
        self.amx = self.use_amx(True)

    def use_amx(self, on: bool) -> bool:
        """Integer matmuls of several tokens on the CPU's tile unit (AMX), where it has one and Linux grants it, or
        not (the same numbers either way: to compare or measure); whether they now are."""
        return bool(self._lib.herd_use_amx(int(on)))

    def dequantize(self, w) -> torch.Tensor:
        """w (a BlockWeight, or its Panels) as float32 [N, K]."""
        n, k = w.shape
        out = torch.empty(n, k)
        self._lib.herd_dequantize(*pointers(w), n, k, w.bits, w.group, out.data_ptr(), _threads())
        return out

    def pack(self, w) -> Panels:
        """The BlockWeight w repacked into the panels that the kernel's integer matmuls read (see csrc/blockmm.cpp).
        Scales and mins that are all float16 values (GGUF's own) are kept in two bytes."""
        (n, k), mins = w.shape, w.mins
        half = int(all(torch.equal(t.half().float(), t) for t in (w.scales, mins) if t is not None))
        out = torch.empty(self._lib.herd_packed_bytes(n, k, w.bits, w.group, int(mins is not None), half),
                          dtype=torch.uint8)
        self._lib.herd_pack(w.codes.data_ptr(), w.scales.data_ptr(), mins.data_ptr() if mins is not None else None,
                            n, k, w.bits, w.group, half, out.data_ptr(), _threads())
        return Panels(out, (n, k), w.bits, w.group, mins is not None)

    def unpack(self, p: Panels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The codes, scales and mins (or None) that `pack` took, exactly."""
        (n, k), groups = p.shape, p.shape[1] // p.group
        codes = torch.empty(n, k // 2 if p.bits == 4 else k, dtype=torch.uint8 if p.bits == 4 else torch.int8)
        scales = torch.empty(n, groups)
        mins = torch.empty(n, groups) if p.has_mins else None
        self._lib.herd_unpack(p.data.data_ptr(), n, k, p.bits, p.group, codes.data_ptr(), scales.data_ptr(),
                              mins.data_ptr() if mins is not None else None, _threads())
        return codes, scales, mins

    def dequantize_rows(self, p: Panels, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` [n] of the packed weight as float32 [n, K]."""
        index = index.to(torch.int64).contiguous()
        out = torch.empty(len(index), p.shape[1])
        self._lib.herd_dequantize_packed_rows(p.data.data_ptr(), index.data_ptr(), len(index), p.shape[1], p.bits,
                                              p.group, out.data_ptr())
        return out

    def matmul_rows(self, x, w, levels: int) -> torch.Tensor:
        """x [M, K] @ w.T, w a BlockWeight (packed panel by panel as it goes) or its Panels. levels: 0 float
        activations, 1 int8 activation blocks, 2 two levels of them (see csrc/blockmm.cpp)."""
        x = x.contiguous()
        (m, k), n = x.shape, w.shape[0]
        out = torch.empty(m, n)
        self._lib.herd_matmul_rows(x.data_ptr(), *pointers(w), m, n, k, w.bits, w.group, levels, out.data_ptr(),
                                   _threads())
        return out

    def fp8_matmul(self, x, codes, scales) -> torch.Tensor:
        """x [M, K] @ W.T for an FP8 layer, W [N, K] e4m3 codes with a scale per row [N]: each token's activations
        rounded to e4m3 with a scale of their own, as fp8.to_fp8 does; K a multiple of 16 (herd_matmul_rows with
        levels E4M3_ACTIVATIONS)."""
        x = x.contiguous()
        (m, k), n = x.shape, codes.shape[0]
        out = torch.empty(m, n)
        self._lib.herd_matmul_rows(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), None, None, m, n, k, 8, k,
                                   E4M3_ACTIVATIONS, out.data_ptr(), _threads())
        return out

    def fp8_dequantize(self, codes, scales=None) -> torch.Tensor:
        """e4m3 codes [N, K] (K a multiple of 16) as float32, exactly, times scales [N] where given."""
        n, k = codes.shape
        out = torch.empty(n, k)
        self._lib.herd_fp8_dequantize(codes.data_ptr(), scales.data_ptr() if scales is not None else None, n, k,
                                      out.data_ptr(), _threads())
        return out

    def attention(self, q, seqs: Sequences, k_cache, v_cache) -> torch.Tensor:
        """Each of a step's tokens (q [T, heads, head_dim], contiguous) attending over its own sequence's keys and
        values up to itself, already in the cache ([kv_heads, slots, head_dim], float32 or float16): see
        herd_attention."""
        kv_heads, slots, head_dim = k_cache.shape
        out = torch.empty_like(q)
        self._lib.herd_attention(q.data_ptr(), q.shape[0], ctypes.addressof(seqs), k_cache.data_ptr(),
                                 v_cache.data_ptr(), int(k_cache.dtype == torch.float16), slots, q.shape[1],
                                 kv_heads, head_dim, out.data_ptr(), _threads())
        return out

    def decode_blocks(self, x, first: int, count: int, attn_norms: ctypes.Array, ffn_norms: ctypes.Array, eps: float,
                      weights: ctypes.Array, cos_sin, k_caches: ctypes.Array, v_caches: ctypes.Array, seqs: Sequences,
                      heads: int, head_dim: int, prompt: bool = False) -> None:
        """Transformer blocks first..first + count - 1 for x [T, dim] (updated in place): see herd_decode_blocks in
        csrc/blockmm.cpp. The arrays hold every block's part, indexed from block 0: attn_norms, ffn_norms and
        k_caches, v_caches (float32 or float16, [kv_heads, slots, head_dim]) their tensors' `addresses`, weights
        the QWeights wq, wk, wv, wo, w1, w2, w3 of each block in turn. prompt: x holds prompt tokens (two int8
        levels), else generated ones."""
        def at(array: ctypes.Array, per_block: int = 1) -> int:
            return ctypes.addressof(array) + first * per_block * ctypes.sizeof(array._type_)

        keys = k_caches.tensors[first]
        kv_heads, slots, _ = keys.shape
        self._lib.herd_decode_blocks(x.data_ptr(), x.shape[0], x.shape[1], count, at(attn_norms), at(ffn_norms), eps,
                                     at(weights, 7), cos_sin.data_ptr(), at(k_caches), at(v_caches),
                                     int(keys.dtype == torch.float16), slots, ctypes.addressof(seqs), heads, kv_heads,
                                     head_dim, int(prompt), _threads())


def addresses(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    """The tensors' data pointers as a C array (null for None), which keeps the tensors alive as `.tensors`: built
    once and kept, where a step would otherwise spend ~100 us on them."""
    array = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() if t is not None else None for t in tensors))
    array.tensors = list(tensors)
    return array


class _Threads:
    """How many threads a kernel call runs on: PyTorch's setting, except in a child forked after this process's
    OpenMP threads had started. GNU OpenMP cannot start them again there: the child's first parallel region waits
    forever on threads that were not copied (a `multiprocessing` pool forked from a process that had generated), so
    such a child computes on its own thread."""

    started = False  # this process has run a parallel region
    inherited = False  # forked from a process that had

    def __call__(self) -> int:
        if self.inherited:
            return 1
        threads = torch.get_num_threads()
        self.started = self.started or threads > 1
        return threads

    def forked(self) -> None:
        self.inherited = self.inherited or self.started


_threads = _Threads()
os.register_at_fork(after_in_child=_threads.forked)


@functools.cache
def ops() -> _Kernel | None:
    """The compiled kernel, or None where it cannot run (HERD_KERNEL=0 turns it off)."""
    if os.environ.get("HERD_KERNEL", "1") == "0" or not _supported():
        return None
    try:
        name = library_name()  # the source and the CPU's flags hashed once, not once a directory
        for path in (directory / name for directory in cache_dirs("kernels")):
            if path.exists():
                try:
                    return _Kernel(path)
                except OSError:  # a damaged file in the cache: built again, or every process would go without
                    with contextlib.suppress(OSError):  # a read-only cache's stays, passed over
                        path.unlink()
        return _Kernel(build())
    except (OSError, RuntimeError) as error:
        print(f"herd: the quantized-matmul kernel could not be built or loaded ({error}); using the PyTorch path",
              file=sys.stderr)
        return None


if __name__ == "__main__":
    # scripts/setup.sh runs this: a machine that cannot build the kernel still installs, and computes in PyTorch.
    print("herd kernel: " + (str(library_path()) if ops() else "not built; the PyTorch path is used" if _supported()
                             else "this CPU lacks AVX2/FMA/F16C; the PyTorch path is used"), file=sys.stderr)
