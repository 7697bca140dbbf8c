"""The generation engine on a tiny random model with the real Llama 3 tokenizer."""
import dataclasses
import random
import re
import signal

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import herd
from herd.generate import ContextLengthError, Generator, SamplingParams
from herd.generate.sampling import PenaltyTokens, argmax, filtered_probs, sample
from herd.model import ModelConfig, Transformer

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=128,
                     max_seq_len=96)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(1)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are not near-ties
        model.output.weight.mul_(40)
    return Generator(model, herd.load_tokenizer(), prefill_chunk=8)


PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived", "1, 2, 3,"]
GREEDY = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)


def ids(generator, text):
    return generator.tokenizer.encode(text, bos=True)


def test_batched_greedy_equals_one_prompt_at_a_time(generator):
    prompts = [ids(generator, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3  # different lengths, so the batch is padded
    batch = generator.generate(prompts, GREEDY)
    for prompt, done in zip(prompts, batch):
        alone = generator.generate([prompt], GREEDY)[0]
        assert done.tokens == alone.tokens
        assert done.finish_reason == "length" and len(done.tokens) == 14


def test_seeded_sampling_is_reproducible_and_batch_independent(generator):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    prompts = [ids(generator, p) for p in PROMPTS]
    first = [c.tokens for c in generator.generate(prompts, params)]
    assert first == [c.tokens for c in generator.generate(prompts, params)]
    assert first[1] == generator.generate([prompts[1]], params)[0].tokens
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=8, ignore_eos=True)
    assert first != [c.tokens for c in generator.generate(prompts, other_seed)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 0, 0.9, 0), (1.3, 50, 1.0, 0), (1.0, 20, 0.5, 0),
                                                         (0.5, 0, 0.3, 0), (1.0, 0, 1.0, 0.05), (1.5, 40, 0.9, 0.1)])
def test_truncation_keeps_the_same_tokens_as_transformers(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 5000) * 3
    ours = filtered_probs(logits[0], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    if min_p:
        theirs = MinPLogitsWarper(min_p)(None, theirs)
    assert torch.equal(ours > 0, torch.isfinite(theirs[0]))
    torch.testing.assert_close(ours / ours.sum(), torch.softmax(theirs[0], -1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("logits,top_p,kept", [
    (torch.zeros(1000), 0.5, 500),  # uniform: the top 256 hold too little, so the cut is found by bisection
    (torch.cat([torch.zeros(1000), torch.full((20000,), -3.0)]), 0.3, 599),  # the cut inside a run of 1,000
    (torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0, 0.0]), 0.75, 3),  # among the top 256: topk's order of equals is arbitrary
])
def test_top_p_keeps_just_enough_of_equal_probabilities(logits, top_p, kept):
    """Where top_p's cut falls inside a run of equal probabilities, the smallest prefix reaching top_p is kept, as
    transformers keeps it (equal ones by id): the bisection had kept the whole run, all of a uniform distribution."""
    ours = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p)) > 0
    assert int(torch.isfinite(TopPLogitsWarper(top_p)(None, logits[None].clone())).sum()) == kept
    expected = logits.argsort(descending=True, stable=True)[:kept]
    assert ours.nonzero()[:, 0].tolist() == sorted(expected.tolist())


@pytest.mark.parametrize("temperature,top_p", [(1e-38, 1.0), (1e-38, 0.5), (1.0, 1e-300), (1e-45, 1e-300)])
def test_a_vanishing_temperature_or_top_p_samples_the_most_likely_token(temperature, top_p):
    """The limits of sampling are greedy decoding: a temperature of 1e-38 had divided the logits into infinities
    (softmax NaN: the end of text, an empty reply), a top_p of 1e-300 (0 in float32) had kept no token."""
    torch.manual_seed(3)
    logits = torch.randn(5000) * 3
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0)
    probs = filtered_probs(logits, params)
    assert torch.isfinite(probs).all() and int(probs.argmax()) == int(logits.argmax())
    assert (probs > 0).sum() == 1
    rng = params.rng(logits.device)
    assert {sample(logits, params, rng) for _ in range(20)} == {int(logits.argmax())}


def adjust_logits(logits, params, prompt, generated):
    """The logits under `params`' bias and penalties, the context counted at once."""
    penalties = PenaltyTokens(logits.numel(), logits.device)
    penalties.update([*prompt, *generated], len(prompt))
    return penalties.adjust(logits, params)


