"""A fine-tuning run started again: it resumes from a checkpoint written along the way, with the settings that define
it unchanged; one that changes them is refused in one line, and settings only `herd train` applies are refused."""
from __future__ import annotations

import shutil

import pytest

from herd.checkpoint import save_checkpoint
from herd.posttrain.finetune import finetune, load_finetune_config
from herd.train.config import ConfigError
from herd.train.loop import Trainer
from posttrain_helpers import PAIRS, SFT, tiny_model, write_jsonl



def _args(base, data, run, *more):
    return [f"--finetune.model={base}", f"--finetune.data={data}", f"--run.dir={run}", "--run.progress=false",
            "--lora.rank=4", "--training.lr=3e-3", "--training.steps=2", "--training.batch_size=2",
            "--training.seq_len=64", "--training.warmup_steps=1", "--checkpoint.interval=1", *more]


@pytest.fixture(scope="module")
def sft_run(base, tmp_path_factory):
    """A finished two-step LoRA SFT run and the data it was trained on."""
    where = tmp_path_factory.mktemp("sft")
    data = write_jsonl(where / "sft.jsonl", SFT)
    finetune(load_finetune_config(None, _args(base, data, where / "run")))
    return where / "run", data


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, chatml_format):
    """Another checkpoint of `base`'s shape: its checkpoint loads into it without an error."""
    path = tmp_path_factory.mktemp("other") / "model"
    model = tiny_model(chatml_format.tokenizer.vocab_size, seed=1)
    save_checkpoint((model.config, model.state_dict(), chatml_format.tokenizer), path, "meta")
    return path


def _refused(args, run, *expected):
    before = (run / "config.toml").read_text()
    with pytest.raises(ConfigError) as e:
        finetune(load_finetune_config(None, args))
    message = str(e.value)
    assert "\n" not in message and "is a checkpoint of another run" in message and "new run.dir" in message
    for words in expected:
        assert words in message, message
    assert (run / "config.toml").read_text() == before  # the refused config is not recorded as the run's


@pytest.mark.parametrize("change, expected", [
    (["--training.seed=1"], "training.seed: 0 then, 1 now"),
    (["--finetune.pack=false"], "finetune.pack: True then, False now"),
    (["--training.batch_size=4"], "training.batch_size: 2 then, 4 now"),
    (["--training.seq_len=128"], "training.seq_len: 64 then, 128 now"),
    (["--lora.alpha=32"], "lora.alpha: 16.0 then, 32.0 now"),
    (["--lora.rank=8"], "lora.rank: 4 then, 8 now"),
    (["--finetune.recipe=dpo"], "finetune.recipe: 'sft' then, 'dpo' now"),
], ids=["seed", "pack", "batch_size", "seq_len", "lora_alpha", "lora_rank", "recipe"])
def test_a_resume_that_changes_the_run_is_refused(sft_run, base, tmp_path, change, expected):
    run, data = sft_run
    shutil.copytree(run, tmp_path / "run")
    _refused(_args(base, data, tmp_path / "run", "--training.steps=3", *change), tmp_path / "run", expected)


def test_a_resume_on_other_data_or_another_base_of_the_same_shape_is_refused(sft_run, base, other_base, tmp_path):
    """Another base had been overwritten by the checkpoint's without a word, while config.toml and the PEFT adapter
    named the new one."""
    run, data = sft_run
    shutil.copytree(run, tmp_path / "run")
    other_data = write_jsonl(tmp_path / "other.jsonl", SFT[::-1])
    _refused(_args(base, other_data, tmp_path / "run", "--training.steps=3"), tmp_path / "run",
             "finetune.data: 'sha256 ")
    _refused(_args(other_base, data, tmp_path / "run", "--training.steps=3"), tmp_path / "run",
             f"finetune.model: '{base}' then, '{other_base}' now")


def test_a_resume_with_settings_that_may_change_goes_on(sft_run, base, tmp_path, capsys):
    """More steps, another learning rate, micro-batches, logging and checkpoint settings; the data file moved."""
    run, data = sft_run
    shutil.copytree(run, tmp_path / "run")
    moved = shutil.copy(data, tmp_path / "moved.jsonl")
    args = _args(base, moved, tmp_path / "run", "--training.steps=3", "--training.lr=1e-3",
                 "--training.micro_batch_size=1", "--checkpoint.keep=2", "--run.log_interval=2")
    assert finetune(load_finetune_config(None, args))["step"] == 3
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step-2'} (step 2)" in capsys.readouterr().err
    assert 'steps = 3' in (tmp_path / "run" / "config.toml").read_text()


def test_a_resumed_dpo_run_keeps_its_beta(base, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = _args(base, data, tmp_path / "run", "--finetune.recipe=dpo", "--training.steps=1")
    finetune(load_finetune_config(None, args))
    _refused([*args, "--dpo.beta=0.5"], tmp_path / "run", "dpo.beta: 0.1 then, 0.5 now")


def _killed_at(monkeypatch, step):
    train_step = Trainer.train_step

    def killed(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt
        return train_step(trainer)
    monkeypatch.setattr(Trainer, "train_step", killed)


def test_the_default_config_checkpoints_along_the_way(base, tmp_path, monkeypatch, capsys):
    """It had saved only at the end: a run killed before it started again from step 0, though "run again to resume"."""
    data = write_jsonl(tmp_path / "sft.jsonl", SFT)
    args = [f"--finetune.model={base}", f"--finetune.data={data}", f"--run.dir={tmp_path / 'run'}",
            "--run.progress=false", "--lora.rank=4", "--training.steps=52", "--training.batch_size=1",
            "--training.seq_len=64"]
    _killed_at(monkeypatch, 51)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_finetune_config(None, args))
    monkeypatch.undo()
    capsys.readouterr()
    assert finetune(load_finetune_config(None, args))["step"] == 52
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step-50'} (step 50)" in capsys.readouterr().err


def test_a_run_with_metrics_but_no_checkpoint_says_it_starts_from_step_0(base, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT)
    args = _args(base, data, tmp_path / "run", "--checkpoint.interval=0", "--training.steps=3")
    _killed_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_finetune_config(None, args))
    monkeypatch.undo()
    capsys.readouterr()
    finetune(load_finetune_config(None, args))
    assert "holds steps of an earlier run but there is no checkpoint to resume from: training starts from step 0" \
        in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["training.batch_size_schedule=[[0, 2], [4, 4]]",
                                     "training.seq_len_schedule=[[0, 64]]", "training.compile=true",
                                     "training.activation_checkpointing=true", "checkpoint.average_last=2"])
def test_settings_only_pretraining_applies_are_refused(setting):
    """Fine-tuning had accepted them and trained weights bit-identical to a run without them."""
    name = setting.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{name}: only `herd train` applies this; remove it from the fine-tuning"):
        load_finetune_config(None, ["--finetune.data=x.jsonl", f"--{setting}"])
