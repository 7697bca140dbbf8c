"""The engine's continuous batching, paged KV cache and prefix cache, against plain full forwards of the model."""
import copy
import dataclasses
import random
import re
import threading
import time

import pytest
import torch

from herd.generate import EngineConfig, Generator, SamplingParams
from herd.generate.kv_cache import Segment
from herd.model import ModelConfig, Transformer
from herd.quant.kernel import ops

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=128, max_seq_len=128)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class ByteTokenizer:
    """Just what the engine asks of a tokenizer: stop ids and the bytes of a token."""

    stop_ids = [0]
    pad_id = None

    def decode_bytes(self, ids):
        return bytes(97 + i % 26 for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():  # sharp logits, so greedy choices are not near-ties
        model.output.weight.mul_(30)
    return model


def engine(model, **config):
    return Generator(model, ByteTokenizer(), config=EngineConfig(**{"max_step_tokens": 24, **config}))


def reference_greedy(model, prompt, n):
    """Greedy decoding by full forwards over the whole sequence: no cache at all."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def prompts(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def assert_blocks_all_returned(gen):
    pool = gen.cache.pool
    assert int(pool.refs.sum()) == 0 and pool.available == pool.num_blocks
    assert not gen.scheduler.running and not gen.scheduler.waiting


def test_continuous_batch_equals_full_forward_greedy(model):
    gen = engine(model)
    batch = prompts(5)
    outs = gen.generate(batch, GREEDY)
    for prompt, out in zip(batch, outs):
        assert out.tokens == reference_greedy(model, prompt, 12)
    assert_blocks_all_returned(gen)


def test_scored_log_probabilities_equal_a_full_forward(model):
    prompt = prompts(1, seed=4)[0] + list(range(100, 160))
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    expected = torch.tensor([float(logp[i - 1, prompt[i]]) for i in range(5, len(prompt))])
    # chunked prefill across several steps, keys and values kept in float32: the same numbers
    exact = engine(model, max_step_tokens=7, kv_cache_dtype="model").score([prompt], score_from=5)[0]
    assert torch.allclose(torch.tensor(exact), expected, atol=1e-5)
    # where herd's kernel attends, in float16 by default: within its rounding (these logits reach 100)
    default = engine(model, max_step_tokens=7)
    assert default.cache.k[0].dtype == (torch.float16 if ops() is not None else torch.float32)
    score = default.score([prompt], score_from=5)[0]
    assert torch.allclose(torch.tensor(score), expected, rtol=1e-4, atol=1e-4)


def test_prompt_logprobs_with_alternatives_then_generation(model):
    """SamplingParams.prompt_logprobs: every prompt token after the first scored with its n likeliest
    alternatives, on the first delta, and the sequence then generates as it would have; a sequence preempted and
    recomputed scores each token once."""
    prompt = prompts(1, seed=5)[0] + list(range(200, 250))
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=3)
    gen = engine(model, max_step_tokens=9, kv_cache_dtype="model")
    done = gen.generate([prompt], params)[0]
    assert done.tokens == gen.generate([prompt], dataclasses.replace(params, prompt_logprobs=None))[0].tokens
    assert [lp.token for lp in done.prompt_logprobs] == prompt[1:]
    for i, lp in enumerate(done.prompt_logprobs):
        # (these logits reach 100: a float32 forward in another order differs in the last bits)
        assert lp.logprob == pytest.approx(float(logp[i, prompt[i + 1]]), abs=5e-5)
        values, ids = logp[i].topk(3)
        assert list(lp.top) == ids.tolist()
        assert list(lp.top.values()) == pytest.approx(values.tolist(), abs=5e-5)
    # The smallest cache: three such sequences preempt one another and recompute.
    small = engine(model, kv_cache_bytes=1, kv_cache_dtype="model")
    batch = [prompt, prompt[::-1], prompt[5:]]
    outs = small.generate(batch, params)
    assert small.scheduler.stats.preemptions > 0
    for p, out in zip(batch, outs):
        alone = gen.generate([p], params)[0]
        assert out.tokens == alone.tokens
        assert [lp.token for lp in out.prompt_logprobs] == p[1:]
        expected = [lp.logprob for lp in alone.prompt_logprobs]
        assert [lp.logprob for lp in out.prompt_logprobs] == pytest.approx(expected, abs=5e-5)
    assert_blocks_all_returned(small)


def test_sequences_admitted_between_steps_equal_solo_runs(model):
    gen = engine(model)
    gen.start()
    try:
        batch = prompts(6, seed=1)
        results, threads = {}, []

        def run(i):
            time.sleep(0.01 * i)  # arrive while others are decoding
            results[i] = gen.generate([batch[i]], GREEDY)[0].tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        gen.close()
    solo = engine(model)
    assert [results[i] for i in range(len(batch))] == [solo.generate([p], GREEDY)[0].tokens for p in batch]
    assert_blocks_all_returned(gen)


def test_prefix_cache_hit_skips_prefill_and_changes_nothing(model):
    gen = engine(model)
    history = prompts(1, seed=2)[0] + list(range(200, 260))  # several full blocks
    first = gen.generate([history], GREEDY)[0]
    follow_up = history + first.tokens + [7, 8, 9]
    computed = gen.scheduler.stats.computed_tokens
    again = gen.generate([follow_up], GREEDY)[0]
    recomputed = gen.scheduler.stats.computed_tokens - computed
    assert again.tokens == engine(model).generate([follow_up], GREEDY)[0].tokens
    block = gen.cache.block_size
    # Only the tail after the last full cached block is computed, plus the new tokens.
    assert recomputed <= len(follow_up) % block + block + GREEDY.max_tokens
    assert gen.scheduler.stats.cached_tokens >= (len(follow_up) - block) // block * block
    assert_blocks_all_returned(gen)


def test_prefix_caching_off_prefills_every_prompt_in_full(model):
    gen = engine(model, prefix_caching=False)
    history = prompts(1, seed=2)[0] + list(range(200, 260))
    first = gen.generate([history], GREEDY)[0]
    follow_up = history + first.tokens + [7, 8, 9]
    computed = gen.scheduler.stats.computed_tokens
    again = gen.generate([follow_up], GREEDY)[0]
    assert gen.scheduler.stats.computed_tokens - computed == len(follow_up) + GREEDY.max_tokens - 1
    assert gen.scheduler.stats.cached_tokens == 0
    assert again.tokens == engine(model).generate([follow_up], GREEDY)[0].tokens
    assert not gen.cache.pool.cached  # nothing kept: every block went straight back to the free list
    assert_blocks_all_returned(gen)


def test_choices_of_one_request_share_the_prompt_blocks(model):
    gen = engine(model)
    prompt = list(range(1, 70))
    params = SamplingParams(max_tokens=8, temperature=4.0, top_p=1.0, seed=5, ignore_eos=True)
    outs = gen.generate([prompt], params, n=3)
    assert len({tuple(o.tokens) for o in outs}) == 3
    assert outs[0].tokens == engine(model).generate([prompt], params)[0].tokens  # seeded: batching changes nothing
    assert gen.scheduler.stats.cached_tokens == 2 * (len(prompt) - 1) // 16 * 16
    assert [o.tokens for o in gen.generate([prompt], params, n=3)] == [o.tokens for o in outs]


def test_preemption_when_blocks_run_out_recomputes_the_same_tokens(model):
    # The smallest cache the engine allows: one context (8 blocks of 16) plus one block.
    gen = engine(model, kv_cache_bytes=1)
    assert gen.cache.pool.num_blocks == 9
    batch = [list(range(1 + i, 41 + i)) for i in range(3)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = gen.generate(batch, params)
    assert gen.scheduler.stats.preemptions > 0
    solo = engine(model)
    assert [o.tokens for o in outs] == [solo.generate([p], params)[0].tokens for p in batch]
    assert_blocks_all_returned(gen)


def test_preempted_sequences_attend_over_their_own_blocks_on_the_pytorch_path(model):
    """A float64 model attends in PyTorch, as on a GPU. After preemptions the pool hands out blocks out of order
    ([0, 1, 6, 5, 4]), which had been read as one run spanning blocks 0..4, two of them other sequences' keys."""
    assert Segment(0, 1, 68, [0, 1, 6, 5, 4], 16, "cpu").run is None
    assert Segment(0, 1, 68, [2, 3, 4, 5, 6], 16, "cpu").run == 32
    wide = copy.deepcopy(model).double()
    rnd = random.Random(1)
    batch = []
    for _ in range(10):
        if rnd.random() < 0.4:
            pattern = [rnd.randrange(1, 512) for _ in range(rnd.randrange(2, 5))]
            batch.append((pattern * 30)[:rnd.randrange(6, 60)])
        else:
            batch.append([rnd.randrange(1, 512) for _ in range(rnd.randrange(1, 80))])
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    gen = engine(wide, kv_cache_bytes=1, max_batch=rnd.choice([2, 4, 8]), max_step_tokens=rnd.choice([5, 16, 24, 64]))
    outs = gen.generate(batch, params)
    assert gen.scheduler.stats.preemptions > 0 and gen.cache.k[0].dtype == torch.float64
    assert [o.tokens for o in outs] == [reference_greedy(wide, p, 30) for p in batch]


def test_a_recompute_after_preemption_is_not_counted_as_a_prompt_or_a_cache_hit(model):
    """Prompts sharing nothing: none of their tokens came from the cache however often they were preempted (the
    recompute had been counted again, cached_tokens past the prompt's own length)."""
    gen = engine(model, kv_cache_bytes=1)
    batch = [[7 + i] * 10 for i in range(3)]
    gen.generate(batch, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    stats = gen.scheduler.stats
    assert stats.preemptions > 0
    assert (stats.prompt_tokens, stats.cached_tokens) == (30, 0)


def test_cancel_and_timeout_free_blocks_at_once(model):
    gen = engine(model)
    gen.start()
    try:
        got = []
        request = gen.submit([list(range(1, 30))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                             got.append)
        while not got:
            time.sleep(0.005)
        request.cancel()
        for _ in range(200):
            if request.finished:
                break
            time.sleep(0.01)
        assert got[-1].finish_reason == "cancelled" and len(got) < 100
        assert_blocks_all_returned(gen)
        late = gen.generate([list(range(1, 30))], SamplingParams(max_tokens=100, temperature=0), timeout=0)
        assert late[0].finish_reason == "timeout"
    finally:
        gen.close()
    assert_blocks_all_returned(gen)


def test_block_pool_prefers_contiguous_runs_and_evicts_least_recent(model):
    gen = engine(model)
    pool = gen.cache.pool
    a = [pool.allocate()]
    for _ in range(3):
        a.append(pool.allocate(a[-1]))
    assert a == [a[0], a[0] + 1, a[0] + 2, a[0] + 3]
    for i, block in enumerate(a):
        pool.register(block, bytes([i]) * 16)
    for block in reversed(a):
        pool.release(block)
    assert pool.available == pool.num_blocks and pool.lookup([bytes([0]) * 16, bytes([1]) * 16]) == a[:2]
    pool.acquire(a[0])  # a hit makes a block busy again, so never evicted
    assert list(pool.evictable) == a[3:0:-1]
    # a sequence growing from a[0] takes a free block, not the cached a[1] beside it: that had been evicted for
    # contiguity with the pool all but empty (two system prompts with a common start evicted each other's blocks)
    assert pool.allocate(a[0]) not in a and list(pool.evictable) == a[3:0:-1]


def test_prompts_sharing_a_start_keep_each_others_cached_blocks(model):
    gen = engine(model)
    start = list(range(1, 17))
    first, second = start + list(range(100, 148)), start + list(range(200, 248))
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for prompt in (first, second, first, second):
        gen.generate([prompt], params)
    assert gen.cache.pool.num_free > 100
    # the third and fourth find their whole prompts but the last, partial block (they had found 16 tokens of 64)
    assert gen.scheduler.stats.cached_tokens == 16 + 2 * 48


def test_choices_admitted_in_one_step_take_the_prompt_from_the_first(model):
    """With room for every choice's prompt in one step, each had computed the whole prompt (0 of 200 cached)."""
    gen = engine(model, max_step_tokens=512)
    prompt = list(range(1, 101))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = gen.generate([prompt], params, n=3)
    assert gen.scheduler.stats.cached_tokens == 2 * 96
    assert [o.tokens for o in outs] == [engine(model).generate([prompt], params)[0].tokens] * 3


def test_ids_past_the_tokenizers_vocabulary_are_never_drawn(model):
    class SmallTokenizer(ByteTokenizer):
        vocab_size = 256  # the model's 512 ids are padded past what the tokenizer can decode

    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, seed=1)
    unrestricted = engine(model).generate(prompts(4), greedy)
    assert any(t >= 256 for c in unrestricted for t in c.tokens)  # the model itself prefers some padded ids
    gen = Generator(model, SmallTokenizer(), config=EngineConfig(max_step_tokens=24))
    done = gen.generate(prompts(4), greedy) + gen.generate(prompts(4), sampled)
    assert all(t < 256 for c in done for t in c.tokens)


def test_log_probabilities_are_over_the_ids_that_may_be_drawn(model):
    """With the model's vocabulary padded past the tokenizer's, log-probabilities had been over every model row:
    too low, and padded ids among the top alternatives, which have no text for a server to show."""
    class SmallTokenizer(ByteTokenizer):
        vocab_size = 256

    gen = Generator(model, SmallTokenizer(), config=EngineConfig(max_step_tokens=24, kv_cache_dtype="model"))
    prompt = [t % 256 for t in prompts(1)[0][:8]] + [300]  # a padded id last: never drawn, so log p is -inf
    done = gen.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3,
                                                 prompt_logprobs=3))[0]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + done.tokens]))[0, :, :256], -1)
    for position, lp in [(len(prompt) - 1 + i, lp) for i, lp in enumerate(done.logprobs)] + \
            list(enumerate(done.prompt_logprobs[:-1])):
        assert lp.logprob == pytest.approx(float(logp[position, lp.token]), abs=5e-5)
        assert list(lp.top) == logp[position].topk(3).indices.tolist()
    assert done.prompt_logprobs[-1].logprob == float("-inf") and max(done.prompt_logprobs[-1].top) < 256


