"""Rejection sampling through the generation engine, verifiers, and `herd sample` on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.llm import LLM
from herd.posttrain import rejection
from herd.posttrain.verify import answer, load_verifier, only_answer, python_tests
from herd.tools.sandbox import sandbox_problem
from posttrain_helpers import tiny_model

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox here: {sandbox_problem()}")


def test_k_samples_per_prompt_in_batches_best_kept(llama3_format):
    llm = LLM(tiny_model().eval(), llama3_format.tokenizer, llama3_format)
    batches = []
    generate = llm.generator.generate
    llm.generator.generate = lambda prompts, params, n: (batches.append(len(prompts) * n)
                                                         or generate(prompts, params, n=n))
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}]} for w in ("a", "b", "c")]
    config = rejection.SampleConfig(k=4, max_tokens=6, batch_size=8, temperature=1.0, top_p=1.0)
    samples = rejection.generate_samples(llm, rows, config)
    assert batches == [8, 4] and all(len(s.replies) == 4 for s in samples)
    assert len({r for s in samples for r in s.replies}) > 3   # K different samples, not one repeated
    rejection.score(samples, rejection.verifier_scorer(lambda row, text: len(text)))
    best = rejection.best_rows(samples)
    for s, row in zip(samples, best):
        assert row["messages"][:-1] == s.row["messages"] and row["score"] == max(len(r) for r in s.replies)
        assert row["messages"][-1] == {"role": "assistant", "content": max(s.replies, key=len)}
    for pair in rejection.preference_rows(samples):
        assert len(pair["chosen"]["content"]) > len(pair["rejected"]["content"])
    assert rejection.best_rows(samples, min_score=10**6) == []


def test_a_prompts_samples_depend_on_the_seed_and_the_prompt_alone(chatml_format):
    """Not on the other prompts, their order or the batch size: a prompt file reordered, split or batched otherwise
    gives each prompt the same K replies; a repeated prompt gets replies of its own, another seed others."""
    llm = LLM(tiny_model(chatml_format.tokenizer.vocab_size).eval(), chatml_format.tokenizer, chatml_format)
    rows = [{"messages": [{"role": "user", "content": w}]} for w in ("alpha", "beta", "gamma", "alpha")]
    config = dict(k=3, max_tokens=4, temperature=1.0, top_p=1.0)

    def replies(rows, **options):
        return [s.replies for s in rejection.generate_samples(llm, rows, rejection.SampleConfig(**config, **options))]

    first = replies(rows, batch_size=32)
    # Reversed, the repeats of "alpha" trade places: the first one met is repeat 0.
    assert replies(rows[::-1], batch_size=32)[::-1] == [first[3], first[1], first[2], first[0]]
    assert replies(rows, batch_size=3) == first and replies(rows[1:2]) == first[1:2]
    assert first[0] != first[3] and replies(rows, seed=1) != first


def test_output_is_written_whole_or_not_at_all(tmp_path):
    def rows():
        yield {"messages": []}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rejection.write_jsonl(rows(), tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []
    assert rejection.write_jsonl([{"a": 1}, {"b": 2}], tmp_path / "out.jsonl") == 2
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_verifiers():
    assert answer({"answer": 12}, "5 + 7 = 12 apples.") == 1.0
    assert answer({"answer": 12}, "It is 12, no wait, 13") == 0.0 and answer({"answer": 1}, "none") == 0.0
    # only_answer: a reply that says more numbers than the answer is wrong, even ending in the right one
    assert only_answer({"answer": 599}, "The answer is 599.") == 1.0 and only_answer({"answer": 1200}, "1,200") == 1.0
    assert only_answer({"answer": 599}, "257 is a larger number than 599") == 0.0
    assert only_answer({"answer": 599}, "none") == 0.0 and load_verifier("only_answer") is only_answer
    assert load_verifier("answer") is answer and load_verifier("json:loads") is json.loads
    with pytest.raises(ValueError, match="unknown verifier"):
        load_verifier("nonsense")


def test_numbers_are_read_as_written():
    from herd.posttrain.verify import expected_answer, numbers

    assert numbers("3,4 and 1,000,000 but 1,0000") == [3, 4, 1_000_000, 1, 0]   # thousands: groups of three only
    assert numbers(".5 or 1/2, not 1/0; 2-5 is a range, x = -3 and (-1/4)") == [0.5, 0.5, 1, 0, 2, 5, -3, -0.25]
    assert numbers("The answer is 1/2.") == [0.5] and numbers("It costs $12.") == [12]
    assert answer({"answer": 0.5}, "So it is .5") == 1.0 and answer({"answer": 5}, "Between 2-5, it is 5") == 1.0
    assert only_answer({"answer": 34}, "The numbers 3,4") == 0.0
    assert [expected_answer(a) for a in ("1,000", "1/2", "$5", -2, "-2.5")] == [1000, 0.5, 5, -2, -2.5]
    assert answer({"answer": "1,000"}, "It is 1000.") == 1.0 and answer({"answer": "1/2"}, "0.5") == 1.0
    assert numbers("1e5, 2.5E-3, -1e+2 and 3e") == [100_000, 0.0025, -100, 3]
    assert numbers("3eggs, 2e3rd, 1e5x") == [3, 2, 3, 1, 5]   # no exponent where a letter follows
    # typeset maths writes U+2212 for minus: "−7" had been 7, right for the answer 7 and wrong for -7
    assert numbers("x = \u22127 and (\u22121/2)") == [-7, -0.5] and answer({"answer": -7}, "It is \u22127.") == 1.0
    assert expected_answer("1e5") == 100_000 and answer({"answer": 1000}, "It is 1e3") == 1.0
    assert only_answer({"answer": 0.001}, "1E-3") == 1.0
    for bad in ("\\frac{1}{2}", "twelve", "1e999", True, None, float("nan")):
        with pytest.raises(ValueError, match='"answer" must be one number'):
            expected_answer(bad)


@needs_sandbox
def test_python_tests_passes_only_code_whose_tests_ran_to_the_end():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert python_tests({"tests": tests}, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert python_tests({"tests": tests}, "def add(a, b):\n    return a - b") == 0.0
    assert python_tests({"tests": tests}, "def add(a, b):\n    while True: pass", timeout_s=1) == 0.0
    assert python_tests({"tests": tests}, "x = bytearray(10**9)\ndef add(a, b): return a + b", memory_mb=256) == 0.0
    row = {"tests": tests}
    wrong = "def add(a, b):\n    return a - b\n"
    for exits_early in ("import sys\n" + wrong + "sys.exit(0)", "import os\n" + wrong + "os._exit(0)",
                        "import atexit, os\natexit.register(lambda: os._exit(0))\n" + wrong):
        assert python_tests(row, f"```python\n{exits_early}\n```") == 0.0, exits_early


@needs_sandbox
def test_python_tests_passes_right_code_whatever_it_prints_or_wherever_it_goes():
    row = {"tests": "assert add(2, 3) == 5"}
    right = "def add(a, b):\n    return a + b\n"
    for busy in ("for i in range(20000): print(i)", "import sys\nsys.stderr.write('x' * 10**6)",
                 "import os\nos.chdir('/tmp')", "def open(*args): raise OSError('mine')",
                 "for i in range(300): open(f'file{i}', 'w').write('x')"):
        assert python_tests(row, f"{right}{busy}\n") == 1.0, busy


@needs_sandbox
def test_python_tests_finds_the_code_in_any_python_fence():
    row = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    right = "def add(a, b):\n    return a + b\n"
    for fence in ("```python3\n", "```Python\n", "```python \n", "```py\n", "```\n"):
        assert python_tests(row, f"Here:\n{fence}{right}```\nDone.") == 1.0, fence
    assert python_tests(row, "```python\r\n" + right.replace("\n", "\r\n") + "```") == 1.0
    assert python_tests(row, right + "print('no newline at the end', end='')") == 1.0
    bash_first = f"Install:\n```bash\npip install x\n```\nThen:\n```python\n{right}```"
    assert python_tests(row, bash_first) == 1.0


def test_the_code_is_the_first_python_block_else_the_first_untagged_one():
    from herd.posttrain.verify import reply_code

    code = "def f(): ...\n"
    assert reply_code(f"Install:\n```bash\npip install x\n```\nThen:\n```python\n{code}```") == code
    for fence in ("```python", "```PY", "```Python3 ", "``` py3", "```python title=f.py"):
        assert reply_code(f"```js\nx()\n```\n```\nuntagged\n```\n{fence}\r\n{code}```\r\n") == code, fence
    assert reply_code(f"```sh\nls\n```\n```\n{code}```\n```\nsecond\n```") == code
    # a fence only where a line starts: "```" in prose opens nothing
    assert reply_code(f"Use ``` fences:\n```python\n{code}```") == code
    for no_python in ("```bash\npip install x\n```", "no fence at all", "``` not a fence"):
        assert reply_code(no_python) == no_python


@needs_sandbox
def test_python_tests_runs_the_code_in_the_sandbox(tmp_path):
    row = {"tests": "assert add(2, 3) == 5"}
    target = tmp_path / "escaped.txt"
    assert python_tests(row, f"open({str(target)!r}, 'w').write('x')\ndef add(a, b): return a + b") == 0.0
    assert not target.exists()


@needs_sandbox
def test_python_tests_kills_the_codes_whole_process_tree_at_the_timeout():
    row = {"tests": "assert add(2, 3) == 5"}
    sleeper = "sleep 61.987"   # short: a tree the verifier failed to kill ends on its own
    forks = f"import subprocess\nsubprocess.Popen({sleeper.split()!r}, start_new_session=True)\nwhile True: pass"
    assert python_tests(row, forks, timeout_s=1) == 0.0
    running = [e.name for e in Path("/proc").iterdir() if e.name.isdigit() and _cmdline(e) == sleeper]
    assert running == []


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_python_tests_refuses_to_run_code_without_a_sandbox(monkeypatch, tmp_path):
    import herd.tools.sandbox

    monkeypatch.setattr(herd.tools.sandbox, "sandbox_problem", lambda: "bubblewrap (bwrap) is not installed")
    marker = tmp_path / "ran"
    for call in (lambda: load_verifier("python_tests"),
                 lambda: python_tests({"tests": ""}, f"open({str(marker)!r}, 'w').write('x')")):
        with pytest.raises(ValueError, match="runs code only in a sandbox.*bwrap"):
            call()
    assert not marker.exists()


def test_finish_reasons_are_kept_and_a_reply_cut_off_is_never_kept_or_chosen(chatml_format):
    llm = LLM(tiny_model(chatml_format.tokenizer.vocab_size).eval(), chatml_format.tokenizer, chatml_format)
    done = []
    generate = llm.generator.generate
    llm.generator.generate = lambda prompts, params, n: done.extend(out := generate(prompts, params, n=n)) or out
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    samples = rejection.generate_samples(llm, rows, rejection.SampleConfig(k=6, max_tokens=2, temperature=1.0))
    s = samples[0]
    assert s.finish_reasons == [c.finish_reason for c in done] and {"stop", "length"} <= set(s.finish_reasons)
    rejection.score(samples, lambda rows, replies: [len(t) for t in replies])   # the longest: one cut off
    stopped = [r for r, why in zip(s.replies, s.finish_reasons) if why == "stop"]
    assert [r["messages"][-1]["content"] for r in rejection.best_rows(samples)] == [max(stopped, key=len)]
    assert all(p["chosen"]["content"] in stopped for p in rejection.preference_rows(samples, 3))
    s = rejection.Sampled(rows[0], ["right, cut", "short", "wrong"], [1.0, 0.5, 0.2], ["length", "stop", "stop"])
    assert [r["messages"][-1]["content"] for r in rejection.best_rows([s])] == ["short"]
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in rejection.preference_rows([s], 2)] == [
        ("short", "wrong")]
    s = rejection.Sampled(rows[0], ["cut", "done"], [0.0, 1.0], ["length", "stop"])   # a cut reply may be rejected
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in rejection.preference_rows([s])] == [
        ("done", "cut")]


def test_a_reply_its_verifier_scores_0_is_never_kept_or_chosen():
    rows = [{"messages": [{"role": "user", "content": "What is 6 times 7?"}], "answer": 42}]

    def sampled(replies):
        return [rejection.Sampled(rows[0], replies)]

    failed = sampled(["41", "40"])
    rejection.score(failed, rejection.verifier_scorer(answer))
    assert failed[0].scores == [0.0, 0.0]
    assert rejection.best_rows(failed) == [] and rejection.preference_rows(failed) == []
    mixed = sampled(["40", "42"])
    rejection.score(mixed, rejection.verifier_scorer(answer))
    assert [r["messages"][-1]["content"] for r in rejection.best_rows(mixed)] == ["42"]
    # A reward model's scores are no verdict: its best is kept whatever it scores, unless under min_score.
    rewarded = sampled(["41", "40"])
    rejection.score(rewarded, lambda rows, replies: [0.0, -1.0])
    assert [r["messages"][-1]["content"] for r in rejection.best_rows(rewarded)] == ["41"]
    assert rejection.best_rows(rewarded, min_score=0.5) == [] and len(rejection.preference_rows(rewarded)) == 1
    # A NaN (a scorer that failed on a reply) ranks nowhere: it had been kept as the best, and paired with itself.
    unscored = sampled(["x", "y", "z"])
    rejection.score(unscored, lambda rows, replies: [float("nan"), 1.0, 0.0])
    assert [r["messages"][-1]["content"] for r in rejection.best_rows(unscored)] == ["y"]
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in rejection.preference_rows(unscored)] == [
        ("y", "z")]


def test_tools_the_replies_were_sampled_with_stay_with_the_rows(llama3_format):
    from herd.posttrain.data import DialogEncoder, encode_preferences, encode_sft

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools}
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    s = rejection.Sampled(row, [call, "I don't know."], [1.0, 0.0])
    best, pair = rejection.best_rows([s]), rejection.preference_rows([s])
    assert best[0]["tools"] == tools and pair[0]["tools"] == tools
    encoder = DialogEncoder(llama3_format)
    sampled_from = encoder.prompt(row["messages"], tools)
    sft = encode_sft([("sft", best[0])], encoder, 4096)[0]
    assert sft.ids[:sft.target.index(True)] == sampled_from
    assert encode_preferences([("pairs", pair[0])], encoder, 4096)[0].prompt == sampled_from
    assert "tools" not in rejection.best_rows([rejection.Sampled({"messages": row["messages"]}, ["a"], [1.0])])[0]


def test_a_sampled_tool_call_is_kept_as_the_call_the_model_wrote(llama3_format):
    """A reply `<|python_tag|>code<|eom_id|>` had been kept as the text "<|python_tag|>code", which SFT learnt as
    plain text ended by <|eot_id|>: taught, the model would stop making built-in calls."""
    from herd.generate.sequence import Completion
    from herd.posttrain.data import DialogEncoder, encode_preferences, encode_sft

    tok = llama3_format.tokenizer
    llm = LLM(tiny_model().eval(), tok, llama3_format)
    tag, eom, eot = (tok.special_tokens[t] for t in ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>"))
    call, answer = [tag, *tok.encode("print(6 * 7)", bos=False)], tok.encode("It is 42.", bos=False)
    llm.generator.generate = lambda prompts, params, n: [
        Completion(prompts[0], ids, tok.decode(ids), "stop", end) for ids, end in ((call, eom), (answer, eot))]
    row = {"messages": [{"role": "system", "content": "Environment: ipython"},
                        {"role": "user", "content": "What is 6 * 7?"}]}
    [sampled] = rejection.generate_samples(llm, [row], rejection.SampleConfig(k=2))
    rejection.score([sampled], rejection.verifier_scorer(lambda r, text: 2.0 if "python" in text else 1.0))
    encoder = DialogEncoder(llama3_format)
    sft = encode_sft([("best", rejection.best_rows([sampled])[0])], encoder, 4096)[0]
    assert [t for t, learnt in zip(sft.ids, sft.target) if learnt] == call + [eom]
    [pair] = encode_preferences([("pair", rejection.preference_rows([sampled])[0])], encoder, 4096)
    assert pair.replies == [call + [eom], answer + [eot]]


def test_a_reward_model_scores_a_tool_call_as_the_model_wrote_it(llama3_format, tmp_path):
    """The reward model had read a call's text as a plain reply ("<|python_tag|>" spelled out, <|eot_id|>)."""
    from safetensors.torch import save_file

    from herd.checkpoint import save_checkpoint
    from herd.generate.sequence import Completion
    from herd.posttrain.finetune import REWARD_HEAD
    from herd.posttrain.data import DialogEncoder

    tok = llama3_format.tokenizer
    model = tiny_model()
    save_checkpoint((model.config, model.state_dict(), tok), tmp_path / "rm", "meta")
    save_file({"weight": torch.randn(1, model.config.dim, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "rm" / REWARD_HEAD))
    scorer = rejection.reward_scorer(tmp_path / "rm")
    llm = LLM(tiny_model().eval(), tok, llama3_format)
    tag, eom = tok.special_tokens["<|python_tag|>"], tok.special_tokens["<|eom_id|>"]
    call = [tag, *tok.encode("print(6 * 7)", bos=False)]
    llm.generator.generate = lambda prompts, params, n: [Completion(prompts[0], call, tok.decode(call), "stop", eom)]
    row = {"messages": [{"role": "system", "content": "Environment: ipython"}, {"role": "user", "content": "6 * 7?"}]}
    samples = rejection.generate_samples(llm, [row], rejection.SampleConfig(k=1))
    rejection.score(samples, scorer)
    prompt = DialogEncoder(llama3_format).prompt(row["messages"])
    written = torch.tensor([prompt + call + [eom]])
    with torch.no_grad():
        assert samples[0].scores[0] == pytest.approx(scorer.model(written, torch.tensor([written.shape[1]])).item())


def test_sample_refuses_a_row_whose_answer_is_no_number_before_the_model_loads(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import herd.cli
    from herd.posttrain.cli import sample_cmd

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "q"}], "answer": a}) + "\n"
                               for a in ("1,000", "1/2", "$5", "1e5", "\\frac{1}{2}")))
    monkeypatch.setattr(herd.cli, "_load", lambda *args, **kwargs: pytest.fail("the model loaded before the refusal"))
    app = typer.Typer()
    app.command()(sample_cmd)
    for verifier in ("answer", "only_answer"):
        result = CliRunner().invoke(app, ["default", str(prompts), "--verifier", verifier,
                                          "--out", str(tmp_path / "out.jsonl")])
        assert isinstance(result.exception, ValueError), result.output
        assert str(result.exception) == (f'{prompts}:5: "answer" must be one number (like 12, "1,000" or "1/2"), '
                                         "not '\\\\frac{1}{2}'")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("option", ["--out", "--pairs"])
