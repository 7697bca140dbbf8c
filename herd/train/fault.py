"""Surviving failures without a human: a watchdog for hung steps, bad-step detection, cross-replica checksums,
and fault injection for testing all of that.

- A rank whose step (a hung collective, a stuck device) makes no progress for `fault.watchdog_s` is killed; the
  launcher (torchrun with max restarts) restarts the job, which resumes from the last checkpoint. Collectives
  themselves time out after `parallel.timeout_s` with the same effect.
- `BadStepDetector` judges each step on values every rank agrees on (all-reduced loss and gradient norm): a NaN
  or Inf, or a loss spiking above `spike_factor` x its running mean, is skipped or rolled back by the Trainer.
- `check_replicas` compares a checksum of every parameter across data-parallel replicas (which must be bit for
  bit equal): a mismatch, the mark of silent data corruption, is reported (stderr, run.dir/faults.jsonl) and
  raised, so the job restarts from the last checkpoint.
- HERD_TRAIN_INJECT="nan@5,kill@7:1,hang@3,corrupt@4:1#0" plants faults at those steps (on that rank, else
  all; in that attempt, else the first, so a restarted job runs clean): what the fault-tolerance tests use.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from herd.train.config import FaultSection


class SilentCorruptionError(RuntimeError):
    pass


class Watchdog:
    """Kills this process when a training step has not ended (`beat()`) within `timeout` seconds of the step before
    it (0: never). The first step is not timed (warm-up, compilation: it had killed runs whose every step took a
    fraction of the time), nor work done while `paused()`: an evaluation, a save or the export may take longer than
    any step, and a hang in its collectives is their time-out's to catch."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._last = time.monotonic()
        self._paused = True  # until the first step ends
        self._stop = threading.Event()
        if timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="herd-watchdog").start()

    def beat(self) -> None:
        self._last = time.monotonic()
        self._paused = False

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self.beat()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout / 4, 5.0)):
            if not self._paused and time.monotonic() - self._last > self.timeout:
                print(f"herd train: watchdog: no progress for {self.timeout:g}s (hung collective?); "
                      "exiting so the launcher restarts the job", file=sys.stderr, flush=True)
                os._exit(3)


class BadStepDetector:
    def __init__(self, cfg: FaultSection, ema: float | None = None, seen: int = 0):
        self.cfg, self.ema, self.seen = cfg, ema, seen

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step (and it joins the running mean), else why it is bad."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            return "non-finite loss or gradient"
        if self.cfg.spike_factor > 0 and self.seen >= self.cfg.spike_warmup and self.ema is not None \
                and loss > self.cfg.spike_factor * self.ema:
            return f"loss spike ({loss:.3f} > {self.cfg.spike_factor} x {self.ema:.3f})"
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.seen += 1
        return None

    def state_dict(self) -> dict:
        return {"ema": self.ema, "seen": self.seen}


def parameter_checksums(parts: list[nn.Module]) -> tuple[list[str], torch.Tensor]:
    """Names and an int64 checksum of the bits of each parameter's local part (position-weighted, so a swap shows)."""
    names, sums = [], []
    for part in parts:
        for name, p in part.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            flat = local.detach().contiguous().view(-1)
            bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).long()
            weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
            names.append(name)
            sums.append((bits * weights).sum())
    return names, torch.stack(sums) if sums else torch.zeros(0, dtype=torch.long)


def check_replicas(parts: list[nn.Module], group: dist.ProcessGroup, step: int, run_dir: Path) -> None:
    """Raise SilentCorruptionError (after reporting it) when data-parallel replicas' parameters differ."""
    names, local = parameter_checksums(parts)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # [replicas, params]
    differs = (table != table[0]).any(dim=0)
    if not differs.any():
        return
    bad = [names[i] for i in torch.nonzero(differs).flatten().tolist()]
    # The replicas that disagree with the majority, as global ranks.
    ranks = dist.get_process_group_ranks(group)
    column = table[:, int(torch.nonzero(differs)[0, 0])]
    values, counts = torch.unique(column, return_counts=True)
    majority = values[counts.argmax()]
    culprits = [ranks[i] for i in range(len(ranks)) if column[i] != majority]
    report = {"step": step, "kind": "replica_mismatch", "ranks": culprits, "parameters": bad[:10],
              "n_parameters": len(bad)}
    if dist.get_rank() == min(ranks):
        with open(Path(run_dir) / "faults.jsonl", "a") as fh:
            fh.write(json.dumps(report) + "\n")
    message = (f"silent data corruption: at step {step} rank(s) {culprits} hold parameters that differ from their "
               f"replicas ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}); restarting from the last checkpoint")
    print(f"herd train: {message}", file=sys.stderr, flush=True)
    raise SilentCorruptionError(message)


def log_fault(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "faults.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- fault injection (tests)


def injected(kind: str, step: int, rank: int) -> bool:
    """Whether HERD_TRAIN_INJECT plants `kind` at `step` on `rank` in this attempt.

    Items are KIND@STEP[:RANK][#ATTEMPT]: STEP counts the optimizer steps done before it (nan@2 spoils the third,
    which metrics.jsonl and faults.jsonl number 3); the rank defaults to all, the attempt (torchrun's restart count)
    to the first, so a restarted job runs clean unless a later attempt is named.
    """
    spec = os.environ.get("HERD_TRAIN_INJECT", "")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for item in filter(None, (i.strip() for i in spec.split(","))):
        item, _, when = item.partition("#")
        name, _, where = item.partition("@")
        at, _, on = where.partition(":")
        if name == kind and int(at) == step and (not on or int(on) == rank) and int(when or 0) == attempt \
                and (kind, step) not in _fired:
            _fired.add((kind, step))  # once: a rolled-back run that comes to this step again runs clean
            return True
    return False


_fired: set[tuple[str, int]] = set()


def reset_injections() -> None:
    """A new run in this process may be planted with faults again."""
    _fired.clear()


def inject_faults(step: int, rank: int, parts: list[nn.Module]) -> None:
    """Kill, hang or corrupt this rank now, if asked to."""
    if injected("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if injected("hang", step, rank):
        time.sleep(10 ** 6)
    if injected("corrupt", step, rank):
        with torch.no_grad():
            p = next(p for part in parts for p in part.parameters())
            local = p.to_local() if hasattr(p, "to_local") else p
            local.view(-1)[0] += 1.0
