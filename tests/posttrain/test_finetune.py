"""Recipes run by the shared Trainer, end to end on a tiny checkpoint: train, export, reload, resume; averaging."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

import herd
from herd.checkpoint import CheckpointError, convert, save_checkpoint
from herd.posttrain import finetune as finetune_module
from herd.posttrain.average import average_checkpoints
from herd.posttrain.data import DialogEncoder, encode_preferences, preference_batch
from herd.posttrain.dpo import reference_logps
from herd.posttrain.finetune import (build_recipe, cached_reference_logps, finetune, load_finetune_config,
                                     load_reward_model)
from herd.posttrain.lora import LoRAConfig, apply_lora
from herd.train.config import ConfigError
from posttrain_helpers import PAIRS, SFT, tiny_model, write_jsonl



@pytest.mark.heavy
def test_lora_sft_learns_exports_and_resumes(base, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT)
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
    # The adapters beside it, in PEFT's layout: on the base converted to Hugging Face's format, the tuned logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    convert(base, tmp_path / "base-hf", "hf")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32),
                                     tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, tuned.model(ids), atol=1e-4)
    # The same command again finds the run finished and resumes there: no step is trained twice.
    assert finetune(load_finetune_config(None, args))["step"] == 8
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(metrics)


def test_reward_model_exports_its_head(base, tmp_path):
    data = write_jsonl(tmp_path / "pref.jsonl", PAIRS)
    args = ["--finetune.recipe=rm", f"--finetune.model={base}", f"--finetune.data={data}", "--run.progress=false",
            f"--run.dir={tmp_path / 'rm'}", "--training.batch_size=4", "--training.lr=1e-3", "--checkpoint.interval=2"]
    finetune(load_finetune_config(None, [*args, "--training.steps=4"]))
    model, _ = load_reward_model(tmp_path / "rm" / "model")
    assert model.head.weight.abs().sum() > 0
    # Resumable: the body's unused vocabulary projection has no optimizer state to miss.
    assert finetune(load_finetune_config(None, [*args, "--training.steps=6"]))["step"] == 6


def test_finetune_says_how_it_went_and_herd_report_draws_its_run(base, tmp_path, monkeypatch):
    """`herd finetune` had ended with its JSON summary alone; `herd report` of its run.dir had failed ("unknown section
    dpo": it read config.toml as `herd train`'s), and labelled a DPO loss nats/token where it is per example."""
    import matplotlib.axes
    import typer
    from typer.testing import CliRunner

    from herd.posttrain.cli import finetune_cmd
    from herd.train.cli import CONTEXT, report_cmd

    def invoke(command, args, **settings):
        app = typer.Typer()
        app.command(**settings)(command)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return result

    data, run = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "run"
    done = invoke(finetune_cmd, ["--finetune.recipe=dpo", f"--finetune.model={base}", f"--finetune.data={data}",
                                 f"--finetune.eval_data={data}", f"--run.dir={run}", "--run.progress=false",
                                 "--training.steps=2", "--training.batch_size=4", "--training.seq_len=64"],
                  context_settings=CONTEXT)
    summary = json.loads(done.stdout)  # what scripts read stays as it was
    assert summary["step"] == 2
    per = "per preference example"
    assert re.fullmatch(rf"trained 2 steps, {summary['tokens']:,} tokens, loss \d\.\d{{4}} {per}, held-out loss "
                        rf"{summary['eval_loss']:.4f} {per}, in \d+\.\d s; model in {run / 'model'}",
                        done.stderr.splitlines()[-1]), done.stderr
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, label, *a, **k: labels.append(label))
    report = invoke(report_cmd, [str(run)])
    assert f"held-out {summary['eval_loss']:.3f}" in report.stdout and "unigram" not in report.stdout
    assert (run / "report.png").is_file() and labels[0] == f"loss ({per})"


