"""Single-process training: it learns, resumes exactly, survives a NaN, and exports a model herd can load, chat
with and convert; bad configs fail before any compute."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from train_helpers import fortunes, losses, metrics, run_cli, tiny_args, tiny_config, write_shards

import herd
from herd.train.config import ConfigError, TrainConfig, load_config
from herd.train.pretrain import check, pretrain


def test_resumed_run_equals_the_straight_run(byte_shards, tmp_path):
    straight = tmp_path / "straight"
    pretrain(tiny_config(byte_shards, straight))
    pieces = tmp_path / "pieces"
    pretrain(tiny_config(byte_shards, pieces, "--training.steps", "6", "--checkpoint.interval", "2"))
    # Stop after 4 steps as a crash would (the checkpoints at 2 and 4 stay), then run the same command again.
    for step in (6,):
        import shutil

        shutil.rmtree(pieces / "checkpoints" / f"step-{step}")
    (pieces / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(pieces)[:5]))
    pretrain(tiny_config(byte_shards, pieces))
    assert losses(pieces) == losses(straight)
    assert [m["step"] for m in metrics(pieces)] == list(range(1, 7))
    a, b = torch.load(straight / "consolidated.00.pth"), torch.load(pieces / "consolidated.00.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight)[-1] < losses(straight)[0] - 0.5
    assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu"} <= set(metrics(straight)[0])
    assert metrics(straight)[-1]["tokens"] == 6 * 4 * 64


def test_a_resumed_run_follows_its_new_learning_rate_and_length(byte_shards, tmp_path):
    """Run again with more steps and another training.lr, a run goes on under the new schedule from the step it
    reached (the checkpoint's schedule had carried on: the old lr, and lr 0 at the step after its old end)."""
    fresh, run = tmp_path / "fresh", tmp_path / "run"
    pretrain(tiny_config(byte_shards, fresh, "--training.lr", "1e-2"))
    pretrain(tiny_config(byte_shards, run, "--training.steps", "4"))
    pretrain(tiny_config(byte_shards, run, "--training.lr", "1e-2"))
    assert [m["lr"] for m in metrics(run)[4:]] == [m["lr"] for m in metrics(fresh)[4:]] and metrics(run)[4]["lr"] > 0


def test_mfu_counts_each_steps_own_sequence_length(byte_shards, tmp_path):
    """MFU had counted the FLOPs of training.seq_len at every step: after a seq_len_schedule change attention's
    share was the base length's (an 8B run from 4K to 8K would have under-reported MFU by about 11%)."""
    from herd.train.metrics import flops_per_token
    from herd.train.pretrain import build_model_config

    config = tiny_config(byte_shards, tmp_path / "run", "--training.steps", "4", "--training.seq_len_schedule",
                         "[[2, 32]]", "--run.peak_flops", "1e12")
    pretrain(config)
    vocab = torch.load(tmp_path / "run" / "consolidated.00.pth")["tok_embeddings.weight"].shape[0]
    model_config = build_model_config(config.model, vocab)
    for record in metrics(tmp_path / "run"):
        seq_len = 64 if record["step"] <= 2 else 32
        expected = record["tokens_per_s"] * flops_per_token(model_config, seq_len) / 1e12
        assert record["mfu"] == pytest.approx(expected, rel=1e-9), record


def test_mfu_is_against_the_peak_of_the_precision_the_run_computes_in(byte_shards, tmp_path, monkeypatch, capsys):
    # A float32 peak had been measured under bf16 autocast (a GPU's default): MFU some 15x too high there.
    from herd.train import metrics as train_metrics

    measured = []
    monkeypatch.setattr(train_metrics, "measure_peak_flops", lambda device, dtype: measured.append(dtype) or 2e11)
    config = tiny_config(byte_shards, tmp_path / "run", "--model.dim", "32", "--model.n_layers", "1",
                         "--training.seq_len", "16", "--training.steps", "1", "--training.dtype", "bfloat16",
                         "--checkpoint.interval", "0")
    run = pretrain(dataclasses.replace(config, run=dataclasses.replace(config.run, peak_flops=None)))
    assert measured == [torch.bfloat16] and run["step"] == 1
    assert "MFU is against a bfloat16 matmul peak of 0.2 TFLOP/s per device" in capsys.readouterr().err


def test_nan_step_is_skipped_or_rolled_back(byte_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_TRAIN_INJECT", "nan@3")
    pretrain(tiny_config(byte_shards, tmp_path / "skip"))
    records = metrics(tmp_path / "skip")
    assert "skipped" in records[3] and "non-finite" in records[3]["skipped"]
    fault = json.loads((tmp_path / "skip" / "faults.jsonl").read_text())
    assert fault["step"] == records[3]["step"] == 4  # the step spoiled, numbered alike in both files
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records[4:])
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    # Rolled back: the weights of step 2 come back, the bad batch is not seen again, the steps are redone.
    pretrain(tiny_config(byte_shards, tmp_path / "rollback", "--fault.nonfinite", "rollback"))
    steps = [r["step"] for r in metrics(tmp_path / "rollback")]
    assert steps == [1, 2, 3, 2, 3, 4, 5, 6]
    fault = json.loads((tmp_path / "rollback" / "faults.jsonl").read_text().splitlines()[0])
    assert fault["action"] == "rolled back to step-2"


def test_a_divergence_that_recurs_after_every_rollback_stops_the_run(byte_shards, tmp_path, monkeypatch):
    """Step 6 goes bad however often it is redone: the step redone after each rollback (5) is good, so the bad steps
    were never "in a row" and the run rolled back to step-4 until its time ran out. It stops after
    fault.max_bad_steps rollbacks that never got past step 6, saying so (numbered as metrics.jsonl numbers steps:
    its records had said step 5 where metrics.jsonl's said 6)."""
    from herd.train import fault

    planted = fault.injected
    monkeypatch.setattr(fault, "injected", lambda kind, step, rank: (kind, step) == ("nan", 5)
                        or planted(kind, step, rank))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="3 rollbacks to step-4 in a row never got past step 6"):
        pretrain(tiny_config(byte_shards, run, "--training.steps", "8", "--fault.nonfinite", "rollback",
                             "--fault.max_bad_steps", "2", "--run.time_limit_s", "20"))
    faults = [json.loads(line) for line in (run / "faults.jsonl").read_text().splitlines()]
    assert [f["step"] for f in faults] == [6, 6]  # the third is the one that stopped the run


