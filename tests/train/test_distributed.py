"""Data, tensor and pipeline parallelism on 2 gloo ranks against one process; exact resume through a SIGKILL and
automatic restart; a corrupted replica caught by the checksum; a hung rank turned into a restart."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from herd.train.pretrain import pretrain

from train_helpers import ROOT, losses, metrics, run_cli, tiny_args, tiny_config

# Saving in the background (on a process group of its own: on the training's, every rank hung at the first save).
ASYNC = ("--checkpoint.async_save", "true")
LAYOUTS = {
    "fsdp": ["--parallel.dp", "2", *ASYNC],
    "hsdp": ["--parallel.dp_replicate", "2", "--parallel.dp", "1"],
    "tp": ["--parallel.tp", "2", "--parallel.dp", "1", *ASYNC],
    "pp": ["--parallel.pp", "2", "--parallel.dp", "1"],
}


# A batch and a sequence length that change on the way, and held-out losses: a pipeline had failed where the shape
# changed (torch's schedule keeps the shapes of its first step) and reported no held-out loss.
SCHEDULED = ("--training.batch_size_schedule", "[[4, 8]]", "--training.seq_len_schedule", "[[2, 32]]",
             "--run.eval_interval", "3")


@pytest.fixture(scope="module")
def runs(byte_shards, tmp_path_factory):
    """One process, and each 2-rank layout (all in one torchrun launch), on the same config and global batch."""
    root = tmp_path_factory.mktemp("dist")
    pretrain(tiny_config(byte_shards, root / "single"))
    pretrain(tiny_config(byte_shards, root / "single-scheduled", *SCHEDULED))
    plan = [tiny_args(byte_shards, root / name, *layout) for name, layout in LAYOUTS.items()]
    plan.append(tiny_args(byte_shards, root / "pp-scheduled", *LAYOUTS["pp"], *SCHEDULED))
    (root / "plan.json").write_text(json.dumps(plan))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests/train/dist_worker.py"), str(root / "plan.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_match_one_process(runs, layout):
    single, parallel = losses(runs / "single"), losses(runs / layout)
    assert len(parallel) == len(single) == 6
    assert single[-1] < single[0] - 0.5  # it learns
    assert parallel == pytest.approx(single, rel=1e-5, abs=1e-5)
    # The exported weights agree too, whatever layout wrote the checkpoint.
    saved = sorted(p.name for p in (runs / layout / "checkpoints").iterdir())
    assert saved == sorted(p.name for p in (runs / "single" / "checkpoints").iterdir()) and "step-6" in saved
    a = torch.load(runs / "single" / "consolidated.00.pth")
    b = torch.load(runs / layout / "consolidated.00.pth")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_a_pipeline_follows_the_schedules_and_evaluates_as_one_process(runs):
    single, pipeline = metrics(runs / "single-scheduled"), metrics(runs / "pp-scheduled")
    assert [m["step"] for m in pipeline] == list(range(1, 7))
    assert [m["tokens"] for m in pipeline] == [m["tokens"] for m in single]
    assert [m["loss"] for m in pipeline] == pytest.approx([m["loss"] for m in single], rel=1e-5, abs=1e-5)
    held_out = [m["eval_loss"] for m in single if "eval_loss" in m]
    assert len(held_out) == 2 and [m["eval_loss"] for m in pipeline if "eval_loss" in m] == pytest.approx(
        held_out, rel=1e-5)


@pytest.mark.heavy
def test_corruption_and_kill_survived_exactly(runs, byte_shards, tmp_path):
    """A corrupted replica is detected and reported, a SIGKILLed worker is restarted, and the run resumes from its
    checkpoints to the very losses and weights of the uninterrupted run. Rank 0's replica (the one a checkpoint
    keeps) is corrupted during step 3, and the checksum comes every 5 steps: the replicas are compared before the
    step-4 save too (the save had kept the corrupted copy, the mismatch at step 5 gone back to it, and the run
    ended on corrupted weights with every replica agreeing)."""
    run = tmp_path / "faulty"
    result = run_cli("train", "--nproc", "2", *tiny_args(byte_shards, run, *LAYOUTS["hsdp"]),
                     "--fault.checksum_interval", "5", "--parallel.max_restarts", "2",
                     env={"HERD_TRAIN_INJECT": "corrupt@2:0#0,kill@4:1#1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "silent data corruption" in result.stderr
    faults = [json.loads(line) for line in (run / "faults.jsonl").read_text().splitlines()]
    assert faults[0]["kind"] == "replica_mismatch" and len(faults[0]["ranks"]) == 1 and faults[0]["step"] == 4
    assert "tok_embeddings.weight" in faults[0]["parameters"]
    assert result.stderr.count("resumed from") == 2  # once after the corruption, once after the kill
    assert [m["loss"] for m in metrics(run)] == losses(runs / "hsdp")
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))
    a, b = torch.load(runs / "hsdp" / "consolidated.00.pth"), torch.load(run / "consolidated.00.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.heavy
def test_hung_rank_is_restarted(byte_shards, tmp_path):
    run = tmp_path / "hung"
    result = run_cli("train", "--nproc", "2", *tiny_args(byte_shards, run, "--parallel.dp", "2"),
                     "--fault.watchdog_s", "4", "--parallel.max_restarts", "1", env={"HERD_TRAIN_INJECT": "hang@3:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "watchdog" in result.stderr and "resumed from" in result.stderr
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))
    assert "trained 6 steps" in result.stderr  # rank 0's summary: torchrun's launcher had printed none


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.heavy
def test_stopping_the_launcher_stops_every_worker(byte_shards, tmp_path):
    """A stop sent to `herd train` alone (kill, a scheduler) had ended it and left both ranks training on,
    re-parented to init; it now reaches torchrun and its workers, and says where the run can resume."""
    stop = signal.SIGTERM
    run = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-m", "herd.cli", "train", "--nproc", "2",
                                 *tiny_args(byte_shards, run, "--parallel.dp", "2", "--training.steps", "100000",
                                            "--checkpoint.interval", "3")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and len(metrics(run)) >= 5):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        launcher.send_signal(stop)
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 128 + stop, err[-3000:]
        assert "herd train: stopped; its last checkpoint is" in err and "run the same command to resume" in err
        deadline = time.monotonic() + 30
        while _processes_naming(str(run)):
            assert time.monotonic() < deadline, f"still running: {_processes_naming(str(run))}"
            time.sleep(0.2)
    finally:
        launcher.kill()
        for pid in _processes_naming(str(run)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def four_layers(byte_shards, tmp_path_factory):
    """One process, 4 layers: Interleaved1F1B puts two stages on each of 2 ranks, and a stage needs a layer."""
    run = tmp_path_factory.mktemp("four") / "single"
    pretrain(tiny_config(byte_shards, run, "--model.n_layers", "4"))
    return run


def _assert_same_run(run, reference):
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5, abs=1e-5)
    a, b = torch.load(reference / "consolidated.00.pth"), torch.load(run / "consolidated.00.pth")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


@pytest.mark.heavy
@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_a_killed_pipeline_run_resumes_from_its_checkpoint(byte_shards, four_layers, tmp_path, schedule):
    """Each rank's optimizer holds other parameters: saved by group index, one rank's groups overwrote the other's,
    and every restart failed at its first step."""
    run = tmp_path / schedule
    result = run_cli("train", "--nproc", "2", *tiny_args(byte_shards, run, "--model.n_layers", "4", *LAYOUTS["pp"]),
                     "--parallel.pp_schedule", schedule, "--parallel.max_restarts", "1",
                     env={"HERD_TRAIN_INJECT": "kill@5:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("(step 4)") == 1  # resumed once, from step-4
    _assert_same_run(run, four_layers)


@pytest.mark.heavy
def test_a_single_process_checkpoint_resumes_under_interleaved_1f1b(byte_shards, four_layers, tmp_path):
    """Two stages per rank: two optimizers and two schedules, from a checkpoint that has one of each."""
    run = tmp_path / "resumed"
    # As if the one process had been killed after step 4's checkpoint.
    shutil.copytree(four_layers, run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    (run / "consolidated.00.pth").unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(run)[:4]))
    args = tiny_args(byte_shards, run, "--model.n_layers", "4", *LAYOUTS["pp"], "--parallel.pp_schedule",
                     "Interleaved1F1B")
    (tmp_path / "plan.json").write_text(json.dumps([args]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests/train/dist_worker.py"), str(tmp_path / "plan.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(run, four_layers)
