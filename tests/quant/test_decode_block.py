"""The kernel's fused decode block against the model's own PyTorch block: same logits, same keys and values written
to the paged cache, for one token and for a token with its speculative draft."""
import copy

import pytest
import torch

from herd.generate import EngineConfig, Generator, SamplingParams
from herd.generate.kv_cache import PagedKVCache, StepAttention
from herd.model import ModelConfig, Transformer
from herd.quant.decode import DecodeBlock, use_decode_blocks
from herd.quant.kernel import ops
from herd.quant.phase import prompt_rows
from herd.quant.schemes import Scheme, apply_scheme

pytestmark = pytest.mark.skipif(ops() is None, reason="herd's kernel is not built on this machine")
CONFIG = ModelConfig(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=256,
                     max_seq_len=256)


def step(model, cache, blocks, cached, tokens, generated):
    """One engine-like forward of `tokens` after `cached` tokens: logits of every row."""
    return batch_step(model, cache, [(blocks, cached, tokens)], generated)


def batch_step(model, cache, seqs, generated):
    """One engine-like step of several sequences, (blocks, tokens cached, new tokens) each: logits of every row."""
    tokens = [t for _, _, new in seqs for t in new]
    positions = [c + i for _, c, new in seqs for i in range(len(new))]
    parts = [(blocks, c, len(new), generated and len(new) > 1) for blocks, c, new in seqs]
    with torch.inference_mode(), prompt_rows(torch.tensor([not generated] * len(tokens))):
        return model(torch.tensor([tokens]), torch.tensor([positions]), cache=StepAttention(cache, parts))[0]


# The real sizes' head geometry at a tiny width: head_dim 128 with four query heads a key-value head (Llama 3 8B,
# 70B, 405B) or three (3.2 3B), beside CONFIG's 32 and two.
GEOMETRIES = {"hd32-gqa2": CONFIG,
              "hd128-gqa4": ModelConfig(dim=512, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300,
                                        ffn_hidden_dim=256, max_seq_len=256),
              "hd128-gqa3": ModelConfig(dim=384, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=300,
                                        ffn_hidden_dim=256, max_seq_len=256)}