def test_ignore_eos_still_stops_at_the_callers_stop_token_ids(model):
    """ignore_eos passes over the tokenizer's end tokens only (as vLLM's does): it had dropped stop_token_ids too."""
    gen = engine(model)
    plain = gen.generate(prompts(1), GREEDY)[0].tokens
    stop = next(t for t in plain[2:] if t not in plain[:2])
    done = gen.generate(prompts(1), dataclasses.replace(GREEDY, stop_token_ids=(stop,)))[0]
    assert (done.tokens, done.finish_reason, done.stop_token) == (plain[:plain.index(stop)], "stop", stop)


def test_any_seed_in_range_works_with_any_n_and_all_its_bits_count(model):
    """Choice i samples with seed + i: at 2**64 - 1 that had been refused, and PyTorch's CPU generator keeps only
    32 bits of a seed, so seeds 2**32 apart had sampled alike."""
    gen = engine(model)
    params = SamplingParams(max_tokens=8, temperature=4.0, top_p=1.0, ignore_eos=True)

    def sampled(seed, n=1):
        return [c.tokens for c in gen.generate(prompts(1), dataclasses.replace(params, seed=seed), n=n)]

    top = sampled((1 << 64) - 1, n=2)
    assert top == [sampled(-1)[0], sampled(0)[0]]  # wrapping round, as torch takes a negative seed
    assert sampled(7) != sampled(7 + (1 << 32)) and sampled(7) == sampled(7)