def test_bad_configs_fail_in_one_line(base, tmp_path):
    with pytest.raises(ConfigError, match="finetune.recipe 'ppo2' is not one of"):
        load_finetune_config(None, ["--finetune.recipe=ppo2", "--finetune.data=x"])
    with pytest.raises(ConfigError, match="unknown field"):
        load_finetune_config(None, ["--lora.rnk=4"])
    data = write_jsonl(tmp_path / "sft.jsonl", SFT)
    with pytest.raises(ValueError, match="LoRA rank 4096 does not fit"):
        finetune(load_finetune_config(None, [f"--finetune.model={base}", f"--finetune.data={data}",
                                             "--lora.rank=4096", f"--run.dir={tmp_path / 'r'}"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_dpo_starts_at_log_2(base, tmp_path, dtype):
    """The reference is the policy's own quantized base with its adapters off (as PPO's, and TRL's with PEFT), not
    the float checkpoint it was quantized from, in the precision the policy trains in (bf16, a GPU's default, had
    computed the reference in float32): at step 0 policy and reference agree and the loss is log 2."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = load_finetune_config(None, ["--finetune.recipe=dpo", f"--finetune.model={base}", f"--finetune.data={data}",
                                         f"--run.dir={tmp_path / 'run'}", "--lora.rank=4", "--lora.quantize=int4",
                                         "--dpo.nll_weight=0", "--training.batch_size=12", f"--training.dtype={dtype}"])
    recipe = build_recipe(config)
    recipe.model.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss, n = recipe.loss_fn(recipe.model, next(recipe.batches)[0])
    assert float(loss / n) == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_reference_cache_is_read_only_for_what_it_was_computed_from(chatml_format, tmp_path, monkeypatch):
    """run.dir's reference log-probs are those of these rows, this masking and this reference model: other rows of
    the same number, the other masking, other weights or a quantized base compute them again."""
    encoder = DialogEncoder(chatml_format)
    first, second = (encode_preferences([("0", {"prompt": [{"role": "user", "content": q}], "chosen": c,
                                                "rejected": r})], encoder, 128)
                     for q, c, r in (("2+2?", "4", "five"), ("Capital of France?", "Paris.", "Lyon, I think")))
    vocab = chatml_format.tokenizer.vocab_size
    model, other = tiny_model(vocab), tiny_model(vocab, seed=1)
    quantized = apply_lora(tiny_model(vocab), LoRAConfig(rank=4, quantize="int8"))
    path = tmp_path / "ref_logps.train.pt"
    for reference, examples, mask in ((model, first, True), (model, second, True), (model, second, False),
                                      (other, second, False), (quantized, second, False)):
        expected = reference_logps(reference, preference_batch(examples, mask_formatting=mask))
        assert torch.allclose(cached_reference_logps(reference, examples, mask, 0, path)[0], expected)
    # The same again (a resumed run) reads them.
    monkeypatch.setattr(finetune_module, "reference_logps", lambda *args: pytest.fail("computed again"))
    assert torch.equal(cached_reference_logps(quantized, second, False, 0, path)[0], expected)


def test_dpo_and_ppo_refuse_lora_dropout(tmp_path):
    """Their losses compare log-probs of separate forward passes (policy and reference, now and at sampling time),
    which dropout makes random; TRL turns dropout off there too."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for recipe in ("dpo", "ppo"):
        with pytest.raises(ConfigError, match=f"lora.dropout: the {recipe} recipe compares log-probs"):
            load_finetune_config(None, [f"--finetune.recipe={recipe}", f"--finetune.data={data}", "--lora.rank=4",
                                        "--lora.dropout=0.1", "--ppo.verifier=answer"])
    load_finetune_config(None, [f"--finetune.data={data}", "--lora.rank=4", "--lora.dropout=0.1"])  # sft takes it


def test_full_tuning_that_cannot_fit_is_refused_before_a_step(base, tmp_path, monkeypatch):
    """The model loads (its weights fit), but full tuning's gradients and AdamW moments would not: the system would
    kill the run midway without a word. LoRA's few parameters fit."""
    import herd.quant.load

    data = write_jsonl(tmp_path / "sft.jsonl", SFT)
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
    """The base is a Meta directory, the other an HF one: the same architecture written two ways averages."""
    other = tiny_model(chatml_format.tokenizer.vocab_size, seed=5)
    save_checkpoint((other.config, other.state_dict(), chatml_format.tokenizer), tmp_path / "other", "hf")
    out = average_checkpoints([base, tmp_path / "other"], tmp_path / "avg", weights=[3, 1])
    first, second, mean = (herd.load(p, quantize=None).model.state_dict() for p in (base, tmp_path / "other", out))
    for name in ("layers.0.attention.wq.weight", "tok_embeddings.weight"):
        assert torch.allclose(mean[name], 0.75 * first[name] + 0.25 * second[name], atol=1e-6)
    for weights in ([float("nan"), 1], [float("inf"), 1], [1, -1], [2]):
        with pytest.raises(ValueError, match="one positive weight per checkpoint"):
            average_checkpoints([base, tmp_path / "other"], tmp_path / "bad", weights=weights)
    assert not (tmp_path / "bad").exists()


def test_reward_models_average_with_their_heads(base, tmp_path, chatml_format):
    """Llama 3 averaged reward models too: the head had been left out (a body no reward model loads)."""
    from safetensors.torch import load_file, save_file

    from herd.posttrain.finetune import REWARD_HEAD

    heads = []
    for i, seed in enumerate((1, 2)):
        model = tiny_model(chatml_format.tokenizer.vocab_size, seed=seed)
        save_checkpoint((model.config, model.state_dict(), chatml_format.tokenizer), tmp_path / f"rm{i}", "meta")
        heads.append(torch.randn(1, model.config.dim, generator=torch.Generator().manual_seed(seed)))
        save_file({"weight": heads[-1]}, str(tmp_path / f"rm{i}" / REWARD_HEAD))
    out = average_checkpoints([tmp_path / "rm0", tmp_path / "rm1"], tmp_path / "avg", weights=[1, 3])
    assert torch.allclose(load_file(str(out / REWARD_HEAD))["weight"], 0.25 * heads[0] + 0.75 * heads[1])
    model, _ = load_reward_model(out)
    assert torch.equal(model.head.weight.data, load_file(str(out / REWARD_HEAD))["weight"])
    with pytest.raises(CheckpointError, match=f"no {REWARD_HEAD}, where another checkpoint is a reward model"):
        average_checkpoints([tmp_path / "rm0", base], tmp_path / "mixed")