def test_sample_refuses_an_unwritable_output_before_sampling(tmp_path, monkeypatch, option):
    import typer
    from typer.testing import CliRunner

    import herd.cli
    from herd.posttrain.cli import sample_cmd

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}], "answer": 1}\n')
    monkeypatch.setattr(herd.cli, "_load", lambda *args, **kwargs: pytest.fail("the model loaded before the refusal"))
    app = typer.Typer()
    app.command()(sample_cmd)
    monkeypatch.chdir(tmp_path)
    for out, error in (("/proc/x.jsonl", "No such file or directory"), (".", "Is a directory")):
        outputs = {"--out": out} if option == "--out" else {"--out": "best.jsonl", "--pairs": out}
        result = CliRunner().invoke(app, ["default", str(prompts), "--verifier", "answer",
                                          *[word for item in outputs.items() for word in item]])
        shown = tmp_path if out == "." else out
        assert isinstance(result.exception, OSError), result.output
        assert str(result.exception) == f"cannot write {shown}: {error}; give {option} a file you can write to"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_sample_refuses_to_write_over_its_prompts_or_bad_options_before_the_model_loads(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import herd.cli
    from herd.posttrain.cli import sample_cmd

    prompts = tmp_path / "prompts.jsonl"
    text = '{"messages": [{"role": "user", "content": "hi"}], "answer": 1}\n'
    prompts.write_text(text)
    monkeypatch.setattr(herd.cli, "_load", lambda *args, **kwargs: pytest.fail("the model loaded before the refusal"))
    app = typer.Typer()
    app.command()(sample_cmd)
    for options, words in ((["--out", str(prompts)], "--out is the prompts file"),  # had overwritten the prompts
                           (["--out", "a.jsonl", "--pairs", str(prompts)], "--pairs is the prompts file"),
                           (["--out", str(tmp_path / "a.jsonl"), "--pairs", str(tmp_path / "a.jsonl")], "one file"),
                           (["--out", "a.jsonl", "--temperature", "-1"], "temperature must be at least 0")):
        result = CliRunner().invoke(app, ["default", str(prompts), "--verifier", "answer", *options])
        assert result.exit_code != 0 and words in (result.output + str(result.exception)), result.output
    assert prompts.read_text() == text


@pytest.mark.heavy
def test_sample_refuses_a_malformed_prompt_file_in_one_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}], "answer": 1}\n{"messages": [\n')
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "herd.cli", "sample", "default", str(prompts), "--out", str(out),
                           "--verifier", "answer"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "prompts.jsonl:2: not valid JSON" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("pairs_from", ["sft", "before"])
def test_a_round_tunes_on_its_best_samples_then_dpo_on_pairs_from_the_chosen_policy(ending_base, tmp_path,
                                                                                     pairs_from):
    from herd.posttrain.rounds import run_rounds

    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}]} for w in ("a", "b", "c", "d")]
    stages = []
    config = rejection.SampleConfig(k=4, max_tokens=6, batch_size=16, temperature=1.0, top_p=1.0, seed=0)
    tiny = ["--training.steps=2", "--training.batch_size=2", "--training.seq_len=64", "--run.progress=false"]
    scorer = rejection.verifier_scorer(lambda row, text: len(text.encode()))
    final = run_rounds(str(ending_base), rows, scorer, tmp_path,
                       sample=config, sample_quantize=None, sft_overrides=tiny, dpo_overrides=tiny,
                       pairs_from=pairs_from, on_stage=lambda stage, model: stages.append((stage, model)))
    here = tmp_path / "round-1"
    assert [s for s, _ in stages] == ["round 1: SFT", "round 1: DPO"] and final == stages[-1][1]
    source = here / ("dpo-samples.jsonl" if pairs_from == "sft" else "samples.jsonl")
    assert (here / "dpo-samples.jsonl").exists() == (pairs_from == "sft")
    sampled = {json.loads(line)["messages"][0]["content"]: json.loads(line) for line in source.read_text().splitlines()}
    pairs = [json.loads(line) for line in (here / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for pair in pairs:  # each pair is the best ended, non-empty reply and the worst of that policy's own samples
        row = sampled[pair["prompt"][0]["content"]]
        keepable = [score for score, why in zip(row["scores"], row["finish_reasons"]) if why == "stop" and score > 0]
        assert pair["chosen"]["content"] in row["replies"] and pair["rejected"]["content"] in row["replies"]
        assert len(pair["chosen"]["content"].encode()) == max(keepable)
        assert len(pair["rejected"]["content"].encode()) == min(row["scores"])
    with pytest.raises(ValueError, match="pairs_from"):
        run_rounds(str(ending_base), rows, rejection.verifier_scorer(len), tmp_path, pairs_from="other")


def test_rounds_resume_a_stage_only_on_the_data_it_was_trained_on(ending_base, tmp_path):
    """Run again into the same out_dir, a stage resumes on the same data and refuses other data, before writing it
    over the data its checkpoint was trained on."""
    from herd.posttrain.rounds import run_rounds

    config = rejection.SampleConfig(k=2, max_tokens=6, batch_size=8, temperature=1.0, top_p=1.0, seed=0)
    tiny = ["--training.steps=1", "--training.batch_size=2", "--training.seq_len=64", "--run.progress=false"]
    scorer = rejection.verifier_scorer(lambda row, text: len(text.encode()) + 1)

    def run(words):
        rows = [{"messages": [{"role": "user", "content": f"Say {w}."}]} for w in words]
        return run_rounds(str(ending_base), rows, scorer, tmp_path, sample=config, sample_quantize=None,
                          pairs_from="before", sft_overrides=tiny, dpo_overrides=tiny)

    final = run("ab")
    trained_on = (tmp_path / "round-1" / "sft.jsonl").read_text()
    assert run("ab") == final
    with pytest.raises(ValueError, match=r"round-1/sft holds a sft run trained on other data .*give run_rounds a new "
                                         "out_dir"):
        run("xy")
    assert (tmp_path / "round-1" / "sft.jsonl").read_text() == trained_on


def test_several_pairs_per_prompt_rank_distinct_replies_and_never_pair_equals():
    row = {"messages": [{"role": "user", "content": "q"}]}
    s = rejection.Sampled(row, ["a", "b", "a", "c", "d", "e", "f"])
    s.scores = [1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0]
    pairs = [(p["chosen"]["content"], p["rejected"]["content"]) for p in rejection.preference_rows([s], 3)]
    # distinct replies a b c d e f; best first (a, b, f), worst first (c, e, d)
    assert pairs == [("a", "c"), ("b", "e"), ("f", "d")]
    assert rejection.preference_rows([s]) == rejection.preference_rows([s], 1) and len(rejection.preference_rows([s], 1)) == 1
    tied = rejection.Sampled(row, ["x", "y", "z"])
    tied.scores = [1.0, 1.0, 0.0]
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in rejection.preference_rows([tied], 5)] == [("x", "z")]
