"""Speculative decoding by prompt lookup: the same tokens as plain greedy decoding, in fewer engine steps."""
import copy
import random

import pytest
import torch

import herd
from herd.generate import EngineConfig, Generator, SamplingParams
from herd.generate.speculative import SpeculativeConfig, ngram_draft
from herd.model import ModelConfig, Transformer
from herd.quant.decode import use_decode_blocks
from herd.quant.kernel import ops
from herd.quant.schemes import Scheme, apply_scheme

from test_engine import ByteTokenizer

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=128, max_seq_len=256)


def lookup_reference(tokens, limit, ngram, min_ngram):
    """The definition, written plainly: the longest recurring suffix, its latest earlier occurrence."""
    for n in range(min(ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + limit]
    return []


def test_ngram_draft_equals_its_definition_on_random_sequences():
    rng = random.Random(0)
    found = 0
    for _ in range(400):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        args = (rng.randrange(0, 6), rng.randrange(2, 5), rng.randrange(1, 3))
        expected = lookup_reference(tokens, *args) if len(tokens) > args[2] and args[0] else []
        assert ngram_draft(tokens, *args) == expected
        found += bool(expected)
    assert found > 100  # the cases exercised drafts, not only misses


def test_ngram_draft_prefers_the_longest_suffix():
    tokens = [1, 2, 3, 9, 2, 3, 7, 5, 1, 2, 3]
    assert ngram_draft(tokens, 2, ngram=3, min_ngram=1) == [9, 2]  # "1 2 3" recurs; "2 3" alone would give 7 5
    assert ngram_draft(tokens, 2, ngram=2, min_ngram=1) == [7, 5]
    assert ngram_draft([4, 5, 6], 3, ngram=3, min_ngram=2) == []


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="min_ngram"):
        SpeculativeConfig(ngram=2, min_ngram=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(5)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():
        model.output.weight.mul_(30)
    return model


def engines(model, tokenizer, draft_tokens=4, **config):
    plain = Generator(model, tokenizer, config=EngineConfig(speculative=SpeculativeConfig(draft_tokens=0), **config))
    spec = Generator(model, tokenizer, config=EngineConfig(speculative=SpeculativeConfig(draft_tokens=draft_tokens),
                                                           **config))
    return plain, spec


def repetitive_prompts(count, seed=0):
    """Prompts that repeat a phrase, so that lookups find drafts (right or wrong)."""
    g = random.Random(seed)
    out = []
    for _ in range(count):
        phrase = [g.randrange(1, 512) for _ in range(g.randrange(3, 9))]
        out.append([g.randrange(1, 512) for _ in range(g.randrange(1, 6))] + phrase * g.randrange(2, 5))
    return out


@pytest.mark.parametrize("quantize, fused", [(None, False), ("int8", False), ("int4", False), ("int8", True),
                                             ("int4", True)])
def test_tiny_models_decode_the_same_tokens_with_and_without_drafts(tiny, quantize, fused):
    # Quantized layers decode a token in int8 arithmetic, where any rounding difference grows: the check that
    # drafted tokens get exactly the numbers of one token at a time, in PyTorch's blocks and in the kernel's.
    model = tiny if quantize is None else apply_scheme(copy.deepcopy(tiny), Scheme.parse(quantize))
    if fused:
        if ops() is None:
            pytest.skip("herd's kernel is not built on this machine")
        model = use_decode_blocks(model)
    plain, spec = engines(model, ByteTokenizer())
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    batch = repetitive_prompts(4)  # up to SpeculativeConfig.max_batch decoding together: all of them draft
    expected = plain.generate(batch, params)
    got = spec.generate(batch, params)
    for a, b in zip(expected, got):
        assert b.tokens == a.tokens
        assert [(lp.token, lp.top.keys()) for lp in b.logprobs] == [(lp.token, lp.top.keys()) for lp in a.logprobs]
    stats = spec.scheduler.stats
    assert stats.accepted_tokens > 0 and stats.drafted_tokens > stats.accepted_tokens  # right and wrong guesses
    assert stats.computed_tokens < plain.scheduler.stats.computed_tokens + stats.drafted_tokens
    assert spec.cache.pool.available == spec.cache.pool.num_blocks  # every block back, drafts' included


def test_a_draft_never_runs_past_max_tokens_or_a_stop_token(tiny):
    prompt = repetitive_prompts(1, seed=3)[0]
    plain, spec = engines(tiny, ByteTokenizer(), draft_tokens=6)
    free = plain.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].tokens
    for limit in (1, 2, 5, 13):
        params = SamplingParams(max_tokens=limit, temperature=0, ignore_eos=True)
        assert spec.generate([prompt], params)[0].tokens == free[:limit]
    # Stopping at a token the drafts would run past: the reply ends there, the stop token excluded.
    stop = free[7]
    params = SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop,))
    out = spec.generate([prompt], params)[0]
    assert out.tokens == free[:free.index(stop)] and out.stop_token == stop


def test_sampled_and_constrained_sequences_are_not_drafted(tiny):
    _, spec = engines(tiny, ByteTokenizer())
    spec.generate(repetitive_prompts(3), SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True))
    assert spec.scheduler.stats.drafted_tokens == 0
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    spec.generate(repetitive_prompts(4), greedy, constraints=[AnyToken() for _ in range(4)])
    assert spec.scheduler.stats.drafted_tokens == 0
    spec.generate(repetitive_prompts(4), greedy)  # the same requests unconstrained do draft
    assert spec.scheduler.stats.drafted_tokens > 0


class AnyToken:
    """A constraint that allows every token: the engine must still not draft for a constrained sequence."""

    def mask(self, logits):
        return logits

    def accept(self, token):
        pass

    finished = False


@pytest.mark.heavy
def test_the_default_model_gives_plain_greedy_tokens_with_drafts_in_fewer_steps():
    llm = herd.load()
    source = open(herd.generate.speculative.__file__).read()
    ask = [{"role": "user", "content": f"{source}\n\nRepeat the function ngram_draft above exactly."},
           {"role": "user", "content": "Write a long story about a robot who learns to paint."}]
    plain, spec = engines(llm.model, llm.tokenizer, draft_tokens=3)
    params = SamplingParams(max_tokens=96, temperature=0)
    for message in ask:
        ids = llm.chat_format.encode_dialog([message])
        assert spec.generate([ids], params)[0].tokens == plain.generate([ids], params)[0].tokens
    assert spec.scheduler.stats.accepted_tokens > 20
