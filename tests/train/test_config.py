"""The config loader: TOML + --section.field overrides typed by the dataclasses, one-line errors, round trip."""
import dataclasses
from dataclasses import dataclass, field

import pytest

from herd.train.config import ConfigError, TrainConfig, TrainingSection, load_config, to_toml


def test_overrides_are_typed_from_the_annotations(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[training]\nsteps = 10\nlr = 1e-3\n[model]\nname = "llama3.2-1b"\n')
    config = load_config(TrainConfig, path, ["--training.lr", "2e-4", "--parallel.tp=2", "--run.tensorboard", "true",
                                             "--training.batch_size_schedule", "[[0, 8], [100, 16]]",
                                             "--model.n_kv_heads", "none", "--training.micro_batch_size", "2"])
    assert config.training.steps == 10 and config.training.lr == 2e-4
    assert config.parallel.tp == 2 and config.run.tensorboard is True
    assert config.training.batch_size_schedule == [[0, 8], [100, 16]]
    assert config.model.name == "llama3.2-1b" and config.model.n_kv_heads is None
    assert config.training.micro_batch_size == 2
    # A text field takes the text as typed (read as TOML, "2024-01-01" had been a date and "1e3" the float 1000.0);
    # a flag takes 1 and 0 as the converter means it to
    for text in ("2024-01-01", "1e3", "0x10", "true"):
        assert load_config(TrainConfig, None, ["--run.dir", text]).run.dir == text
    assert load_config(TrainConfig, None, ["--run.progress", "0"]).run.progress is False


@pytest.mark.parametrize("args, words", [
    (["--training.bogus", "3"], ["unknown field training.bogus", "batch_size"]),
    (["--nosuch.field", "3"], ["unknown section nosuch"]),
    (["--training.steps", "ten"], ["training.steps", "expected int"]),
    (["--training.lr", "true"], ["training.lr", "expected float"]),
    (["--training.steps"], ["missing value"]),
])
def test_bad_overrides_are_one_line_errors(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, args)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_print_config_round_trips(tmp_path):
    config = load_config(TrainConfig, None, ["--training.seq_len_schedule", "[[0, 2048], [500, 8192]]",
                                             "--data.shards", 'dir with "quotes"', "--model.dim", "512"])
    text = to_toml(config)
    for section in ("[model]", "[data]", "[training]", "[checkpoint]", "[parallel]", "[run]", "[fault]"):
        assert section in text
    assert "# n_kv_heads" in text  # unset optionals are listed, commented out
    (tmp_path / "c.toml").write_text(text)
    assert load_config(TrainConfig, tmp_path / "c.toml") == config


def test_set_fields_override_a_named_model_and_the_rest_is_the_names(tmp_path):
    from herd.model.config import CONFIGS
    from herd.train.pretrain import build_model_config

    config = load_config(TrainConfig, None, ["--model.name", "llama3.2-1b", "--model.n_layers", "2", "--model.dim",
                                             "128", "--model.max_seq_len", "4096", "--model.rope_theta", "1e6"])
    built = build_model_config(config.model, 49152)
    named = CONFIGS["llama3.2-1b"]
    assert built == named.replace(n_layers=2, dim=128, max_seq_len=4096, rope_theta=1e6, vocab_size=49152)
    assert built.rope_scaling == named.rope_scaling and built.n_heads == named.n_heads == 32 and built.tie_embeddings
    # Written back (--print-config, run.dir/config.toml), the fields not set stay the name's.
    (tmp_path / "c.toml").write_text(to_toml(config))
    assert "# n_heads =  (llama3.2-1b's)" in to_toml(config)
    assert build_model_config(load_config(TrainConfig, tmp_path / "c.toml").model, 49152) == built
    # --print-config's file with only the name filled in (every field at its default) is the named model.
    printed = to_toml(load_config(TrainConfig, None, [])).replace("# name =  (unset)", 'name = "llama3.2-1b"')
    (tmp_path / "printed.toml").write_text(printed)
    assert build_model_config(load_config(TrainConfig, tmp_path / "printed.toml").model, None) == named
    with pytest.raises(ConfigError, match="n_heads 4 is not a multiple of n_kv_heads 8 .the fields not set are "):
        build_model_config(load_config(TrainConfig, None, ["--model.name", "llama3.2-1b", "--model.n_heads", "4"])
                           .model, None)


def test_other_recipes_load_their_own_config_dataclasses():
    @dataclass
    class DPOSection:
        beta: float = 0.1
        reference: str = ""

    @dataclass
    class DPOConfig:
        training: TrainingSection = field(default_factory=TrainingSection)
        dpo: DPOSection = field(default_factory=DPOSection)

    config = load_config(DPOConfig, None, ["--dpo.beta", "0.5", "--training.steps", "3"])
    assert config.dpo.beta == 0.5 and config.training.steps == 3
    with pytest.raises(ConfigError, match="unknown section model"):
        load_config(DPOConfig, None, ["--model.dim", "3"])


def test_a_recipes_own_section_defaults_stay_when_one_field_is_set(tmp_path):
    """Fine-tuning and scaling give [training] and [checkpoint] defaults of their own; setting one field had rebuilt
    the section from the pretraining defaults (the README's DPO example, steps = 200, had trained at lr 3e-4)."""
    from herd.posttrain.finetune import FinetuneConfig
    from herd.train.scaling import ScalingConfig

    (tmp_path / "dpo.toml").write_text("[training]\nsteps = 200\n")
    for config, base in ((load_config(FinetuneConfig, tmp_path / "dpo.toml", []), FinetuneConfig()),
                         (load_config(FinetuneConfig, None, ["--training.steps", "200"]), FinetuneConfig())):
        assert config.training == dataclasses.replace(base.training, steps=200)
    scaling = load_config(ScalingConfig, None, ["--training.seq_len", "64", "--checkpoint.keep", "2"])
    assert scaling.training == dataclasses.replace(ScalingConfig().training, seq_len=64)
    assert scaling.checkpoint == dataclasses.replace(ScalingConfig().checkpoint, keep=2)


@pytest.mark.parametrize("args, words", [
    (["--model.dim", "0"], ["model: dim must be at least 1, got 0"]),
    (["--model.n_layers", "-1"], ["model: n_layers must be in [1, "]),  # had trained a model of none
    (["--model.n_layers", "100000000"], ["model: n_layers must be in [1, 10000], got 100000000"]),  # had hung
    (["--model.rope_theta", "nan"], ["rope_theta must be above 0, got nan"]),
    (["--data.held_out", "1"], ["data: held_out must be in [0, 1), got 1.0"]),
    (["--training.lr", "-1e-3"], ["training: lr must be at least 0"]),
    (["--training.beta2", "1"], ["beta2 must be in [0, 1)"]),
    (["--training.min_lr_ratio", "inf"], ["min_lr_ratio must be in [0, 1], got inf"]),
    (["--training.seq_len_schedule", "[[0, 0]]"], ["seq_len_schedule: [0, 0] is not [from_step, value]"]),
    (["--training.dtype", "fp16"], ["dtype 'fp16': use auto, float32 or bfloat16"]),
    (["--checkpoint.keep", "0"], ["checkpoint: keep must be at least 1"]),
    (["--parallel.dp", "0"], ["dp must be at least 1, or -1"]),
    (["--parallel.pp_schedule", "zigzag"], ["pp_schedule 'zigzag'; use one of 1F1B"]),
    (["--run.log_interval", "0"], ["run: log_interval must be at least 1"]),
    (["--fault.max_bad_steps", "0"], ["fault: max_bad_steps must be at least 1"]),
])
def test_values_out_of_range_are_one_line_errors_naming_the_field(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, args)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("args, words", [
    (["--lora.dropout", "1.5"], ["lora: dropout must be in [0, 1)"]),
    (["--lora.quantize", "int3"], ["unknown LoRA base quantization 'int3'"]),
    (["--dpo.beta", "0"], ["dpo: beta must be above 0"]),
    (["--ppo.gamma", "2"], ["ppo: gamma must be in [0, 1]"]),
    (["--kd.temperature", "0"], ["kd: temperature must be above 0"]),
    (["--finetune.epochs", "-1"], ["finetune: epochs must be at least 0"]),
    # Checked by pretraining's check() alone before: a fine-tuning run met a bad format only when it exported.
    (["--checkpoint.export_format", "onnx"], ["checkpoint: export_format 'onnx'; use meta or hf"]),
    (["--fault.nonfinite", "ignore"], ["fault: nonfinite 'ignore'; use skip or rollback"]),
])
def test_post_training_values_out_of_range_are_one_line_errors(args, words):
    from herd.posttrain.finetune import FinetuneConfig

    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, args)
    for word in words:
        assert word in str(e.value)


def test_a_config_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[training]\n")  # had been "'utf-8' codec can't decode byte 0xff", no file named
    with pytest.raises(ConfigError, match=f"^{bad}: not UTF-8 text \\(invalid start byte at byte 0\\), as TOML"):
        load_config(TrainConfig, bad)
