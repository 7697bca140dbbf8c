"""What a killed run, a damaged disk or a changed command leaves in run.dir: resuming says what is wrong in one line
(or, where an earlier checkpoint is intact, resumes from it), never a traceback."""
from __future__ import annotations

import json
import shutil

import pytest
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from train_helpers import losses, metrics, run_cli, tiny_args, tiny_config

from herd.train import checkpoint
from herd.train.config import ConfigError, TrainingSection
from herd.train.optim import build_optimizer
from herd.train.pretrain import pretrain

SMALL = ("--model.dim", "32", "--model.n_layers", "1", "--training.seq_len", "32")


def small_run(shards, run_dir, *overrides):
    return pretrain(tiny_config(shards, run_dir, *SMALL, *overrides))


@pytest.fixture(scope="module")
def two_steps(byte_shards, tmp_path_factory):
    """A finished run of 2 steps whose only checkpoint is step-2."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    small_run(byte_shards, run_dir, "--training.steps", "2", "--checkpoint.interval", "0")
    return run_dir


def _empty(path):
    path.write_bytes(b"")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("name, damage", [
    (".metadata", _truncate), ("__0_0.distcp", _truncate), ("__0_0.distcp", _empty),
    ("__0_0.distcp", lambda path: path.unlink()),
    ("extra-0.pt", _empty),  # an EOFError, which click had turned into a silent exit 130
])
def test_a_damaged_checkpoint_is_one_line_naming_it(byte_shards, two_steps, tmp_path, name, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    damage(run_dir / "checkpoints" / "step-2" / name)
    with pytest.raises(ConfigError) as e:
        small_run(byte_shards, run_dir, "--training.steps", "4")
    message = str(e.value)
    assert "\n" not in message, message
    assert message.startswith(f"{run_dir}/checkpoints/step-2 cannot be loaded (") and "damaged" in message
    assert (run_dir / "checkpoints" / "step-2").is_dir()  # nothing earlier to take: nothing set aside


@pytest.mark.parametrize("async_save", [False, True], ids=["save", "async_save"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_ctrl_c_inside_it_an_interrupt(
        byte_shards, tmp_path, monkeypatch, async_save):
    """DCP gathers a writer's failure into a CheckpointException, no Exception: a full disk had ended `herd train`
    and `herd finetune` in two tracebacks, and Ctrl-C during a save in a traceback with exit 1, not 130."""
    import errno

    import torch.distributed.checkpoint as dcp

    def failing(cause):
        def write(*args, **kwargs):
            raise dcp.CheckpointException("save failed", {0: (cause, None)})
        return write

    args = ("--training.steps", "2", "--checkpoint.interval", "1", "--checkpoint.async_save", str(async_save).lower())
    monkeypatch.setattr(checkpoint.dcp, "async_save" if async_save else "save",
                        failing(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(checkpoint.UnwritableCheckpoint) as e:
        small_run(byte_shards, tmp_path / "run", *args)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{tmp_path / 'run'}/checkpoints/step-1.tmp: the "
                                                                "checkpoint could not be written (OSError: [Errno 28]")
    monkeypatch.setattr(checkpoint.dcp, "async_save" if async_save else "save", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        small_run(byte_shards, tmp_path / "run2", *args)


def test_another_models_checkpoint_is_one_line_from_the_command_line(byte_shards, two_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    result = run_cli("train", *tiny_args(byte_shards, run_dir, *SMALL, "--training.steps", "4", "--model.dim", "64"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{run_dir}/checkpoints/step-2 cannot be loaded (ValueError: Size mismatch" in lines[0]
    assert "use a new run.dir" in lines[0]
    # the config that ran stays recorded (the refused one had been written over it)
    assert (run_dir / "config.toml").read_text() == (two_steps / "config.toml").read_text()


@pytest.mark.parametrize("change, words", [
    (("--model.tie_embeddings", "true"), "its model has tie_embeddings False, this run's True"),
    (("--model.n_heads", "2", "--model.n_kv_heads", "1"), "its model has n_heads 4, this run's 2"),
], ids=["tied", "heads"])
def test_a_checkpoint_of_another_shape_of_the_same_weights_is_refused(byte_shards, two_steps, tmp_path, change,
                                                                      words):
    """Weights the model can take, but of another model: DCP had loaded what matched and dropped the rest (an
    untied output layer; a second layer, into one) or read them under other heads, without a word."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    with pytest.raises(ConfigError, match=f"step-2 cannot be loaded \\(ValueError: {words}\\)"):
        small_run(byte_shards, run_dir, "--training.steps", "4", *change)


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit], ids=["truncated", "one bit flipped"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(byte_shards, tmp_path,
                                                                                          damage):
    """A flipped bit loads without an error: the checkpoint's checklist.chk catches it (the run had resumed from it
    and trained on)."""
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    small_run(byte_shards, straight, "--training.steps", "4", "--checkpoint.interval", "1")
    small_run(byte_shards, run_dir, "--training.steps", "3", "--checkpoint.interval", "1")
    damage(run_dir / "checkpoints" / "step-3" / "__0_0.distcp")
    small_run(byte_shards, run_dir, "--training.steps", "4", "--checkpoint.interval", "1")
    assert (run_dir / "checkpoints" / "step-3.damaged").is_dir() and (run_dir / "checkpoints" / "step-4").is_dir()
    assert losses(run_dir) == losses(straight)  # steps 3 and 4 redone from step 2, exactly
    fault = json.loads((run_dir / "faults.jsonl").read_text())
    assert fault["kind"] == "bad_checkpoint" and fault["checkpoint"] == "step-3" and "step-2" in fault["action"]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_and_the_run_resumes(byte_shards, two_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # had been "Unterminated string starting at: line 1 column 13", no file named
    small_run(byte_shards, run_dir, "--training.steps", "3")
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    assert [p.name for p in run_dir.iterdir() if ".tmp" in p.name] == []


@pytest.mark.parametrize("line, words", [
    (b'{"step": 3, "lo', "not JSON (Unterminated string"),
    (b"\xff", "not JSON ('utf-8' codec can't decode"),
    (b"[1]", "list, not a JSON object"),
    (b'{"step": 3}', "no loss"),  # had been "herd: error: 'loss'"
    (b'{"step": 3, "loss": 1, "grad_norm": 1, "lr": "x", "tokens": 1, "tokens_per_s": 1}', 'lr is "x", not a number'),
])
def test_a_malformed_metrics_line_names_the_file_and_the_line(two_steps, tmp_path, line, words):
    from herd.train.report import read_metrics

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    with open(run_dir / "metrics.jsonl", "ab") as fh:
        fh.write(line + b"\n" + (run_dir / "metrics.jsonl").read_bytes())
    with pytest.raises(ValueError) as e:
        read_metrics(run_dir)
    assert str(e.value).startswith(f"{run_dir}/metrics.jsonl, line 3: {words}") and "\n" not in str(e.value)


def test_the_report_says_where_its_plot_went(two_steps, tmp_path):
    from herd.train.report import draw

    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="d is a directory; give the plot a file name, such as .*d/report.png"):
        draw(two_steps, tmp_path / "d")  # had written d.png beside it and said "plot: d"
    assert draw(two_steps, tmp_path / "noext") == tmp_path / "noext.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "noext.png"]  # no temporary file left
    assert (tmp_path / "noext.png").read_bytes().startswith(b"\x89PNG")


def test_a_checkpoint_with_the_optimizer_groups_by_index_still_resumes(byte_shards, tmp_path, monkeypatch):
    """herd saved the optimizer's groups by index ("param_groups.0.lr") before it keyed them by parameter name."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_BY_NAME", StateDictOptions())
        small_run(byte_shards, run_dir, "--training.steps", "4", "--checkpoint.interval", "2")
    straight = losses(run_dir)
    assert checkpoint._by_index(run_dir / "checkpoints" / "step-2")
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    small_run(byte_shards, run_dir, "--training.steps", "4", "--checkpoint.interval", "2")
    assert losses(run_dir) == straight


def test_a_pipeline_checkpoint_with_the_optimizer_groups_by_index_is_refused():
    """Saved by index, the groups of a pipeline-parallel run collided across ranks: one stage's were kept, and the
    other stage's parameters, in none of them, would have had no betas at the first step."""
    stage = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(stage, TrainingSection())
    state = get_optimizer_state_dict(stage, optimizer)
    for group in state["param_groups"]:
        group["params"] = [f"layers.1.{name}" for name in group["params"]]  # the other stage's
    with pytest.raises(ValueError, match="no optimizer group holds 0.weight: a pipeline-parallel run wrote it"):
        checkpoint._OptimState([stage], [optimizer], by_index=True).load_state_dict(state)


class _Planted:
    """A pickle that writes a file when it is loaded: what someone could put in a run directory they hand over."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_resuming_a_prepared_run_dir_runs_none_of_its_code(byte_shards, two_steps, tmp_path):
    """A step's extra state had been read with weights_only=False: any pickle placed there (its checklist written
    again to match) ran when the run resumed, in herd train and, before any check, in herd finetune."""
    import torch

    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(two_steps, run_dir)
    step = run_dir / "checkpoints" / "step-2"
    torch.save({"step": 2, "planted": _Planted(marker)}, step / "extra-0.pt")
    checkpoint._write_checklist(step)
    assert checkpoint.Checkpointer(run_dir, tiny_config(byte_shards, run_dir).checkpoint).latest_extra() == {}
    with pytest.raises(ConfigError, match="cannot be loaded"):
        small_run(byte_shards, run_dir, "--training.steps", "4")
    assert not marker.exists()
    torch.load(step / "extra-0.pt", weights_only=False)  # the planted file does run code, loaded as it had been
    assert marker.exists()