def test_bias_and_repetition_penalty_equal_transformers_and_openai_penalties_count_the_reply():
    torch.manual_seed(1)
    logits = torch.randn(1, 300) * 4
    prompt, generated = [5, 9, 9, 17], [9, 40, 40, 40, 250]
    params = SamplingParams(repetition_penalty=1.7, logit_bias={3: -100.0, 40: 2.5})
    ours = adjust_logits(logits[0], params, prompt, generated)
    ids = torch.tensor([prompt + generated])
    theirs = SequenceBiasLogitsProcessor([[[3], -100.0], [[40], 2.5]])(ids, logits.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(ids, theirs)
    torch.testing.assert_close(ours, theirs[0])
    # OpenAI's presence and frequency penalties: on the reply's tokens only, frequency once per occurrence.
    ours = adjust_logits(logits[0], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, generated)
    expected = logits[0].clone()
    for token, count in {9: 1, 40: 3, 250: 1}.items():
        expected[token] -= 0.5 + 0.25 * count
    torch.testing.assert_close(ours, expected)
    assert torch.equal(adjust_logits(logits[0], SamplingParams(), prompt, generated), logits[0])
    # Counted token by token (as the engine counts them) or at once: the same.
    both = SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25)
    penalties = PenaltyTokens(300, "cpu")
    tokens = list(prompt)
    for token in generated:
        penalties.update(tokens, len(prompt))
        tokens.append(token)
    penalties.update(tokens, len(prompt))
    torch.testing.assert_close(penalties.adjust(logits[0], both), adjust_logits(logits[0], both, prompt, generated))


def test_argmax_picks_what_torch_argmax_picks_among_ties_infinities_and_nans():
    torch.manual_seed(0)
    rows = [torch.randn(49152), torch.randint(-3, 4, (1000,)).float(), torch.full((7,), float("-inf")),
            torch.tensor([1.0, float("nan"), 3.0, float("nan")]), torch.tensor([2.0, float("inf"), float("inf")]),
            torch.randn(300).double()]
    rows.append(torch.where(torch.rand(4096) < 0.5, torch.tensor(5.0), torch.randn(4096)))
    for row in rows:
        assert argmax(row) == int(row.argmax()), row


def test_penalised_greedy_decoding_equals_a_loop_over_the_model(generator):
    """Penalties change which token greedy decoding takes (the engine's only sampler-side state: what was
    generated), step by step as a plain loop with the same penalties would; drafts change nothing."""
    prompt = ids(generator, PROMPTS[2]) * 3  # repeated: prompt-lookup drafts find matches
    plain = generator.generate([prompt], GREEDY)[0].tokens[:12]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                            presence_penalty=1.0, frequency_penalty=0.5, logit_bias={plain[3]: -100.0, 11: 5.0})
    out = generator.generate([prompt], params)[0].tokens
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            logits = generator.model(torch.tensor([tokens]))[0, -1]
            tokens.append(int(adjust_logits(logits, params, prompt, tokens[len(prompt):]).argmax()))
    assert out == tokens[len(prompt):]
    assert out[:3] == plain[:3] and out[3] != plain[3]


def test_stop_string_ends_generation_before_it(generator):
    prompt = ids(generator, PROMPTS[1])
    free = generator.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = free.text[12:15]
    assert len(stop) == 3 and stop in free.text
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,))
    stopped = generator.generate([prompt], params)[0]
    assert stopped.text == free.text[:free.text.find(stop)]
    assert stopped.finish_reason == "stop"
    deltas = [d.text for d in generator.stream([prompt], params)]
    assert "".join(deltas) == stopped.text  # nothing of the stop string ever streamed


def test_stop_token_ends_generation_and_is_reported(generator):
    prompt = ids(generator, PROMPTS[0])
    free = generator.generate([prompt], GREEDY)[0]
    stop_id = free.tokens[4]
    first = free.tokens.index(stop_id)
    done = generator.generate([prompt], SamplingParams(max_tokens=14, temperature=0, stop_token_ids=(stop_id,),
                                                        logprobs=0))[0]
    assert done.tokens == free.tokens[:first]
    assert done.finish_reason == "stop" and done.stop_token == stop_id
    assert [lp.token for lp in done.logprobs] == done.tokens  # one per returned token, none for the stop


