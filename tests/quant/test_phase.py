"""Prompt tokens take one path through the quantized layers however the prompt is chunked; generated tokens the fast
one. On the default model: the same greedy reply with a cold cache and after a prefix-cache hit."""
import pytest
import torch

import herd
from herd.generate import EngineConfig, Generator, SamplingParams
from herd.model import ModelConfig, Transformer
from herd.quant.blocks import MAX_GENERATED_TOKENS, MAX_INTEGER_TOKENS, BlockLinear, _matmul, matmul, quantize_int4
from herd.quant.phase import prompt_rows
from herd.quant.schemes import Scheme, apply_scheme

CONFIG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=256, max_seq_len=256)


class ByteTokenizer:
    stop_ids = [0]
    pad_id = None

    def decode_bytes(self, ids):
        return bytes(97 + i % 26 for i in ids)


def test_mixed_rows_take_each_path_per_row():
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(48, 64), 32)
    x = torch.randn(6, 64)
    prompt = torch.tensor([True, True, False, True, False, True])
    with prompt_rows(prompt):
        mixed = matmul(x, w)
    assert torch.equal(mixed[prompt], _matmul(x[prompt], w, False))
    assert torch.equal(mixed[~prompt], _matmul(x[~prompt], w, True))
    # the two paths really differ (else this test could not tell them apart)
    assert not torch.allclose(_matmul(x, w, False), _matmul(x, w, True), atol=1e-6)
    with prompt_rows(torch.ones(6, dtype=torch.bool)):
        assert torch.equal(matmul(x[:2], w), _matmul(x[:2], w, True))  # no mask of 2 rows: decided by count


def test_many_generated_rows_stay_integer_only_when_marked():
    torch.manual_seed(0)
    w = quantize_int4(torch.randn(48, 64), 32)
    x = torch.randn(MAX_INTEGER_TOKENS + 8, 64)
    integer, exact = _matmul(x, w, True), _matmul(x, w, False)
    assert not torch.allclose(integer, exact, atol=1e-6)
    assert torch.equal(matmul(x, w), exact)  # unmarked: a direct forward of this many rows is exact
    with prompt_rows(torch.zeros(len(x), dtype=torch.bool)):
        assert torch.equal(matmul(x, w), integer)  # the engine's decode step of many sequences
    rows = MAX_GENERATED_TOKENS + 1
    x = torch.randn(rows, 64)
    with prompt_rows(torch.zeros(rows, dtype=torch.bool)):
        assert torch.equal(matmul(x, w), _matmul(x, w, False))


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