def test_the_watchdog_times_steps_not_evaluations_or_saves(byte_shards, tmp_path, monkeypatch):
    """A held-out evaluation or a save longer than the watchdog's time (and than any step) had killed every attempt
    of the run in it, before its first checkpoint."""
    import time

    from herd.train import fault
    from herd.train.checkpoint import Checkpointer
    from herd.train.loop import Trainer

    kills = []
    monkeypatch.setattr(fault.os, "_exit", kills.append)  # what the watchdog calls to kill the rank
    for cls, name in ((Trainer, "evaluate"), (Checkpointer, "save")):
        slow = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, slow=slow, **k: (time.sleep(0.8), slow(*a, **k))[1])
    pretrain(tiny_config(byte_shards, tmp_path / "run", "--fault.watchdog_s", "0.4", "--run.eval_interval", "3",
                         "--training.steps", "4"))
    assert kills == [] and "eval_loss" in metrics(tmp_path / "run")[2]


def test_the_final_held_out_loss_is_in_metrics_once(byte_shards, tmp_path):
    """With eval_interval 0 (the default) the held-out loss the run reported was in no metrics.jsonl record, so
    `herd report` drew no held-out point; a step evaluated on the interval is not evaluated twice; a run stopped by
    run.time_limit_s records the loss of the step it stopped at."""
    for eval_interval, steps in (("0", [6]), ("3", [3, 6])):
        summary = pretrain(tiny_config(byte_shards, tmp_path / eval_interval, "--run.eval_interval", eval_interval))
        evals = [(m["step"], m["eval_loss"]) for m in metrics(tmp_path / eval_interval) if "eval_loss" in m]
        assert [step for step, _ in evals] == steps and evals[-1][1] == summary["eval_loss"] is not None
    summary = pretrain(tiny_config(byte_shards, tmp_path / "timed", "--run.time_limit_s", "1e-9"))
    assert summary["step"] == 1 and metrics(tmp_path / "timed")[-1]["eval_loss"] == summary["eval_loss"] is not None


def test_a_run_dir_in_use_is_refused(byte_shards, tmp_path):
    """A second job on a run.dir in use had resumed from the first one's checkpoint, and the two overwrote each
    other's checkpoints until one failed on a vanished .tmp, blamed on the disk."""
    import fcntl

    config = tiny_config(byte_shards, tmp_path / "r")
    pretrain(config)  # finished: a run that has ended holds nothing
    with open(tmp_path / "r" / ".lock", "a+") as other:  # as the other job's rank 0 holds it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("pid 4242\n")
        other.flush()
        with pytest.raises(ConfigError, match=r"run.dir .*/r is in use by another run \(pid 4242\): wait for it"):
            pretrain(config)
    assert pretrain(config)["step"] == 6  # released: the finished run resumes at its end