@pytest.mark.parametrize("scheme, tolerance", [("int8-wo", 1e-5), ("int8", 3e-2), ("int4", 3e-2), ("fp8", 3e-2)])
@pytest.mark.parametrize("new", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the engine's cache is float16 on the kernel
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fused_block_equals_the_pytorch_block(scheme, tolerance, new, dtype, geometry):
    config = GEOMETRIES[geometry]
    torch.manual_seed(0)
    eager = apply_scheme(Transformer(config).eval(), Scheme.parse(scheme))
    fused = use_decode_blocks(copy.deepcopy(eager))
    assert all(isinstance(layer, DecodeBlock) for layer in fused.layers)
    cache = PagedKVCache(config, num_blocks=8, block_size=16, device="cpu", dtype=dtype)
    blocks = [2, 3, 4]  # one contiguous run, not at the pool's start
    prompt = torch.randint(0, config.vocab_size, (37,)).tolist()
    step(eager, cache, blocks, 0, prompt, generated=False)
    caches = [cache, copy.deepcopy(cache)]
    tokens = torch.randint(0, config.vocab_size, (new,)).tolist()
    expected = step(eager, caches[0], blocks, len(prompt), tokens, generated=True)
    got = step(fused, caches[1], blocks, len(prompt), tokens, generated=True)
    # Integer schemes quantize each activation block to int8 (fp8: each activation to e4m3), where a rounding
    # difference between the two implementations can move a code by one step: equal up to that, not to float
    # rounding.
    assert (got - expected).norm() / expected.norm() < tolerance
    slots = slice(2 * 16 + len(prompt), 2 * 16 + len(prompt) + new)
    # float16 keys: a value within float rounding of a rounding boundary may land one float16 step apart
    stored = max(tolerance, 1e-3) if dtype == torch.float16 else tolerance
    for layer in range(config.n_layers):
        for a, b in ((caches[0].k[layer], caches[1].k[layer]), (caches[0].v[layer], caches[1].v[layer])):
            a, b = a.float(), b.float()
            assert (a[:, slots] - b[:, slots]).norm() / a[:, slots].norm() < stored
            assert torch.equal(a[:, 2 * 16:slots.start], b[:, 2 * 16:slots.start])  # the prompt's keys untouched


def test_unmarked_forwards_take_the_pytorch_block():
    torch.manual_seed(0)
    eager = apply_scheme(Transformer(CONFIG).eval(), Scheme.parse("int4"))
    fused = use_decode_blocks(copy.deepcopy(eager))
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 12))
    with torch.inference_mode():
        assert torch.equal(fused(tokens), eager(tokens))  # no cache, no marks


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_prompts_take_the_kernel_where_it_has_vnni_and_every_layer_is_integer(scheme):
    # int8 keeps float activations in wv and w2, whose float loop is meant for a few tokens: its prompts stay on
    # the PyTorch block; int4's take the kernel's block with two int8 levels where the CPU has VNNI.
    torch.manual_seed(0)
    eager = apply_scheme(Transformer(CONFIG).eval(), Scheme.parse(scheme))
    fused = use_decode_blocks(copy.deepcopy(eager))
    prompt = torch.randint(0, CONFIG.vocab_size, (40,)).tolist()
    caches = [PagedKVCache(CONFIG, num_blocks=8, block_size=16, device="cpu", dtype=torch.float32) for _ in range(2)]
    expected = step(eager, caches[0], [3, 0, 5], 0, prompt, generated=False)
    got = step(fused, caches[1], [3, 0, 5], 0, prompt, generated=False)
    if scheme == "int8" or not ops().vnni:
        assert torch.equal(got, expected)
        return
    # Two int8 levels compute as float activations do, so the two blocks differ by float rounding alone (the
    # order of a norm's sum, the SwiGLU's exponential), with the odd second-level code moved by one step.
    assert (got - expected).norm() / expected.norm() < 1e-4
    written = [16 * [3, 0, 5][p // 16] + p % 16 for p in range(len(prompt))]
    for layer in range(CONFIG.n_layers):
        for a, b in ((caches[0].k[layer], caches[1].k[layer]), (caches[0].v[layer], caches[1].v[layer])):
            assert (a[:, written] - b[:, written]).norm() / a[:, written].norm() < 1e-4


@pytest.mark.parametrize("scheme", [None, "fp8", "fp8-meta"])
def test_float_and_fp8_models_generate_as_before(scheme):
    """A float model keeps its blocks; FP8 blocks are fused, and one that keeps a layer in float is not (Meta's
    recipe keeps attention): the same tokens either way."""
    torch.manual_seed(4)
    model = Transformer(CONFIG).eval()
    if scheme:
        model = apply_scheme(model, Scheme("fp8", keep=("*.attention.*",) if scheme == "fp8-meta" else ()))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    prompt = torch.randint(1, CONFIG.vocab_size, (10,)).tolist()
    stacked = use_decode_blocks(copy.deepcopy(model))
    assert all(isinstance(layer, DecodeBlock) == (scheme == "fp8") for layer in stacked.layers)
    # A stack with no fused block runs the model's own loop, step after step (a first draft of the kept
    # stack failed here, looking for a fused block to read the shapes from).
    got, expected = (Generator(m, ByteTokenizer()).generate([prompt], params)[0] for m in (stacked, model))
    assert got.tokens == expected.tokens
    if scheme != "fp8":
        assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in expected.logprobs]


def test_state_dict_names_are_unchanged():
    eager = apply_scheme(Transformer(CONFIG).eval(), Scheme.parse("int4"))
    names = list(eager.state_dict())
    assert list(use_decode_blocks(copy.deepcopy(eager)).state_dict()) == names


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_a_batch_of_sequences_decodes_exactly_as_each_alone(scheme):
    torch.manual_seed(1)
    eager = apply_scheme(Transformer(CONFIG).eval(), Scheme.parse(scheme))
    fused = use_decode_blocks(copy.deepcopy(eager))
    cache = PagedKVCache(CONFIG, num_blocks=10, block_size=16, device="cpu", dtype=torch.float32)
    tables = [[5, 1], [2, 7, 3], [0]]  # scattered blocks, as after preemption or a prefix-cache hit
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,)).tolist() for n in (20, 35, 9)]
    for blocks, prompt in zip(tables, prompts):
        step(eager, cache, blocks, 0, prompt, generated=False)
    new = [torch.randint(0, CONFIG.vocab_size, (n,)).tolist() for n in (1, 3, 1)]  # the second with a draft
    seqs = [(blocks, len(prompt), tokens) for blocks, prompt, tokens in zip(tables, prompts, new)]
    together_cache = copy.deepcopy(cache)
    together = batch_step(fused, together_cache, seqs, generated=True)
    rows = 0
    for seq, tokens in zip(seqs, new):
        alone = step(fused, copy.deepcopy(cache), seq[0], seq[1], tokens, generated=True)
        assert torch.equal(together[rows:rows + len(tokens)], alone)
        rows += len(tokens)
    expected = batch_step(eager, copy.deepcopy(cache), seqs, generated=True)
    assert (together - expected).norm() / expected.norm() < 3e-2


class ByteTokenizer:
    stop_ids = [0]
    pad_id = None

    def decode_bytes(self, ids):
        return bytes(97 + i % 26 for i in ids)


