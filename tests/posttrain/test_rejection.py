"""Rejection sampling through the generation engine, verifiers, and `herd sample` on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from herd.llm import LLM
from herd.posttrain import rejection
from herd.posttrain.verify import answer, load_verifier, only_answer, python_tests
from posttrain_helpers import tiny_model


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
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert python_tests({"tests": tests}, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert python_tests({"tests": tests}, "def add(a, b):\n    return a - b") == 0.0
    assert python_tests({"tests": tests}, "def add(a, b):\n    while True: pass", timeout_s=1) == 0.0
    assert python_tests({"tests": tests}, "x = bytearray(10**9)\ndef add(a, b): return a + b", memory_mb=256) == 0.0
    assert load_verifier("answer") is answer and load_verifier("json:loads") is json.loads
    with pytest.raises(ValueError, match="unknown verifier"):
        load_verifier("nonsense")


@pytest.mark.parametrize("option", ["--out", "--pairs"])
def test_sample_refuses_an_unwritable_output_before_sampling(tmp_path, monkeypatch, option):
    import typer
    from typer.testing import CliRunner

    import herd.cli
    from herd.posttrain.cli import sample_cmd

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}], "answer": 1}\n')
    monkeypatch.setattr(herd.cli, "_load", lambda *args: pytest.fail("the model loaded before the refusal"))
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
    monkeypatch.setattr(herd.cli, "_load", lambda *args: pytest.fail("the model loaded before the refusal"))
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
def test_a_round_tunes_on_its_best_samples_then_dpo_on_pairs_from_the_chosen_policy(base, tmp_path, pairs_from):
    from herd.posttrain.rounds import run_rounds

    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}]} for w in ("a", "b", "c", "d")]
    stages = []
    config = rejection.SampleConfig(k=4, max_tokens=6, batch_size=16, temperature=1.0, top_p=1.0, seed=0)
    tiny = ["--training.steps=2", "--training.batch_size=2", "--training.seq_len=64", "--run.progress=false"]
    final = run_rounds(str(base), rows, rejection.verifier_scorer(lambda row, text: len(text.encode())), tmp_path,
                       sample=config, sample_quantize=None, sft_overrides=tiny, dpo_overrides=tiny,
                       pairs_from=pairs_from, on_stage=lambda stage, model: stages.append((stage, model)))
    here = tmp_path / "round-1"
    assert [s for s, _ in stages] == ["round 1: SFT", "round 1: DPO"] and final == stages[-1][1]
    source = here / ("dpo-samples.jsonl" if pairs_from == "sft" else "samples.jsonl")
    assert (here / "dpo-samples.jsonl").exists() == (pairs_from == "sft")
    sampled = {json.loads(line)["messages"][0]["content"]: json.loads(line) for line in source.read_text().splitlines()}
    pairs = [json.loads(line) for line in (here / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for pair in pairs:  # each pair is the best and the worst reply of that policy's own samples
        row = sampled[pair["prompt"][0]["content"]]
        by_score = sorted(zip(row["scores"], row["replies"]))
        assert pair["chosen"]["content"] in row["replies"] and pair["rejected"]["content"] in row["replies"]
        assert len(pair["chosen"]["content"].encode()) == by_score[-1][0]
        assert len(pair["rejected"]["content"].encode()) == by_score[0][0]
    with pytest.raises(ValueError, match="pairs_from"):
        run_rounds(str(base), rows, rejection.verifier_scorer(len), tmp_path, pairs_from="other")


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
