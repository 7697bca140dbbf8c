"""Prompt tokens take one path through the quantized layers however the prompt is chunked; generated tokens the fast
one. On the default model: the same greedy reply with a cold cache and after a prefix-cache hit."""
import pytest
import torch

import herd
from herd.generate import EngineConfig, Generator, SamplingParams
from herd.model import ModelConfig, Transformer
from herd.quant import blocks, kernel
from herd.quant.blocks import (MAX_GENERATED_TOKENS, MAX_INTEGER_TOKENS, BlockLinear, integer_matmul, matmul,
                               quantize_int4)
from herd.quant.phase import prompt_rows
from herd.quant.schemes import Scheme, apply_scheme

CONFIG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=256, max_seq_len=256)


class ByteTokenizer:
    stop_ids = [0]
    pad_id = None

    def decode_bytes(self, ids):
        return bytes(97 + i % 26 for i in ids)


@pytest.fixture(params=["kernel", "kernel without VNNI", "pytorch"])
def paths(request, monkeypatch):
    """How a quantized layer computes prompt rows and generated rows: where the kernel runs with VNNI (two int8
    levels for prompts), without it (float activations for prompts), and where PyTorch does (a GPU, no compiler)."""
    if request.param == "pytorch":
        monkeypatch.setattr(blocks, "ops", lambda: None)
        return lambda x, w: x @ w.dequantize().T, lambda x, w: integer_matmul(x, w), MAX_GENERATED_TOKENS
    if kernel.ops() is None:
        pytest.skip("herd's kernel is not built on this machine")
    monkeypatch.setattr(kernel.ops(), "vnni", request.param == "kernel")
    prompt_levels = 2 if request.param == "kernel" else 0  # 0: the float loop, up to 32 rows
    return (lambda x, w: kernel.ops().matmul_rows(x, w, prompt_levels),
            lambda x, w: kernel.ops().matmul_rows(x, w, 1), None)


def test_mixed_rows_take_each_path_per_row(paths):
    prompt_path, generated_path, _ = paths
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(48, 64), 32)
    x = torch.randn(6, 64)
    prompt = torch.tensor([True, True, False, True, False, True])
    with prompt_rows(prompt):
        mixed = matmul(x, w)
    assert torch.equal(mixed[prompt], prompt_path(x[prompt], w))
    assert torch.equal(mixed[~prompt], generated_path(x[~prompt], w))
    # the two paths really differ (else this test could not tell them apart)
    assert not torch.allclose(prompt_path(x, w), generated_path(x, w), atol=1e-6)
    with prompt_rows(torch.ones(6, dtype=torch.bool)):
        assert torch.equal(matmul(x[:2], w), generated_path(x[:2], w))  # no mask of 2 rows: decided by count


def test_many_rows_are_generated_only_when_marked(paths):
    prompt_path, generated_path, cap = paths
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(48, 64), 32)
    x = torch.randn(MAX_INTEGER_TOKENS + 8, 64)
    assert torch.equal(matmul(x, w), prompt_path(x, w))  # unmarked: a direct forward of this many rows
    with prompt_rows(torch.zeros(len(x), dtype=torch.bool)):
        assert torch.equal(matmul(x, w), generated_path(x, w))  # the engine's decode step of many sequences
    x = torch.randn(MAX_GENERATED_TOKENS + 1, 64)
    with prompt_rows(torch.zeros(len(x), dtype=torch.bool)):  # PyTorch's einsum has a cap; the kernel none
        assert torch.equal(matmul(x, w), generated_path(x, w) if cap is None else x @ w.dequantize().T)


def test_prompt_logprobs_do_not_depend_on_chunking():
    torch.manual_seed(0)
    model = apply_scheme(Transformer(CONFIG).eval(), Scheme.parse("int8"))
    assert isinstance(model.layers[0].attention.wq, BlockLinear)
    prompt = torch.randint(1, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    scores = [Generator(model, ByteTokenizer(), config=EngineConfig(max_step_tokens=chunk)).score([prompt], 1)[0]
              for chunk in (3, 7, 512)]
    for chunked in scores[:2]:
        torch.testing.assert_close(torch.tensor(chunked), torch.tensor(scores[2]), rtol=0, atol=1e-4)


@pytest.mark.heavy
def test_default_model_same_reply_cold_and_after_a_prefix_hit():
    llm = herd.load()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.chat_prompt(question)
    params = SamplingParams(max_tokens=16, temperature=0)
    stats = llm.generator.scheduler.stats
    cold = llm.generator.generate([prompt], params)[0]
    assert stats.cached_tokens == 0
    warm = llm.generator.generate([prompt], params)[0]
    assert 0 < len(prompt) - stats.cached_tokens <= 8  # only a short tail of the prompt was computed again
    assert "Paris" in cold.text and warm.tokens == cold.tokens
