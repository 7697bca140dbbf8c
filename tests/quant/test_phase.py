"""Prompt tokens take one path through the quantized layers however the prompt is chunked and whatever shares its
forward; generated tokens the fast one. On the default model: the same greedy reply with a cold cache and after a
prefix-cache hit, and the same replies to a batch of short questions as to each alone."""
import pytest
import torch

import herd
from herd.generate import EngineConfig, Generator, SamplingParams
from herd.model import ModelConfig, Transformer
from herd.quant import blocks, kernel
from herd.quant.blocks import (MAX_GENERATED_TOKENS, MAX_INTEGER_TOKENS, BlockLinear, integer_matmul, matmul,
                               quantize_int4, quantize_int8)
from herd.quant.fp8 import FP8Linear, quantize_fp8
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
    prompt_levels = 2 if request.param == "kernel" else 0  # 0: the float loop, for prompts of up to 32 rows
    return (lambda x, w: kernel.ops().matmul_rows(x, w, prompt_levels),
            lambda x, w: kernel.ops().matmul_rows(x, w, 1), None)


def test_mixed_rows_take_each_path_per_row(paths):
    prompt_path, generated_path, _ = paths
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(48, 64), 32)
    x = torch.randn(6, 64)
    with prompt_rows(torch.tensor([4, 4, 0, 4, 0, 4])):  # a prompt of 4 rows, two generated tokens
        mixed = matmul(x, w)
    prompt = torch.tensor([True, True, False, True, False, True])
    assert torch.equal(mixed[prompt], prompt_path(x[prompt], w))
    assert torch.equal(mixed[~prompt], generated_path(x[~prompt], w))
    # the two paths really differ (else this test could not tell them apart)
    assert not torch.allclose(prompt_path(x, w), generated_path(x, w), atol=1e-6)
    with prompt_rows(torch.full((6,), 6)):
        assert torch.equal(matmul(x[:2], w), generated_path(x[:2], w))  # no mask of 2 rows: decided by count


def test_many_rows_are_generated_only_when_marked(paths):
    prompt_path, generated_path, cap = paths
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(48, 64), 32)
    x = torch.randn(MAX_INTEGER_TOKENS + 8, 64)
    assert torch.equal(matmul(x, w), prompt_path(x, w))  # unmarked: a direct forward of this many rows
    with prompt_rows(torch.zeros(len(x), dtype=torch.long)):
        assert torch.equal(matmul(x, w), generated_path(x, w))  # the engine's decode step of many sequences
    x = torch.randn(MAX_GENERATED_TOKENS + 1, 64)
    with prompt_rows(torch.zeros(len(x), dtype=torch.long)):  # PyTorch's einsum has a cap; the kernel none
        assert torch.equal(matmul(x, w), generated_path(x, w) if cap is None else x @ w.dequantize().T)


@pytest.mark.parametrize("layer", ["int4", "int4 without VNNI", "fp8"])
def test_a_prompt_row_computes_alike_in_any_company(layer, monkeypatch):
    # Without VNNI (and under fp8 on any CPU) a short prompt's rows take the kernel's loop and a long one's a GEMM
    # over the expanded weight, which round differently: each row by its own prompt's size, never by how many rows
    # share the forward. Before, a forward's row count decided, and a batch of short prompts took other numbers
    # than each alone.
    if kernel.ops() is None:
        pytest.skip("herd's kernel is not built on this machine")
    monkeypatch.setattr(kernel.ops(), "vnni", layer == "int4" and kernel.ops().vnni)
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    linear = FP8Linear(quantize_fp8(weight)) if layer == "fp8" else BlockLinear(quantize_int4(weight, 32))
    x = torch.randn(76, 64)
    short, long, generated = slice(0, 20), slice(20, 70), slice(70, 76)
    sizes = torch.tensor([20] * 20 + [50] * 50 + [0] * 6)

    def rows(*parts: slice) -> torch.Tensor:
        """The rows of `parts` computed in one forward; those of the first returned."""
        index = torch.cat([torch.arange(len(x))[p] for p in parts])
        with prompt_rows(sizes[index]):
            return linear(x[index])[:parts[0].stop - parts[0].start]

    together = rows(slice(0, 76))
    for part in (short, slice(3, 8), long, slice(60, 63)):
        alone = rows(part)
        assert torch.equal(alone, together[part])
        assert torch.equal(rows(part, generated), alone)  # beside a step's generated tokens
    assert torch.equal(rows(slice(60, 63), short), together[60:63])  # a long prompt's tail beside a short prompt
    assert torch.equal(rows(slice(3, 8), long), together[3:8])


