"""`herd finetune` with recipe = "ppo": rollouts through the engine, scored by a verifier, trained by the shared
Trainer; the score rises, an interrupted run resumes at its iteration, bad input fails in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import herd
import posttrain_helpers
from herd.rows import DataError
from herd.posttrain.finetune import finetune, load_finetune_config
from herd.posttrain.rejection import reward_scorer
from herd.train.config import ConfigError

PROMPTS = [{"messages": [{"role": "user", "content": f"Say something about {w}."}], "answer": i}
           for i, w in enumerate(["cats", "dogs", "rain", "tea", "maps", "ink", "salt", "wind"])]
ITERATIONS, PROMPTS_PER_ITERATION, SAMPLES = 6, 4, 16


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(base, data, run_dir, *extra):
    # One-character replies, 64 an iteration: the verifier's expectation moves well beyond sampling noise
    # (a standard deviation of 0.06) in a few iterations.
    return ["--finetune.recipe=ppo", f"--finetune.model={base}", f"--finetune.data={data}", f"--run.dir={run_dir}",
            "--run.progress=false", "--ppo.verifier=posttrain_helpers:starts_even", f"--ppo.iterations={ITERATIONS}",
            f"--ppo.prompts={PROMPTS_PER_ITERATION}", f"--ppo.samples={SAMPLES}", "--ppo.max_tokens=1",
            "--ppo.epochs=2", "--ppo.minibatches=2", "--ppo.kl_coef=0.01", "--training.lr=3e-2",
            "--training.warmup_steps=0", "--training.min_lr_ratio=1.0", "--training.micro_batch_size=16",
            "--checkpoint.interval=1",
            "--checkpoint.keep=2", *extra]


def _rewarded_mass(llm) -> float:
    """The exact probability that a reply to the first prompt starts with an even code point."""
    even = torch.tensor([posttrain_helpers.starts_even({}, llm.tokenizer.decode([i])) == 1.0 for i in range(256)])
    ids = torch.tensor([llm.chat_format.encode_dialog(PROMPTS[0]["messages"])])
    with torch.no_grad():
        probs = torch.softmax(llm.model(ids)[0, -1], -1)
    return float(probs[:256][even].sum())


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    """An uninterrupted LoRA run: the policy and the value model (from the policy's base) get adapters (on the
    output projection too: the task is about which token comes first)."""
    tmp = tmp_path_factory.mktemp("ppo")
    data = _jsonl(tmp / "prompts.jsonl", PROMPTS)
    args = _args(base, data, tmp / "run", "--lora.rank=4", "--lora.alpha=8",
                 '--lora.targets=["w2", "output"]')
    summary = finetune(load_finetune_config(None, args))
    return tmp / "run", data, args, summary


def test_ppo_raises_the_verifier_score_and_exports(full_run, base):
    run_dir, _, _, summary = full_run
    metrics = _metrics(run_dir)
    assert [m["iteration"] for m in metrics] == list(range(ITERATIONS))
    assert summary["step"] == ITERATIONS * 2 * 2 and metrics[-1]["step"] == summary["step"]
    for m in metrics:
        assert {"score", "kl", "policy_loss", "value_loss", "tokens_per_s", "sample_tokens_per_s"} <= m.keys()
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)       # iteration 0 samples from the reference itself
    first, last = metrics[0]["score"], sum(m["score"] for m in metrics[-2:]) / 2
    assert last > first + 0.4, [m["score"] for m in metrics]
    assert metrics[-1]["kl"] > 0
    # The exported policy (LoRA merged) puts more probability on the rewarded first characters than the base.
    tuned, before = herd.load(run_dir / "model", quantize=None), herd.load(base, quantize=None)
    assert _rewarded_mass(tuned) > _rewarded_mass(before) + 0.4


def test_an_interrupted_run_resumes_at_its_iteration(full_run, base, tmp_path, monkeypatch):
    full_dir, data, args, _ = full_run
    args = [a if not a.startswith("--run.dir=") else f"--run.dir={tmp_path / 'run'}" for a in args]
    calls, verifier = [], posttrain_helpers.starts_even

    def interrupted(row, reply):     # the scorer is called once per rollout: stop in iteration 3's scoring
        calls.append(1)
        if len(calls) > 3 * PROMPTS_PER_ITERATION * SAMPLES:
            raise KeyboardInterrupt
        return verifier(row, reply)

    monkeypatch.setattr(posttrain_helpers, "starts_even", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_finetune_config(None, args))
    assert [m["iteration"] for m in _metrics(tmp_path / "run")] == [0, 1, 2]
    monkeypatch.undo()
    finetune(load_finetune_config(None, args))     # the same command again
    resumed, full = _metrics(tmp_path / "run"), _metrics(full_dir)
    assert [m["iteration"] for m in resumed] == list(range(ITERATIONS))
    keys = ("step", "score", "kl", "policy_loss", "value_loss", "loss")
    assert [m[k] for m in resumed for k in keys] == pytest.approx([m[k] for m in full for k in keys], rel=1e-5)


def test_bad_ppo_input_fails_in_one_line(base, tmp_path):
    data = _jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    common = ["--finetune.recipe=ppo", f"--finetune.model={base}", f"--finetune.data={data}",
              f"--run.dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="exactly one reward source"):
        load_finetune_config(None, common)
    with pytest.raises(ConfigError, match="exactly one reward source"):
        load_finetune_config(None, [*common, "--ppo.verifier=answer", f"--ppo.reward_model={base}"])
    with pytest.raises(ConfigError, match="ppo.verifier: unknown verifier 'nonsense'"):
        load_finetune_config(None, [*common, "--ppo.verifier=nonsense"])
    with pytest.raises(ConfigError, match="has no reward_head.safetensors"):
        load_finetune_config(None, [*common, f"--ppo.reward_model={base}"])
    with pytest.raises(ConfigError, match="ppo: minibatches .* exceeds"):
        load_finetune_config(None, [*common, "--ppo.verifier=answer", "--ppo.prompts=1", "--ppo.samples=2",
                                    "--ppo.minibatches=3"])
    rows = [*PROMPTS[:2], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl:3: the prompt must end with a user turn \(it ends with 'assist"):
        finetune(load_finetune_config(None, [*common, "--ppo.verifier=answer", f"--finetune.data={bad}"]))
    _jsonl(tmp_path / "noanswer.jsonl", [PROMPTS[0], {"messages": PROMPTS[1]["messages"]}])
    with pytest.raises(DataError, match=r'noanswer.jsonl:2: no "answer" field'):
        finetune(load_finetune_config(None, [*common, "--ppo.verifier=answer",
                                             f"--finetune.data={tmp_path / 'noanswer.jsonl'}"]))
    _jsonl(tmp_path / "badanswer.jsonl", [PROMPTS[0], {**PROMPTS[1], "answer": "twelve"}])
    with pytest.raises(DataError, match=r'badanswer.jsonl:2: "answer" must be one number .*not \'twelve\''):
        finetune(load_finetune_config(None, [*common, "--ppo.verifier=answer",
                                             f"--finetune.data={tmp_path / 'badanswer.jsonl'}"]))
    # Through the command line: one line on stderr, a non-zero exit, nothing trained.
    done = subprocess.run([sys.executable, "-m", "herd.cli", "finetune", *common, "--ppo.verifier=nonsense"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ppo.verifier: unknown verifier 'nonsense'" in done.stderr
    assert not (tmp_path / "run" / "model").exists()


def test_ppo_against_a_reward_model(base, tmp_path):
    """The reward source is a `recipe = "rm"` run (taught a preference between one-character replies): it scores
    the rollouts, the value model starts from it, and the policy (fully fine-tuned: the reference is a frozen copy)
    moves towards what it prefers."""
    letters = [chr(c) for c in range(33, 127)]
    pairs = [{"prompt": PROMPTS[i % len(PROMPTS)]["messages"], "chosen": even, "rejected": odd}
             for i, (odd, even) in enumerate(zip(letters[::2], letters[1::2]))]
    rm_data = _jsonl(tmp_path / "pairs.jsonl", pairs)
    finetune(load_finetune_config(None, [
        "--finetune.recipe=rm", f"--finetune.model={base}", f"--finetune.data={rm_data}", "--run.progress=false",
        f"--run.dir={tmp_path / 'rm'}", "--training.steps=30", "--training.batch_size=16", "--training.lr=1e-2",
        "--training.warmup_steps=0"]))
    data = _jsonl(tmp_path / "prompts.jsonl", [{"messages": r["messages"]} for r in PROMPTS])
    args = [a for a in _args(base, data, tmp_path / "run") if not a.startswith("--ppo.verifier")]
    finetune(load_finetune_config(None, [*args, f"--ppo.reward_model={tmp_path / 'rm' / 'model'}",
                                         "--training.lr=3e-3"]))
    metrics = _metrics(tmp_path / "run")
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["kl"] > 0   # the frozen copy
    assert sum(m["score"] for m in metrics[-2:]) / 2 > metrics[0]["score"] + 0.5, [m["score"] for m in metrics]
    # Exactly, without sampling noise: the reward model's expected score of a one-character reply (over the
    # printable ones, whose text is unambiguous) under the tuned policy against the base.
    score = reward_scorer(tmp_path / "rm" / "model")
    tuned, before = herd.load(tmp_path / "run" / "model", quantize=None), herd.load(base, quantize=None)
    ids = [i for i in range(256) if before.tokenizer.decode([i]).isprintable()]
    scores = torch.tensor(score([PROMPTS[0]] * len(ids), [before.tokenizer.decode([i]) for i in ids]))

    def expected_score(llm) -> float:
        prompt = torch.tensor([llm.chat_format.encode_dialog(PROMPTS[0]["messages"])])
        with torch.no_grad():
            probs = torch.softmax(llm.model(prompt)[0, -1], -1)[ids]
        return float((probs * scores).sum() / probs.sum())

    assert expected_score(tuned) > expected_score(before) + 0.5


def test_a_checkpoint_inside_an_iteration_keeps_its_rollouts(base, tmp_path):
    """Stopped between two optimizer steps of one iteration (run.time_limit_s, a rollback), the batch source's state
    carries that iteration's rollouts: the resumed run trains on them rather than sampling new ones."""
    from herd.posttrain.finetune import build_recipe

    data = _jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    config = load_finetune_config(None, _args(base, data, tmp_path / "run"))
    torch.manual_seed(0)
    first = build_recipe(config).batches
    next(first)
    state = first.state_dict()
    expected = next(first)
    torch.manual_seed(1)     # a resumed process: the rollouts must come from the state, not from sampling
    second = build_recipe(config).batches
    second.load_state_dict(state)
    assert (second.iteration, second.step) == (0, 1)
    got = next(second)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollout_targets_are_computed_in_the_precision_the_policy_trains_in(base, tmp_path, monkeypatch):
    """Under bf16 (a GPU's default) the old log-probs and values had been float32: before any update the policy
    ratio was not 1 (0.92-1.17 on the default model, most of the clip range)."""
    import herd.posttrain.ppo as ppo

    ratios = []
    losses = ppo.ppo_token_losses

    def first_step(logps, old_logps, *rest):
        if not ratios:
            ratios.append(torch.exp(logps - old_logps)[old_logps != 0].float())
        return losses(logps, old_logps, *rest)

    monkeypatch.setattr(ppo, "ppo_token_losses", first_step)
    data = _jsonl(tmp_path / "prompts.jsonl", PROMPTS[:4])
    finetune(load_finetune_config(None, _args(base, data, tmp_path / "run", "--ppo.iterations=1", "--ppo.samples=4",
                                              "--ppo.max_tokens=8", "--ppo.epochs=1", "--ppo.minibatches=1",
                                              "--training.dtype=bfloat16", "--training.micro_batch_size=4")))
    assert len(ratios[0]) > 16 and torch.equal(ratios[0], torch.ones_like(ratios[0]))