def test_a_run_dir_that_cannot_be_locked_still_trains(byte_shards, tmp_path, monkeypatch, capsys):
    """Some network and FUSE file systems have no locks (ENOSYS): the lock had stopped every run there."""
    import errno
    import fcntl

    def unsupported(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    assert pretrain(tiny_config(byte_shards, tmp_path / "r"))["step"] == 6
    assert "cannot be locked (Function not implemented): nothing keeps a second run out" in capsys.readouterr().err


def test_a_rollback_keeps_the_schedules_in_step(byte_shards, tmp_path, monkeypatch):
    """The data source had kept its own step through a rollback, so the batch-size schedule came early by the steps
    rolled back; the bad batch stays skipped all the same."""
    monkeypatch.setenv("HERD_TRAIN_INJECT", "nan@5")
    run = tmp_path / "run"
    pretrain(tiny_config(byte_shards, run, "--training.steps", "8", "--fault.nonfinite", "rollback",
                         "--training.batch_size_schedule", "[[6, 8]]"))
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + records, records)]
    # The rollback takes back step 5's tokens and counts the bad batch's: its record adds none.
    assert tokens == [256] * 5 + [0] + [256, 256, 512, 512]
    data = torch.load(run / "checkpoints" / "step-6" / "extra-0.pt", weights_only=False)["data"]
    assert (data["step"], data["offsets"]) == (6, {"main": 8 * 256})  # steps 1-5, the bad batch, steps 5-6 again


def test_a_rollback_waits_for_the_asynchronous_save_in_flight(byte_shards, tmp_path, monkeypatch):
    """step-4 was still being saved in the background when step 5 went NaN: the rollback went to step-2, and step-4,
    committed after it from the discarded run, kept the redone run from saving its own step 4."""
    monkeypatch.setenv("HERD_TRAIN_INJECT", "nan@5")
    run = tmp_path / "run"
    pretrain(tiny_config(byte_shards, run, "--training.steps", "8", "--fault.nonfinite", "rollback",
                         "--checkpoint.async_save", "true", "--checkpoint.keep", "5"))
    assert json.loads((run / "faults.jsonl").read_text())["action"] == "rolled back to step-4"
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    extras = {p.name: torch.load(p / "extra-0.pt", weights_only=False) for p in (run / "checkpoints").iterdir()}
    assert {name: (e["step"], e["data"]["offsets"]["main"]) for name, e in extras.items()} == {
        "step-2": (2, 2 * 256), "step-4": (4, 4 * 256), "step-6": (6, 8 * 256), "step-8": (8, 10 * 256)}


def test_the_held_out_set_does_not_depend_on_how_the_batch_is_split(byte_shards, tmp_path, monkeypatch):
    """pretrain had sized it by the per-rank micro-batch (4 sequences with micro_batch_size 1, 16 without), and
    data-parallel ranks then each took a slice of that."""
    from herd.train.data import held_out_batches, open_shards
    from herd.train.loop import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda trainer: trainer.eval_batches)

    def rows(batches: list[dict]) -> list[tuple]:
        return [tuple(row.tolist()) for b in batches for row in b["tokens"]]

    config = tiny_config(byte_shards, tmp_path / "run")
    whole = rows(pretrain(config))
    assert len(set(whole)) == len(whole) == config.run.eval_batches * config.training.batch_size
    for micro in (1, 2):
        split = pretrain(tiny_config(byte_shards, tmp_path / "run", "--training.micro_batch_size", str(micro)))
        assert rows(split) == whole and {len(b["tokens"]) for b in split} == {micro}
        t = dataclasses.replace(config.training, micro_batch_size=micro)
        shards = open_shards(byte_shards)
        ranks = [held_out_batches(shards, t, config.data.held_out, config.run.eval_batches, rank, 2) for rank in (0, 1)]
        assert sorted(rows(ranks[0]) + rows(ranks[1])) == sorted(whole)


