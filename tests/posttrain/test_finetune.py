"""Recipes run by the shared Trainer, end to end on a tiny checkpoint: train, export, reload, resume; averaging."""
from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.checkpoint import save_checkpoint
from herd.posttrain.average import average_checkpoints
from herd.posttrain.finetune import finetune, load_finetune_config, load_reward_model
from herd.train.config import ConfigError
from posttrain_helpers import tiny_model

SFT = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
       for a in range(4) for b in range(3)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.heavy
def test_lora_sft_learns_exports_and_resumes(base, tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", SFT)
    args = [f"--finetune.model={base}", f"--finetune.data={data}", f"--finetune.eval_data={data}",
            f"--run.dir={tmp_path / 'run'}", "--run.progress=false", "--lora.rank=8", "--training.lr=3e-3",
            "--training.steps=8", "--training.batch_size=2", "--training.seq_len=128", "--training.warmup_steps=1"]
    before = herd.load(base, quantize=None)
    summary = finetune(load_finetune_config(None, args))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 8 and metrics[-1]["loss"] < metrics[0]["loss"]
    tuned = herd.load(tmp_path / "run" / "model", quantize=None)
    ids = torch.tensor([before.chat_format.encode_dialog(SFT[0]["messages"][:1])])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids), before.model(ids), atol=1e-3)
    # The same command again finds the run finished and resumes there: no step is trained twice.
    assert finetune(load_finetune_config(None, args))["step"] == 8
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(metrics)


def test_reward_model_exports_its_head(base, tmp_path):
    rows = [{"prompt": r["messages"][:1], "chosen": r["messages"][1], "rejected": "no idea"} for r in SFT]
    data = _jsonl(tmp_path / "pref.jsonl", rows)
    args = ["--finetune.recipe=rm", f"--finetune.model={base}", f"--finetune.data={data}", "--run.progress=false",
            f"--run.dir={tmp_path / 'rm'}", "--training.batch_size=4", "--training.lr=1e-3", "--checkpoint.interval=2"]
    finetune(load_finetune_config(None, [*args, "--training.steps=4"]))
    model, _ = load_reward_model(tmp_path / "rm" / "model")
    assert model.head.weight.abs().sum() > 0
    # Resumable: the body's unused vocabulary projection has no optimizer state to miss.
    assert finetune(load_finetune_config(None, [*args, "--training.steps=6"]))["step"] == 6


def test_bad_configs_fail_in_one_line(base, tmp_path):
    with pytest.raises(ConfigError, match="finetune.recipe 'ppo2' is not one of"):
        load_finetune_config(None, ["--finetune.recipe=ppo2", "--finetune.data=x"])
    with pytest.raises(ConfigError, match="unknown field"):
        load_finetune_config(None, ["--lora.rnk=4"])
    data = _jsonl(tmp_path / "sft.jsonl", SFT)
    with pytest.raises(ValueError, match="LoRA rank 4096 does not fit"):
        finetune(load_finetune_config(None, [f"--finetune.model={base}", f"--finetune.data={data}",
                                             "--lora.rank=4096", f"--run.dir={tmp_path / 'r'}"]))


def test_full_tuning_that_cannot_fit_is_refused_before_a_step(base, tmp_path, monkeypatch):
    """The model loads (its weights fit), but full tuning's gradients and AdamW moments would not: the system would
    kill the run midway without a word. LoRA's few parameters fit."""
    import herd.quant.load

    data = _jsonl(tmp_path / "sft.jsonl", SFT)
    model = herd.load(base, quantize=None).model
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(herd.quant.load, "available_memory", lambda: 8 * n)  # twice the weights, 2/3 of the rest
    args = [f"--finetune.model={base}", f"--finetune.data={data}", f"--run.dir={tmp_path / 'r'}",
            "--run.progress=false", "--training.steps=1", "--training.batch_size=2", "--training.seq_len=64"]
    with pytest.raises(ConfigError, match=rf"finetune: {n / 1e9:.2f}B trained parameters need {12 * n / 2**30:.1f} "
                                          r"GiB more memory .* tune with LoRA"):
        finetune(load_finetune_config(None, args))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    assert finetune(load_finetune_config(None, [*args, "--lora.rank=4"]))["step"] == 1


def test_average_of_checkpoints(base, tmp_path, chatml_format):
    other = tiny_model(chatml_format.tokenizer.vocab_size, seed=5)
    save_checkpoint((other.config, other.state_dict(), chatml_format.tokenizer), tmp_path / "other", "meta")
    out = average_checkpoints([base, tmp_path / "other"], tmp_path / "avg", weights=[3, 1])
    first, second, mean = (herd.load(p, quantize=None).model.state_dict() for p in (base, tmp_path / "other", out))
    for name in ("layers.0.attention.wq.weight", "tok_embeddings.weight"):
        assert torch.allclose(mean[name], 0.75 * first[name] + 0.25 * second[name], atol=1e-6)