@pytest.mark.parametrize("layer", ["int8-wo", "fp8"])
def test_a_generated_token_of_a_float_activation_layer_computes_alike_in_any_batch(layer):
    # Weight-only and fp8 layers outside the fused block (an output layer, a block with a layer kept in float): a
    # decode step of more than 32 sequences had taken the GEMM over the expanded weight, one sequence the loop.
    if kernel.ops() is None:
        pytest.skip("herd's kernel is not built on this machine")
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    linear = (FP8Linear(quantize_fp8(weight)) if layer == "fp8"
              else BlockLinear(quantize_int8(weight), integer=False))
    x = torch.randn(40, 64)
    with prompt_rows(torch.zeros(40, dtype=torch.long)):
        batch = linear(x)
    with prompt_rows(torch.zeros(1, dtype=torch.long)):
        assert all(torch.equal(linear(x[i:i + 1]), batch[i:i + 1]) for i in range(40))


def test_prompt_logprobs_do_not_depend_on_chunking():
    torch.manual_seed(0)
    model = apply_scheme(Transformer(CONFIG).eval(), Scheme.parse("int8"))
    assert isinstance(model.layers[0].attention.wq, BlockLinear)
    prompt = torch.randint(1, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    scores = [Generator(model, ByteTokenizer(), config=EngineConfig(max_step_tokens=chunk)).score([prompt], 1)[0]
              for chunk in (3, 7, 512)]
    for chunked in scores[:2]:
        torch.testing.assert_close(torch.tensor(chunked), torch.tensor(scores[2]), rtol=0, atol=1e-4)


@pytest.fixture(params=["native", "without VNNI"])
def default_model(request, monkeypatch):
    """The default model as this CPU computes it, and as the brief's CPU class (AVX2 without VNNI) does: prompts
    in float products there, the kernel's loop for a short one and a GEMM for a long one."""
    if request.param == "without VNNI":
        if kernel.ops() is None:
            pytest.skip("herd's kernel is not built on this machine")
        monkeypatch.setattr(kernel.ops(), "vnni", False)
    return herd.load()


def short_and_long_prompts(llm) -> list[list[int]]:
    texts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hello, my name is"]
    questions = ["hi", "Name a colour.", "What is the capital of France?",
                 "Summarise: " + " ".join(["the licence grants everyone the freedom to share and change it"] * 6)]
    return [llm.tokenizer.encode(t) for t in texts] + [llm.chat_prompt([{"role": "user", "content": q}])
                                                       for q in questions]


GREEDY_24 = SamplingParams(max_tokens=24, temperature=0)


@pytest.mark.heavy
def test_default_model_same_reply_cold_and_after_a_prefix_hit(default_model):
    llm = default_model
    engine = Generator(llm.model, llm.tokenizer)  # its own cache, empty
    prompt = llm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    cold = engine.generate([prompt], GREEDY_24)[0]
    assert engine.scheduler.stats.cached_tokens == 0
    warm = engine.generate([prompt], GREEDY_24)[0]
    assert 0 < len(prompt) - engine.scheduler.stats.cached_tokens <= 8  # a short tail was computed again
    assert "Paris" in cold.text and warm.tokens == cold.tokens


@pytest.mark.heavy
def test_default_model_answers_a_batch_as_each_alone(default_model):
    # Without VNNI, 11 of 16 short prompts (the brief's CPU class, AVX2 only) had other greedy replies in a batch
    # than alone: a forward's row count chose the float loop or the GEMM.
    llm = default_model
    prompts = short_and_long_prompts(llm)
    engine = Generator(llm.model, llm.tokenizer, config=EngineConfig(prefix_caching=False))
    alone = [engine.generate([p], GREEDY_24)[0].tokens for p in prompts]
    assert [out.tokens for out in engine.generate(prompts, GREEDY_24)] == alone


@pytest.mark.heavy
def test_default_model_answers_alike_before_and_after_prefix_hits(default_model):
    # A server's prompts, batched, then the same one at a time with their blocks in the prefix cache: without VNNI
    # 21-25 of 32 chat requests had answered alike (a hit left a few tokens, which took the float loop where the
    # whole prompt had taken the GEMM).
    llm = default_model
    prompts = short_and_long_prompts(llm)
    engine = Generator(llm.model, llm.tokenizer)
    together = [out.tokens for out in engine.generate(prompts, GREEDY_24)]
    cached = engine.scheduler.stats.cached_tokens
    assert [engine.generate([p], GREEDY_24)[0].tokens for p in prompts] == together
    assert engine.scheduler.stats.cached_tokens > cached  # the long prompts came from the cache