def test_held_out_documents_fewer_than_a_batch_are_each_scored_once(byte_shards):
    """The set had been one whole batch however few held-out tokens there were, the stream wrapping round to them
    again: some tokens counted twice in the held-out loss."""
    from herd.train.data import IGNORE, held_out_batches, open_shards, split_documents

    shards = open_shards(byte_shards)
    t = dataclasses.replace(tiny_config(byte_shards, byte_shards / "unused").training, batch_size=8)  # 512 tokens
    held_out = 0.01
    docs = split_documents(shards, held_out, t.seed)[1]
    tokens = sum(len(shards[int(i)]) for i in docs)
    assert tokens < t.batch_size * t.seq_len  # the case itself
    batches = held_out_batches(shards, t, held_out, 4)
    scored = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    assert scored == tokens - len(docs)  # every held-out token after its document's first, once


def test_export_loads_chats_and_converts(tmp_path):
    tokenizer = herd.load_tokenizer()
    shards = write_shards(tmp_path / "shards", fortunes(200), tokenizer, spec="herd.tokenizer:load_tokenizer")
    run = tmp_path / "run"
    pretrain(tiny_config(shards, run, "--training.steps", "3", "--model.dim", "32", "--model.n_layers", "1",
                         "--training.seq_len", "32", "--checkpoint.average_last", "2", "--checkpoint.interval", "1"))
    llm = herd.load(run)
    assert llm.model.config.vocab_size == tokenizer.vocab_size
    assert llm.tokenizer.encode("Hello world") == tokenizer.encode("Hello world")
    # The export is the average of the last two checkpoints (Llama 3's annealing average).
    from herd.train.checkpoint import load_model_weights

    steps = sorted((run / "checkpoints").iterdir())[-2:]
    average = load_model_weights(steps, llm.model.config)
    torch.testing.assert_close(llm.model.norm.weight, average["norm.weight"])
    assert not torch.equal(average["norm.weight"], load_model_weights(steps[-1:], llm.model.config)["norm.weight"])
    result = run_cli("chat", "--model", str(run), "--max-tokens", "4", stdin="Hi\n")
    assert result.returncode == 0, result.stderr
    result = run_cli("convert", str(run), str(tmp_path / "hf"), "--format", "hf")
    assert result.returncode == 0, result.stderr
    assert torch.equal(herd.load(tmp_path / "hf").model.norm.weight, llm.model.norm.weight)


def test_bad_configs_fail_before_compute(byte_shards, tmp_path):
    def fails(*args, world=1):
        with pytest.raises(ConfigError) as e:
            check(load_config(TrainConfig, None, tiny_args(byte_shards, tmp_path / "r", *args)), world)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not match the world size 2" in fails("--parallel.tp", "3", world=2)
    assert "longer than the model's context" in fails("--training.seq_len", "9000", "--model.max_seq_len", "8192")
    # the learning rate had gone on rising into the anneal, which then started from the peak
    assert "warmup_steps 8 and anneal_steps 5 overlap in 10 steps" in fails(
        "--training.steps", "10", "--training.warmup_steps", "8", "--training.anneal_steps", "5")
    assert "not a directory" in fails("--data.shards", str(tmp_path / "missing"))
    assert "does not divide the model's heads" in fails("--parallel.tp", "3", "--parallel.dp", "1", world=3)
    # Layouts that had failed inside every worker, restarted by torchrun each time (tracebacks of 40-470 lines), or
    # had trained another model than the one exported (a tied table copied to two pipeline stages)
    pp2, tp2 = ("--parallel.pp", "2", "--parallel.dp", "1"), ("--parallel.tp", "2", "--parallel.dp", "1")
    assert "parallel.pp > 1 needs untied embeddings" in fails(*pp2, "--model.tie_embeddings", "true", world=2)
    assert "is 4 stages, more than the model's 2 layers" in fails(
        *pp2, "--parallel.pp_schedule", "Interleaved1F1B", world=2)
    assert "pp_microbatches 3 does not divide the 4 sequences per rank" in fails(
        *pp2, "--parallel.pp_microbatches", "3", world=2)
    assert "pp_microbatches 1 is fewer than the 2 stages 1F1B needs" in fails(
        *pp2, "--parallel.pp_microbatches", "1", world=2)
    assert "micro_batch_size does not apply with parallel.pp > 1" in fails(
        *pp2, "--training.micro_batch_size", "1", world=2)
    assert "micro_batch_size 3 does not divide the 4 sequences per rank" in fails("--training.micro_batch_size", "3")
    assert "seq_len 63 does not split over parallel.tp 2" in fails(*tp2, "--training.seq_len", "63", world=2)
    # its first backward had failed on every rank, torchrun restarting it (torch 2.13's compiled DTensor blocks)
    assert "training.compile does not work with parallel.tp 2" in fails(*tp2, "--training.compile", "true", world=2)
    assert "does not divide the model's feed-forward width 170" in fails(
        "--parallel.tp", "4", "--parallel.dp", "1", "--model.n_kv_heads", "4", "--model.multiple_of", "10", world=4)
    # anneal shards of another tokenizer had trained on its ids as the model's, or failed when the anneal began
    other = write_shards(tmp_path / "other", fortunes(20), spec="tests:another")
    assert "data.anneal_shards were tokenized with tests:another (vocab_size 258), data.shards with " \
           "herd.data.shards:ByteTokenizer (vocab_size 258)" in fails("--data.anneal_shards", str(other),
                                                                      "--training.anneal_steps", "2")
    result = run_cli("train", *tiny_args(byte_shards, tmp_path / "r", "--data.shards", str(tmp_path / "nope")))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("herd: error: data.shards")
    assert not (tmp_path / "r").exists()  # nothing was started


