"""llama.cpp's GGUF: one file of metadata and (possibly quantized) tensors, read through the `gguf` package.

llama.cpp's converter stores q/k rows in Meta's interleaved rotary order already, so no permutation is needed here.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from herd.checkpoint.base import Checkpoint, LazyStateDict, LazyTensor, check_shapes, expected_shapes
from herd.checkpoint.errors import CheckpointError
from herd.gguf_file import GGUFFile
from herd.model.config import ModelConfig, RopeScaling

ARCH = "llama"
_ROPE_FREQS = "rope_freqs.weight"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_META_BLOCK_NAMES = {v: k for k, v in _BLOCK_NAMES.items()}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}
_META_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
# Types read without gguf.quants (plain floats); everything gguf.quants can dequantize is read too.
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.F64: torch.float64}


def meta_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return name  # left as is, so the shape check reports it as unexpected


def gguf_name(name: str) -> str:
    if name in _META_TOP_NAMES:
        return _META_TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{_META_BLOCK_NAMES[rest]}"


def readable(qtype: Q) -> bool:
    return qtype in _PLAIN or qtype in quants._type_traits


# ---------------------------------------------------------------- loading


def open_reader(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except PermissionError as e:  # the file may be whole: "download it again" had been the wrong way out
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}): give this user read access to it") from None
    except Exception as e:  # the reader raises ValueError, IndexError… for any malformed or short file
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "it is truncated or damaged, download it again"
        ) from None


def field(reader: GGUFFile, key: str, default=None):
    found = reader.fields.get(key)
    return found.contents() if found is not None else default


def load_gguf(path: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    reader = open_reader(path)
    arch = field(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: architecture is {arch!r}, not 'llama'; only Llama models load")
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if not readable(t.tensor_type):
            raise CheckpointError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}, which cannot be dequantized here; "
                "convert it with llama.cpp's llama-quantize to Q8_0/Q4_K or F16"
            )
    config = _config(reader, tensors, path)
    entries = {
        meta_name(t.name): LazyTensor(tuple(int(d) for d in reversed(t.shape.tolist())),
                                      _reader(t, getattr(reader.data, "_mmap", None)), dtype, _stored_dtype(t))
        for t in reader.tensors
        if t.name != _ROPE_FREQS
    }
    state = LazyStateDict(entries)
    check_shapes(config, state, str(path), "the GGUF's llama.* metadata")
    from herd.checkpoint.vocab import gguf_tokenizer

    tokenizer, note = gguf_tokenizer(reader)
    tensor_types = {meta_name(t.name): t.tensor_type.name for t in reader.tensors if t.name != _ROPE_FREQS}
    meta = {
        "name": field(reader, "general.name"),
        "file_type": _file_type_name(field(reader, "general.file_type")),
        "tensor_types": tensor_types,
        # Weights stored in a block format (Q8_0, Q4_K, ...) rather than as floats: herd.load keeps them int8.
        "quantized": any(kind not in ("F32", "F16", "BF16") for kind in tensor_types.values()),
    }
    if note:
        meta["tokenizer_note"] = note
    blocks = {meta_name(t.name): (t.tensor_type.name, t.data) for t in reader.tensors
              if t.name != _ROPE_FREQS and t.tensor_type not in _PLAIN and t.tensor_type != Q.BF16}
    return Checkpoint(config, state, "gguf", tokenizer, path, meta, blocks)


def _file_type_name(value) -> str | None:
    try:
        return gguf.LlamaFileType(value).name if value is not None else None
    except ValueError:
        return str(value)


def _config(reader, tensors, path: Path) -> ModelConfig:
    def get(key, default=None):
        value = field(reader, f"{ARCH}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: metadata key {ARCH}.{key} is missing; the GGUF is incomplete")
        return value

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    scaling_type = field(reader, f"{ARCH}.rope.scaling.type", "none")
    factor = field(reader, f"{ARCH}.rope.scaling.factor", field(reader, f"{ARCH}.rope.scale_linear", 1.0))
    if scaling_type is None or (scaling_type == "none" and factor not in (None, 0.0, 1.0)):
        # llama.cpp reads a factor without a type (older long-context files: rope.scale_linear) as linear scaling;
        # taken as none, positions had been computed unscaled without a word.
        scaling_type = "linear"
    if scaling_type != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling_type!r} is not supported; only Llama 3.1's is")
    vocab = field(reader, f"{ARCH}.vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []))
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])
    try:
        config = ModelConfig(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            ffn_hidden_dim=int(get("feed_forward_length")),
            norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(get("rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 8192)),
            tie_embeddings="output.weight" not in tensors,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the llama.* metadata is inconsistent ({e})") from None
    rope_dims = field(reader, f"{ARCH}.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise CheckpointError(f"{path}: rope.dimension_count {rope_dims} is not the head size {config.head_dim}; unsupported")
    if _ROPE_FREQS in tensors:
        original = int(field(reader, f"{ARCH}.rope.scaling.original_context_length", RopeScaling().original_max_position))
        divisors = quants.dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type).reshape(-1)
        config = config.replace(rope_scaling=_scaling_from_divisors(divisors, config, original, path))
    return config


def _f32(value) -> float:
    """A float32 from the file as the shortest decimal that is that float32: 1e-5, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def rope_divisors(config: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs.weight: what each rotary frequency is divided by under Llama 3.1's scaling."""
    s = config.rope_scaling
    d = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = 1 / ((1 - smooth) / s.factor + smooth)
    low, high = s.original_max_position / s.low_freq_factor, s.original_max_position / s.high_freq_factor
    return np.where(wavelen < high, 1.0, np.where(wavelen > low, s.factor, ramp)).astype(np.float32)


def _scaling_from_divisors(divisors: np.ndarray, config: ModelConfig, original: int, path: Path) -> RopeScaling | None:
    """The RopeScaling that explains rope_freqs.weight, checked against every divisor (llama.cpp stores only the
    divisors, and its converter not even the original context)."""
    if np.all(divisors == 1.0):
        return None
    if divisors.shape == (config.head_dim // 2,):
        for guess in _scalings(divisors.astype(np.float64), config, original):
            if np.allclose(rope_divisors(config.replace(rope_scaling=guess)), divisors, rtol=1e-5):
                return guess
    raise CheckpointError(f"{path}: tensor {_ROPE_FREQS} is no Llama 3.1 rope scaling of a {config.head_dim}-"
                          f"dimensional head (original context {original}); this rope variant is unsupported")


def _scalings(divisors: np.ndarray, config: ModelConfig, original: int) -> Iterator[RopeScaling]:
    """Scalings that may have made `divisors`, most likely first.

    On the ramp a divisor d is 1 / ((1 - s) / factor + s) with s = original / (wavelength * (high - low)) -
    low / (high - low): linear in 1 / wavelength, so two points on the ramp give both bounds for the original
    context given (Llama 3.1's 1 and 4 otherwise). The factor is the largest divisor where a wavelength passes the
    ramp; else (heads of few dimensions, a low rope_theta) it is solved from that divisor with Llama 3.1's bounds.
    """
    wavelen = 2 * math.pi * config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    i = int(np.argmax(divisors))
    largest, bounds = float(divisors[i]), RopeScaling()
    smooth = (original / wavelen[i] - bounds.low_freq_factor) / (bounds.high_freq_factor - bounds.low_freq_factor)
    factor = largest if smooth <= 0 or 1 / largest <= smooth else (1 - smooth) / (1 / largest - smooth)
    with contextlib.suppress(ValueError):  # a divisor or an original context no scaling has
        yield RopeScaling(factor=_f32(factor), original_max_position=original)
    on_ramp = (divisors > 1 + 1e-6) & (divisors < largest * (1 - 1e-6))
    smooth = (1 / divisors[on_ramp] - 1 / largest) / (1 - 1 / largest)
    with contextlib.suppress(ValueError, np.linalg.LinAlgError):
        if on_ramp.sum() >= 2:
            slope, intercept = np.polyfit(1 / wavelen[on_ramp], smooth, 1)
            low = -intercept * original / slope
            yield RopeScaling(largest, _round(low), _round(low + original / slope), original)
        elif on_ramp.sum() == 1:  # Llama 3.1's bounds, the original context as the one point puts it
            yield RopeScaling(largest, original_max_position=round(wavelen[on_ramp][0] * (3 * smooth[0] + 1)))
        else:  # any original context that puts each wavelength on its side of the ramp
            short, long = wavelen[divisors == 1.0], wavelen[divisors >= largest * (1 - 1e-6)]
            if len(short) and len(long):
                yield RopeScaling(largest, original_max_position=round(math.sqrt(4 * short.max() * long.min())))


def _round(value: float) -> float:
    """A fitted bound as it was most likely written (2.0, not 1.9999996)."""
    return float(f"{value:.5g}")


def _stored_dtype(t) -> torch.dtype:
    """What _reader returns for tensor t: plain types as stored, quantized ones expanded to float32."""
    return torch.bfloat16 if t.tensor_type == Q.BF16 else _PLAIN.get(t.tensor_type, torch.float32)


def _reader(t, mapping):
    def read() -> torch.Tensor:
        if t.tensor_type in _PLAIN:
            tensor = torch.from_numpy(t.data)  # a view of the mapped file, no copy
        elif t.tensor_type == Q.BF16:
            # BF16 rows come as bytes; reinterpreting them keeps the mapping and is exact.
            tensor = torch.from_numpy(t.data.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(_dequantize(t.data, t.tensor_type))
            _release(mapping, t.data_offset, t.n_bytes)
        return tensor

    return read


def _release(mapping, offset: int, nbytes: int) -> None:
    """Let the kernel drop the file pages of a tensor already dequantized, so they stop counting as our memory.

    Only pages wholly inside the tensor go: a neighbouring plain tensor may be in use (and written) as a view.
    """
    if mapping is None:
        return
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


_CHUNK_BYTES = 8 << 20


def _dequantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    """gguf.quants.dequantize, a few rows at a time: its float32 temporaries stay small even for the embedding."""
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty(quants.quant_shape_from_byte_shape(rows.shape, qtype), dtype=np.float32)
    step = max(1, _CHUNK_BYTES // max(1, out.shape[1] * 4))
    for i in range(0, len(rows), step):
        out[i : i + step] = quants.dequantize(rows[i : i + step], qtype)
    return out.reshape(quants.quant_shape_from_byte_shape(data.shape, qtype))


# ---------------------------------------------------------------- saving


def save_gguf(ckpt: Checkpoint, path: Path, gguf_type: str = "F16") -> None:
    config, state = ckpt.config, ckpt.state_dict
    qtype = _writable_type(gguf_type)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(str(ckpt.meta.get("name") or (ckpt.source.stem if ckpt.source else "llama")))
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling is not None:  # llama.cpp reads it for YaRN only; the divisors need it to be explained
        writer.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    from herd.checkpoint.vocab import gguf_tokenizer_fields

    for key, value, vtype, sub in gguf_tokenizer_fields(ckpt):
        writer.add_key_value(key, value, vtype, sub)

    plan: list[tuple[str, Q]] = []
    output = "tok_embeddings.weight" if config.tie_embeddings else "output.weight"
    for name, shape in expected_shapes(config).items():
        # 1-D tensors (norms) stay F32 as llama.cpp keeps them; rows a block size does not divide fall back to F16.
        kind = qtype if len(shape) == 2 else Q.F32
        if name == output and kind in _FOUR_AND_FIVE_BITS:
            # The logits sampling sees: llama-quantize keeps this layer at 6-8 bits (KL from the float model, the
            # default model under Q4_0 on 512 tokens of the GPL: 0.45 with it at 4 bits, 0.37 at 8).
            kind = Q.Q8_0
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if shape[-1] % block:
            kind = Q.F16
        plan.append((name, kind))
        writer.add_tensor_info(gguf_name(name), _byte_shape(shape, kind), np.dtype(np.uint8) if kind not in _PLAIN else _np(kind),
                               _nbytes(shape, kind), raw_dtype=kind)
    if config.rope_scaling is not None:
        writer.add_tensor_info(_ROPE_FREQS, (config.head_dim // 2,), np.dtype(np.float32), 4 * (config.head_dim // 2), Q.F32)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Streamed: one tensor is read, quantized and written at a time.
    for name, kind in plan:
        writer.write_tensor_data(encode(state[name], kind))
    if config.rope_scaling is not None:
        writer.write_tensor_data(rope_divisors(config))
    writer.close()


def encode(tensor: torch.Tensor, kind: Q) -> np.ndarray:
    """The bytes (or plain floats) a GGUF stores for `tensor` as `kind`."""
    if kind == Q.BF16:
        # Exact for bf16 input; from float32 it rounds to nearest even as torch's cast does.
        return tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    array = tensor.detach().float().contiguous().numpy()
    if kind == Q.F32:
        return array
    if kind == Q.F16:
        return tensor.detach().to(torch.float16).contiguous().numpy()
    return quants.quantize(array, kind)


def _np(kind: Q) -> np.dtype:
    return np.dtype({Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}[kind])


def _byte_shape(shape, kind: Q) -> tuple[int, ...]:
    return tuple(shape) if kind in _PLAIN else quants.quant_shape_to_byte_shape(shape, kind)


def _nbytes(shape, kind: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape) // block * size


WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_FOUR_AND_FIVE_BITS = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def _writable_type(name: str) -> Q:
    try:
        kind = Q[name.upper()]
    except KeyError:
        raise CheckpointError(f"unknown GGUF tensor type {name!r}; use one of {', '.join(WRITABLE_TYPES)}") from None
    if kind.name not in WRITABLE_TYPES:
        # The gguf package cannot write k-quants, and its ternary and MXFP4 types are no rounding of a float model.
        raise CheckpointError(f"herd does not write {kind.name} tensors (it writes {', '.join(WRITABLE_TYPES)}); write "
                              "F16 or Q8_0 and requantize with llama.cpp's llama-quantize")
    return kind


def _file_type(kind: Q) -> int:
    name = "ALL_F32" if kind == Q.F32 else f"MOSTLY_{kind.name}"
    return int(getattr(gguf.LlamaFileType, name, gguf.LlamaFileType.GUESSED))