def test_a_prompt_arriving_does_not_change_the_sequences_decoding():
    # The engine runs a step's decoding sequences apart from its prompt chunks, so they stay on the fused block.
    torch.manual_seed(2)
    model = use_decode_blocks(apply_scheme(Transformer(CONFIG).eval(), Scheme.parse("int4")))
    engine = Generator(model, ByteTokenizer(), config=EngineConfig(max_step_tokens=8))
    first, second = (torch.randint(1, CONFIG.vocab_size, (n,)).tolist() for n in (6, 60))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    alone = engine.generate([first], params)[0]
    got = []
    engine.submit([first], params, lambda d: got.extend(d.logprobs))
    while len(got) < 3:
        engine.step()
    engine.submit([second], params, lambda d: None)  # its prefill (8 tokens a step) overlaps the decoding
    while engine.has_work():
        engine.step()
    assert [lp.token for lp in got] == alone.tokens
    assert [lp.logprob for lp in got] == [lp.logprob for lp in alone.logprobs]


@pytest.fixture(params=["native", "without VNNI"])
def prompt_path(request, monkeypatch):
    """Prompts in two int8 levels where the CPU has VNNI, else float products: the kernel's loop for a short prompt,
    a BLAS GEMM for a long one."""
    if ops() is None:
        pytest.skip("herd's kernel is not built on this machine")
    if request.param == "without VNNI":
        monkeypatch.setattr(ops(), "vnni", False)


def int4_engine_inputs(seed, lengths, max_tokens):
    """A fused int4 model, prompts of these lengths and greedy parameters that report log-probabilities."""
    torch.manual_seed(seed)
    model = use_decode_blocks(apply_scheme(Transformer(CONFIG).eval(), Scheme.parse("int4")))
    prompts = [torch.randint(1, CONFIG.vocab_size, (n,)).tolist() for n in lengths]
    return model, prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)


def assert_same_reply(got, expected):
    assert got.tokens == expected.tokens
    assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in expected.logprobs]


def test_a_reply_is_the_same_however_its_prompt_is_chunked_and_whatever_shares_its_steps(prompt_path):
    # Every matmul computes a token alone, and so does attention (herd's kernel, for prompts too): one request
    # alone and the same request among others, its prompt cut into 8-token chunks, give the same tokens and
    # log-probabilities, bit for bit.
    model, prompts, params = int4_engine_inputs(3, (45, 30, 70), max_tokens=12)
    alone = Generator(model, ByteTokenizer(), config=EngineConfig(max_step_tokens=512)).generate(prompts[:1], params)
    together = Generator(model, ByteTokenizer(), config=EngineConfig(max_step_tokens=8)).generate(prompts, params)
    assert_same_reply(together[0], alone[0])


def test_a_preempted_reply_is_the_same_as_one_never_preempted(prompt_path):
    # A preempted sequence recomputes its prompt and the tokens it had generated, in forwards of one kind each, as
    # they first ran: a forward holding both kinds takes the PyTorch block, which differs from the fused one in
    # the last bits, and before this the recomputed keys, and the rest of the reply, did.
    model, prompts, params = int4_engine_inputs(5, (40, 37, 45), max_tokens=100)
    small = Generator(model, ByteTokenizer(), config=EngineConfig(kv_cache_bytes=1, max_step_tokens=64))
    outs = small.generate(prompts, params)
    assert small.scheduler.stats.preemptions > 0
    roomy = Generator(model, ByteTokenizer())
    for prompt, out in zip(prompts, outs):
        assert_same_reply(out, roomy.generate([prompt], params)[0])


def test_a_stack_of_blocks_runs_in_one_call_exactly_as_block_by_block():
    # Layer 1 kept in float: the stack runs layer 0 in one call, layer 1 in PyTorch, layer 2 in another call.
    torch.manual_seed(0)
    stacked = use_decode_blocks(apply_scheme(Transformer(CONFIG).eval(), Scheme("int4", keep=("layers.1.*",))))
    assert [isinstance(layer, DecodeBlock) for layer in stacked.layers] == [True, False, True]
    one_by_one = copy.deepcopy(stacked)
    one_by_one.layers = torch.nn.ModuleList(list(one_by_one.layers))  # no `run`: the model's own loop
    caches = [PagedKVCache(CONFIG, num_blocks=8, block_size=16, device="cpu", dtype=torch.float32) for _ in range(2)]
    prompt = torch.randint(0, CONFIG.vocab_size, (21,)).tolist()
    for model, cache in zip((stacked, one_by_one), caches):
        step(model, cache, [1, 2], 0, prompt, generated=False)
    for new in ([5], [7, 8, 9]):  # a token; a token with its draft
        got, expected = (step(model, cache, [1, 2], len(prompt), new, generated=True)
                         for model, cache in zip((stacked, one_by_one), caches))
        assert torch.equal(got, expected)
        prompt += new
    written = slice(16, 16 + len(prompt))  # blocks 1 and 2
    for layer in range(CONFIG.n_layers):
        for kv in ("k", "v"):
            assert torch.equal(getattr(caches[0], kv)[layer][:, written], getattr(caches[1], kv)[layer][:, written])