def test_a_run_that_cannot_fit_in_memory_is_refused_before_the_model_is_built(byte_shards, tmp_path, monkeypatch):
    """Past the machine's memory the system kills the run without a word (an 8B-shaped model here: exit -9)."""
    import herd.quant.load
    from herd.model.llama import Transformer

    config = load_config(TrainConfig, None, tiny_args(byte_shards, tmp_path / "r", "--model.dim", "1024",
                                                      "--model.n_layers", "6", "--model.multiple_of", "256"))
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(check(config)[0]).parameters())
    monkeypatch.setattr(herd.quant.load, "available_memory", lambda: 2**30)
    with pytest.raises(ConfigError, match=rf"model: {n / 1e9:.2f}B parameters need at least {16 * n / 2**30:.1f} GiB "
                                          r"of memory to train here \(1 rank, .* 1\.0 GiB are available: make"):
        check(config)
    # Sharded over 8 ranks of one machine, each builds the whole model in float32 before it is sharded.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    sharded = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, dp=8),
                                  training=dataclasses.replace(config.training, batch_size=8))
    with pytest.raises(ConfigError, match=rf"need at least {8 * 4 * n / 2**30:.1f} GiB .* \(8 ranks"):
        check(sharded, 8)
    monkeypatch.setattr(herd.quant.load, "available_memory", lambda: 2 * 8 * 4 * n)
    check(sharded, 8)


def test_activation_checkpointing_and_async_save_change_nothing(byte_shards, tmp_path):
    pretrain(tiny_config(byte_shards, tmp_path / "plain"))
    pretrain(tiny_config(byte_shards, tmp_path / "ac", "--training.activation_checkpointing", "true",
                         "--checkpoint.async_save", "true", "--checkpoint.keep", "1"))
    assert losses(tmp_path / "ac") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    assert [p.name for p in (tmp_path / "ac" / "checkpoints").iterdir()] == ["step-6"]  # keep-last-1, no .tmp
    a, b = torch.load(tmp_path / "plain" / "consolidated.00.pth"), torch.load(tmp_path / "ac" / "consolidated.00.pth")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_batch_too_large_to_pack_is_refused_before_compute(byte_shards, tmp_path, monkeypatch):
    """A batch of 1e8 sequences had packed its held-out batch for hours (np.full) until the system killed it."""
    import herd.quant.load

    monkeypatch.setattr(herd.quant.load, "available_memory", lambda: 2**30)
    config = load_config(TrainConfig, None, tiny_args(byte_shards, tmp_path / "r", "--training.batch_size", "10000000"))
    with pytest.raises(ConfigError, match=r"^training: a batch of 10000000 sequences of 64 tokens per rank needs "
                                          r"\d+\.\d GiB of memory to pack \(1 rank\) but 1\.0 GiB are available: "
                                          r"lower training.batch_size"):
        check(config)
    assert not (tmp_path / "r").exists()


def test_a_run_dir_that_cannot_be_made_is_one_line_naming_it(byte_shards, tmp_path):
    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "file" / "run"  # as /proc/x: had been a bare "[Errno 20] Not a directory" line
    with pytest.raises(ConfigError, match=f"^run.dir {run_dir} cannot be made \\(Not a directory\\); give a directory"):
        check(load_config(TrainConfig, None, tiny_args(byte_shards, run_dir)))
