"""An asynchronous checkpoint is committed as soon as its background write is done, not at the next save."""
from __future__ import annotations

import pytest
from train_helpers import metrics, tiny_config

from herd.train.loop import Trainer
from herd.train.pretrain import pretrain


def test_a_written_asynchronous_checkpoint_is_committed_before_the_next_save(byte_shards, tmp_path, monkeypatch):
    """step-2 was written by step 3 but renamed only when step 4's save began: a crash in between lost it."""
    train_step = Trainer.train_step

    def written_then_killed(trainer):
        if trainer.step == 2:
            trainer.checkpointer._pending[0].result()  # the background write finishes during step 3
        if trainer.step == 3:
            raise KeyboardInterrupt
        return train_step(trainer)

    monkeypatch.setattr(Trainer, "train_step", written_then_killed)
    run = tmp_path / "run"
    config = tiny_config(byte_shards, run, "--checkpoint.async_save", "true")
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.undo()
    pretrain(config)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