@pytest.mark.parametrize("seed", range(4))
def test_streamed_text_is_whole_characters_and_equals_decode(generator, seed):
    params = SamplingParams(max_tokens=25, temperature=1.5, top_p=1.0, seed=seed, ignore_eos=True)
    prompt = ids(generator, "Émoji 🦙 and 日本語")
    deltas = list(generator.stream([prompt], params))
    tokens = [t for d in deltas for t in d.tokens]
    assert "".join(d.text for d in deltas) == generator.tokenizer.decode(tokens)
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_logprobs_are_the_models_log_softmax(generator):
    prompt = ids(generator, PROMPTS[2])
    done = generator.generate([prompt], SamplingParams(max_tokens=6, temperature=0.9, seed=3, logprobs=3,
                                                        ignore_eos=True))[0]
    with torch.inference_mode():
        logits = generator.model(torch.tensor([prompt + done.tokens]))[0]
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    for step, lp in enumerate(done.logprobs):
        assert lp.token == done.tokens[step]
        assert lp.logprob == pytest.approx(float(expected[step, lp.token]), abs=1e-4)
        assert list(lp.top) == expected[step].topk(3).indices.tolist()


@pytest.mark.parametrize("field, value, words", [
    ("temperature", float("nan"), "temperature must be at least 0, got nan"),  # had sampled an empty reply
    ("temperature", float("inf"), "temperature must be at least 0, got inf"),  # had sampled at random
    ("logprobs", -1, "logprobs must be at least 0, got -1"),  # had failed inside torch.topk
    ("prompt_logprobs", -2, "prompt_logprobs must be at least 0"),
    ("presence_penalty", float("-inf"), "presence_penalty must be"),
])
def test_sampling_values_out_of_range_are_refused_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**{field: value})


def test_more_alternatives_than_the_vocabulary_gives_them_all(generator):
    prompt = ids(generator, PROMPTS[2])
    done = generator.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=CONFIG.vocab_size + 5,
                                                        prompt_logprobs=CONFIG.vocab_size + 5))[0]
    assert len(done.logprobs[0].top) == CONFIG.vocab_size
    assert all(len(lp.top) == CONFIG.vocab_size for lp in done.prompt_logprobs)