@pytest.mark.parametrize(("fields", "words"), [
    ({"max_batch": 0}, "max_batch must be at least 1, got 0"),  # the engine had waited for ever
    ({"max_step_tokens": -1}, "max_step_tokens must be at least 1, got -1"),  # so had it here
    ({"block_size": 0}, "block_size must be at least 1, got 0"),  # a ZeroDivisionError
    ({"max_queue": 0}, "max_queue must be at least 1, got 0"),  # every request refused as if the queue were full
    ({"kv_cache_bytes": -1}, "kv_cache_bytes must be at least 0, got -1"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype 'fp8': use 'auto' or 'model'"),
])
def test_engine_settings_out_of_range_are_refused_naming_the_field(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        EngineConfig(**fields)


def test_a_block_larger_than_the_context_is_refused_naming_it(model):
    with pytest.raises(ValueError, match=re.escape("block_size 1000000000 exceeds the model's context of 128")):
        engine(model, block_size=10**9)
    assert engine(model, block_size=CONFIG.max_seq_len).generate(prompts(1), SamplingParams(max_tokens=2))


def test_speculative_settings_out_of_range_are_refused_naming_the_field():
    from herd.generate.speculative import SpeculativeConfig

    with pytest.raises(ValueError, match="max_batch must be at least 0, got -1"):
        SpeculativeConfig(max_batch=-1)
    with pytest.raises(ValueError, match=re.escape("min_ngram (3) must not exceed ngram (2)")):
        SpeculativeConfig(ngram=2, min_ngram=3)


@pytest.mark.parametrize(("config", "fields", "words"), [
    ("engine", {"block_size": 2.5}, "block_size must be an integer, got 2.5"),  # herd.load had failed in torch
    ("engine", {"block_size": "16"}, "block_size must be an integer, got '16'"),  # had failed comparing str and int
    ("engine", {"block_size": None}, "block_size must be an integer, got None"),  # the range check had let it by
    ("engine", {"max_batch": True}, "max_batch must be an integer, got True"),
    ("engine", {"kv_cache_bytes": 1e9}, "kv_cache_bytes must be an integer, got 1000000000.0"),
    ("engine", {"prefix_caching": "no"}, "prefix_caching must be True or False, got 'no'"),  # had turned caching on
    ("engine", {"prefix_caching": 0}, "prefix_caching must be True or False, got 0"),
    ("engine", {"kv_cache_dtype": None}, "kv_cache_dtype must be a string, got None"),
    ("engine", {"speculative": {"draft_tokens": 2}}, "speculative must be a SpeculativeConfig, got {'draft_tokens'"),
    ("speculative", {"draft_tokens": 2.5}, "draft_tokens must be an integer, got 2.5"),  # had failed slicing
    ("speculative", {"ngram": "4"}, "ngram must be an integer, got '4'"),
    ("speculative", {"min_ngram": False}, "min_ngram must be an integer, got False"),
    ("speculative", {"max_batch": 4.0}, "max_batch must be an integer, got 4.0"),
])
def test_engine_settings_of_the_wrong_type_are_refused_naming_the_field(config, fields, words):
    from herd.generate.speculative import SpeculativeConfig

    with pytest.raises(TypeError, match=re.escape(words)):
        {"engine": EngineConfig, "speculative": SpeculativeConfig}[config](**fields)