def test_max_tokens_is_capped_by_the_context_and_long_prompts_are_refused(generator):
    prompt = list(range(1000, 1090))
    done = generator.generate([prompt], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(done.tokens) == CONFIG.max_seq_len - 90 and done.finish_reason == "length"
    with pytest.raises(ContextLengthError, match="96"):
        generator.generate([list(range(1000, 1100))], GREEDY)


def test_none_is_the_context_end_for_max_tokens_and_the_default_elsewhere(generator):
    """As vLLM's max_tokens=None and OpenAI's null: they had been accepted, then failed inside the engine."""
    prompt = list(range(1000, 1090))
    done = generator.generate([prompt], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(done.tokens) == CONFIG.max_seq_len - 90 and done.finish_reason == "length"
    nulls = SamplingParams(temperature=None, top_p=None, top_k=None, min_p=None, presence_penalty=None,
                           frequency_penalty=None, repetition_penalty=None)
    assert nulls == SamplingParams()
    assert generator.generate([prompt], dataclasses.replace(nulls, max_tokens=4, seed=3))[0].tokens == \
        generator.generate([prompt], SamplingParams(max_tokens=4, seed=3))[0].tokens


@pytest.mark.parametrize("prompt", [[5, CONFIG.vocab_size], [-1, 5]], ids=["past the vocabulary", "negative"])
def test_token_ids_outside_the_vocabulary_are_refused_with_a_reason(generator, prompt):
    with pytest.raises(ValueError, match=f"outside the model's vocabulary \\(0..{CONFIG.vocab_size - 1}\\)"):
        generator.generate([[1, 2], prompt], GREEDY)
    assert generator.generate([[1, 2]], GREEDY)[0].tokens  # nothing was left queued


@pytest.fixture(scope="module")
def grammars(generator):
    from herd.generate.structured import JsonGrammars

    return JsonGrammars(generator.tokenizer, CONFIG.vocab_size)


def test_a_grammar_ends_its_reply_even_under_ignore_eos(generator, grammars):
    """A grammar ends its document with a stop token; going on past it had made xgrammar's matcher raise mid-step.
    The reply now ends there, "stop", with the stop token kept as ignore_eos asks."""
    import json

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    done = generator.generate([[1, 2]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                              constraints=[grammars.constraint(schema)])[0]
    assert done.finish_reason == "stop" and done.tokens[-1] in generator.tokenizer.stop_ids
    assert json.loads(generator.tokenizer.decode(done.tokens[:-1]))["a"] in range(10)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_grammar_that_allows_no_next_token_is_told_as_such(generator, grammars, temperature):
    """A grammar can allow no token at all: xgrammar takes a pattern with a tab in it, which a JSON string holds only
    escaped, and every token is masked once the string begins. Sampled, that had been reported as NaN logits from
    damaged weights (a 500 telling the client to verify the checkpoint); greedy, token 0 had been written."""
    import json

    from herd.generate.structured import JsonConstraint

    compiled = grammars._compiler.compile_json_schema(json.dumps({"type": "string", "pattern": "^a\tb$"}),
                                                      any_whitespace=False)
    constraint = JsonConstraint(compiled, compiled.tokenizer_info.vocab_size, grammars._text_tokens)
    with pytest.raises(RuntimeError, match="^the output grammar allows no next token: "):
        generator.generate([[1, 2]], SamplingParams(max_tokens=8, temperature=temperature, seed=0),
                           constraints=[constraint])


def test_a_long_context_takes_the_memory_given_and_says_so():
    """A 128K context is held only as far as the KV cache's memory goes (one such context of Llama 3.1 8B is 17 GB),
    but always at least 8,192 tokens; a longer prompt is refused with what holds it back."""
    from herd.generate import EngineConfig

    config = CONFIG.replace(max_seq_len=131072)
    model = Transformer(config).eval()
    per_token = 2 * config.n_layers * config.kv_heads * config.head_dim * 2  # keys and values, float16 or float32
    engine = Generator(model, herd.load_tokenizer(), config=EngineConfig(kv_cache_bytes=40_000 * per_token))
    # what the memory of 40,000 tokens' float16 keys and values holds (20,000 in float32), less a block to grow into
    assert engine.capacity in (40_000 - 16, 20_000 - 16)
    small = Generator(model, herd.load_tokenizer(), config=EngineConfig(kv_cache_bytes=1 << 20))
    assert small.capacity == 8192  # the guaranteed context, whatever the memory
    with pytest.raises(ContextLengthError, match="This model's maximum context length is 131072 tokens, but the KV "
                                                 "cache holds 8192 and the prompt has 9000: shorten the prompt, or "
                                                 "give the cache more memory"):
        small.generate([[5] * 9000], GREEDY)
    assert len(small.generate([[5] * 8000], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))[0]
               .tokens) == 192  # up to what the cache holds


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_a_model_that_computes_nan_is_an_error_not_an_empty_reply(temperature):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    with torch.no_grad():
        model.output.weight[7] = float("nan")  # damaged weights: one token's logit is NaN
    engine = Generator(model, herd.load_tokenizer())
    params = SamplingParams(max_tokens=4, temperature=temperature, seed=0, ignore_eos=True)
    # argmax took the NaN for the largest logit, and sampling's softmax spread it to every token: token 0 or 7,
    # whatever they are, often the end of text, and an empty reply with finish_reason "stop".
    with pytest.raises(RuntimeError, match="the model computed NaN logits"):
        engine.generate([[1, 2, 3]], params)
    healthy = Generator(Transformer(CONFIG).eval(), herd.load_tokenizer())
    assert len(healthy.generate([[1, 2, 3]], params)[0].tokens) == 4


def test_log_probabilities_end_where_a_stop_string_cuts_the_text(generator):
    """The tokens whose text a stop string takes leave with it: their log-probabilities had stayed (vLLM keeps them
    too), so a client rebuilding the text from them, or from completions' text offsets, got more than the text."""
    prompt = ids(generator, PROMPTS[1])
    plain = generator.generate([prompt], SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, logprobs=0))[0]
    pieces = [generator.tokenizer.decode([t]) for t in plain.tokens]
    starts = [len("".join(pieces[:i])) for i in range(len(pieces))]
    k = next(i for i in range(2, len(pieces)) if pieces[i].strip() and plain.text.find(pieces[i]) == starts[i])
    for stop in (pieces[k], pieces[k - 1][-1:] + pieces[k]):  # within one token, and across two
        params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, logprobs=0, stop=(stop,))
        cut = generator.generate([prompt], params)[0]
        assert cut.text == plain.text[:plain.text.find(stop)]
        kept = [t for t, start in zip(plain.tokens, starts) if start < len(cut.text)]
        assert [lp.token for lp in cut.logprobs] == kept
        streamed = [lp.token for delta in generator.stream([prompt], params) for lp in delta.logprobs]
        assert streamed == kept


@pytest.mark.parametrize(("fields", "error", "words"), [
    ({"logit_bias": {5: float("nan")}}, ValueError, "logit_bias of token 5 must be a finite number"),  # "NaN logits"
    ({"logit_bias": {"5": 1.0}}, TypeError, "logit_bias must map token ids (integers) to numbers"),  # '<=' str, int
    ({"logit_bias": [5, 6]}, TypeError, "logit_bias must map token ids to numbers"),  # cannot unpack an int
    ({"stop": None}, TypeError, "stop must be a string or a list of strings"),  # 'NoneType' is not iterable
    ({"stop": [1]}, TypeError, "stop must be a string or a list of strings"),  # object of type 'int' has no len()
    ({"stop": ["a", None]}, TypeError, "stop must be a string or a list of strings"),  # was "must not be empty"
    ({"stop_token_ids": [-1]}, TypeError, "stop_token_ids must be token ids"),
    ({"ignore_eos": "no"}, TypeError, "ignore_eos must be True or False"),  # "no" had meant True
])
def test_malformed_sampling_parameters_are_named(fields, error, words):
    with pytest.raises(error, match=re.escape(words)):
        SamplingParams(**fields)
    assert SamplingParams(logit_bias={5: 1}, stop="x").logit_bias == ((5, 1),)  # a mapping and one string still do


def _time_out(signum, frame):
    raise TimeoutError("the caller's alarm")


@pytest.mark.parametrize("stop, handler, error", [
    (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),  # Ctrl-C
    (signal.SIGALRM, _time_out, TimeoutError),  # a caller's own time limit, as batch jobs and test harnesses set
])
def test_a_signal_during_a_step_the_caller_drives_lands_after_it(generator, monkeypatch, stop, handler, error):
    """A step driven by the main thread advances every thread's sequences; a signal whose handler raises inside it
    (here, just after a worker's seeded draw) had left that draw made and its token unrecorded, so the worker's
    seeded reply changed. The exception now comes after the step: the main thread's call ends, the worker's reply
    is as alone."""
    import threading

    import herd.generate.generator as engine

    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    worker_prompt = ids(generator, PROMPTS[1])
    alone = generator.generate([worker_prompt], seeded)[0].tokens
    draw, fired = engine.sample, []

    def sample(logits, params, rng):
        token = draw(logits, params, rng)
        if threading.current_thread() is threading.main_thread() and params.seed == 7 and not fired:
            fired.append(True)
            signal.raise_signal(stop)  # handled at the next bytecode the main thread runs
        return token

    monkeypatch.setattr(engine, "sample", sample)
    interrupted = []
    # Python's own Ctrl-C handler, whatever an earlier test (a server's) left installed
    previous = signal.signal(stop, handler)
    try:
        for _ in range(50):
            result = {}
            worker = threading.Thread(target=lambda: result.update(w=generator.generate([worker_prompt], seeded)))
            worker.start()
            try:
                generator.generate([ids(generator, PROMPTS[0])], dataclasses.replace(GREEDY, max_tokens=64))
            except error:
                interrupted.append(True)
            worker.join(60)
            if fired:
                break
    finally:
        signal.signal(stop, previous)
    assert fired and interrupted and result["w"][0].tokens == alone


def test_a_stop_string_is_found_however_the_pieces_split_it():
    """Only a reply's last stretch is searched for stop strings now; against a search of the whole text, over
    random pieces and stop strings of 1-6 letters that span several steps."""
    from herd.generate.sequence import Sequence

    rng = random.Random(0)
    for _ in range(300):
        stops = tuple({"".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))})
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(40)]
        seq = Sequence([1], SamplingParams(max_tokens=100, stop=stops), index=0, max_tokens=100,
                       stop_ids=frozenset([0]), block_size=16, sink=None)
        text, out = "", ""
        for piece in pieces:
            text += piece
            delta = seq.step(5, piece.encode(), None)
            out += delta.text
            if delta.finish_reason:
                break
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert (delta.finish_reason == "stop") == bool(hits)
        if hits:
            assert out == text[:min(hits)]


def test_a_sampling_profilers_signal_is_not_held_to_the_steps_end():
    """A profiler's SIGPROF held to the end of each step would never sample inside one."""
    from herd.generate.generator import _interrupts_after

    seen = []
    previous = signal.signal(signal.SIGPROF, lambda signum, frame: seen.append(signum))
    try:
        with _interrupts_after():
            signal.raise_signal(signal.SIGPROF)
            inside = list(seen)
    finally:
        signal.signal(signal.SIGPROF, previous)
    assert inside == [signal.SIGPROF]
