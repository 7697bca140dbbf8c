"""The Trainer: the optimization loop that pretraining and every post-training recipe share.

    trainer = Trainer(config, model, batches, loss_fn, env=env, export=export_fn)
    trainer.fit()

- `config`: any dataclass with the sections `training`, `checkpoint`, `run` and `fault` (herd.train.config).
- `model`: the module (already parallelized), or the list of model parts this rank holds (pipeline stages).
- `batches`: a resumable batch source (herd.train.data): `next()` gives this rank's micro-batches for one
  optimizer step, `state_dict()` / `load_state_dict()` its position; one whose batches follow the optimizer step
  (schedules) also has `rewind(step)`, which a rollback calls: back to that step, the position kept.
- `loss_fn(model, micro_batch) -> (loss_sum, n_tokens)`: the summed loss of a micro-batch and what it is
  normalized by (tokens, pairs, ...). The Trainer sums both over micro-batches and data-parallel ranks and makes
  the gradient that of `total loss / total count`, so the result does not depend on how the batch was split.
  `causal_lm_loss` is next-token prediction under the document mask; recipes plug their own (masked SFT, DPO).
- `pipeline`: with pipeline parallelism, an object whose `step(micro_batches) -> (loss_sum, n_tokens)` runs the
  schedule (forward and backward); it replaces loss_fn.
- `export(trainer)`: called on every rank after the final checkpoint (herd.train.checkpoint.export_model).
- `step_metrics()`: a recipe's own figures since the last logged step (PPO's score and KL), added to the record.
- `identity`: the settings that define the run, by name ({"training.seed": 0, ...}), kept in each checkpoint; a
  resume from one whose settings differ is refused (`check_identity`).

Per optimizer step: forward/backward over the micro-batches (gradient sync only on the last), gradients scaled to
the mean, clipped; a step whose loss or gradient is NaN/Inf or spikes is skipped or rolled back
(`fault.nonfinite`); scheduler; metrics (run.dir/metrics.jsonl: step, loss, grad_norm, lr, tokens, tokens_per_s,
mfu); every `checkpoint.interval` steps a checkpoint. Started again on the same run.dir it resumes from the
latest checkpoint, bit for bit: same data, same RNG, same optimizer state. An asynchronous checkpoint is committed
at the first step after its background write has finished.
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from herd.atomic import atomic_output
from herd.model.llama import Transformer
from herd.train import fault
from herd.train.checkpoint import Checkpointer
from herd.train.config import ConfigError
from herd.train.data import IGNORE
from herd.train.fused_loss import linear_cross_entropy
from herd.train.metrics import MetricsLog
from herd.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from herd.train.parallel import DistEnv


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens, attention confined to each document."""
    labels = batch["labels"]
    if _plain_output(model):
        h = model(batch["tokens"], document_ids=batch.get("document_ids"), hidden=True)
        loss = linear_cross_entropy(h.flatten(0, 1), model.output.weight, labels.flatten(), IGNORE)
    else:
        logits = model(batch["tokens"], document_ids=batch.get("document_ids"))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def _plain_output(model: nn.Module) -> bool:
    """A Transformer that no parallelism wraps (FSDP subclasses it, TP makes its weights DTensors) and whose output
    layer is a plain linear: the loss can then apply that layer itself, chunk by chunk."""
    return (type(model) is Transformer and type(model.output) is nn.Linear
            and type(model.output.weight) in (nn.Parameter, torch.Tensor))


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware computes bf16 fast (CUDA with bf16 support), else full float32."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPUs here compute bf16 matmuls >100x slower than float32


def check_identity(saved: dict | None, now: dict | None, checkpoint: Path) -> None:
    """ConfigError naming each setting that defines the run where `checkpoint`'s and this run's differ: resumed, the
    run had gone on from the weights, optimizer moments and data position of another one. Settings only one side
    names follow from one both name (the recipe, the LoRA rank), which is reported."""
    if not saved or not now:
        return  # a checkpoint written before runs kept their identity, or a run that keeps none
    changed = [f"{name}: {saved[name]!r} then, {now[name]!r} now" for name in now
               if name in saved and saved[name] != now[name]]
    if changed:
        raise ConfigError(f"{checkpoint} is a checkpoint of another run ({'; '.join(changed)}); resume with the "
                          "values it was trained with (run.dir/config.toml holds them) or train in a new run.dir")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, config, model: nn.Module | list[nn.Module], batches,
                 loss_fn: Callable = causal_lm_loss, *, env: DistEnv | None = None, pipeline=None,
                 eval_batches: list[dict] | None = None, flops_per_token: Callable[[int], float] | None = None,
                 peak_flops: float | None = None, export: Callable[["Trainer"], None] | None = None,
                 step_metrics: Callable[[], dict] | None = None, record: str | None = None,
                 identity: dict | None = None):
        """record: the run's config as TOML, written to run.dir/config.toml once the run has started or resumed
        (a resume refused, another model's checkpoint, had left the refused config there)."""
        self.config, self.record, self.identity = config, record, identity
        self.cfg, self.run = config.training, config.run
        self.parts = model if isinstance(model, list) else [model]
        self.model = self.parts[0]
        self.batches, self.loss_fn, self.pipeline = batches, loss_fn, pipeline
        self.env = env or DistEnv()
        self.eval_batches = eval_batches or []
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.export, self.step_metrics = export, step_metrics
        self.run_dir = Path(self.run.dir)
        self.optimizers = [build_optimizer(p, self.cfg) for p in self.parts]
        self.schedulers = [build_scheduler(o, self.cfg) for o in self.optimizers]
        self.checkpointer = Checkpointer(self.run_dir, config.checkpoint)
        self.detector = fault.BadStepDetector(config.fault)
        self.autocast = autocast_dtype(self.cfg.dtype, self.env.device)
        self.step = 0
        self.tokens = 0
        self.bad_in_a_row = 0
        # Rollbacks that never got past the step that failed before: a divergence that recurs wherever the run
        # resumes, since the step redone after each rollback is good and bad_in_a_row starts again.
        self.stuck_rollbacks, self.last_bad_step = 0, -1
        self.is_main = self.env.rank == 0

    # ------------------------------------------------------------ state

    def extra_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "detector": self.detector.state_dict(),
                "schedulers": [s.state_dict() for s in self.schedulers], "data": self.batches.state_dict(),
                "rng": rng_state(), "identity": self.identity}

    def save(self, final: bool = False) -> None:
        self.checkpointer.save(self.step, self.parts, self.optimizers, self.extra_state(), final=final)

    def restore(self, *, keep_data: bool = False) -> Path | None:
        """Load the newest checkpoint that loads (None: there is none); `keep_data` leaves the data position as it is
        (a rollback skips the bad batches), only the step of a source that follows it goes back."""
        found = self.checkpointer.load_latest(self.parts, self.optimizers)
        if found is None:
            return None
        path, extra = found
        check_identity(extra.get("identity"), self.identity, path)
        self.step, self.tokens = extra["step"], extra["tokens"]
        self.detector = fault.BadStepDetector(self.config.fault, **extra["detector"])
        # The schedule is this run's config's, at the step reached: the checkpoint's own (its learning rate and length)
        # had carried on, so a resume with a new training.lr ran the old one, and one with more steps ran a step at
        # the old schedule's end, lr 0. Every part's schedule is at the same step (a checkpoint from a layout with
        # fewer parts per rank, one process for an Interleaved1F1B run, holds fewer of them).
        step = extra["schedulers"][0]["last_epoch"]
        for s in self.schedulers:
            s.last_epoch = step
            for group, base, factor in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * factor(step)
        if not keep_data:
            self.batches.load_state_dict(extra["data"])
        elif hasattr(self.batches, "rewind"):
            self.batches.rewind(self.step)
        set_rng_state(extra["rng"])
        return path

    # ------------------------------------------------------------ one step

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast)

    def _forward_backward(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        micro_batches = [{k: v.to(self.env.device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
        if self.pipeline is not None:
            with self._autocast():  # training.dtype holds for a pipeline's stages too (they had run in float32)
                return self.pipeline.step(micro_batches)
        loss_total = torch.zeros((), device=self.env.device)
        count = torch.zeros((), device=self.env.device, dtype=torch.long)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce gradients once per step
                self.model.set_requires_gradient_sync(last)
            with self._autocast():
                loss, n = self.loss_fn(self.model, mb)
            loss.backward()
            loss_total += loss.detach().float()
            count += n
        return loss_total, count

    def train_step(self) -> dict:
        started = time.perf_counter()
        micro_batches = next(self.batches)
        fault.inject_faults(self.step, self.env.rank, self.parts)
        loss_sum, count = self._forward_backward(micro_batches)
        if fault.injected("nan", self.step, self.env.rank):
            loss_sum = loss_sum + float("nan")
            for p in self.parts[0].parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    break
        totals = torch.stack([loss_sum.float(), count.float()]).to(self.env.device)
        self.env.all_reduce(totals, "dp_replicate", "dp_shard")
        if self.env.pp > 1:
            # only the last stage computed the loss; the others contribute zeros
            self.env.all_reduce(totals, "pp")
        loss_sum, count = totals[0], totals[1].clamp(min=1)
        # FSDP averaged the gradients over the data-parallel ranks; they should be sums over count instead.
        norm = clip_grad_norm([p for part in self.parts for p in part.parameters()], self.cfg.grad_clip,
                              self.env.group("pp"), grad_scale=self.env.dp / count)
        loss, norm_value = float(loss_sum / count), float(norm)
        why = self.detector.judge(loss, norm_value)
        lr = self.optimizers[0].param_groups[0]["lr"]
        if why is None:
            for optimizer in self.optimizers:
                optimizer.step()
            self.bad_in_a_row = 0
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(mb["tokens"].numel()) for mb in micro_batches) * self.env.dp
        if why is not None:
            self._bad_step(why, loss)
        else:
            for scheduler in self.schedulers:
                scheduler.step()
            self.step += 1
        self.tokens += tokens
        elapsed = time.perf_counter() - started
        record = {"step": self.step, "loss": loss, "grad_norm": norm_value, "lr": lr, "tokens": self.tokens,
                  "tokens_per_s": tokens / elapsed, "step_time": elapsed}
        if self.flops_per_token and self.peak_flops:
            # at this step's sequence length: attention's share changes with it (seq_len_schedule)
            per_token = self.flops_per_token(int(micro_batches[0]["tokens"].shape[-1]))
            record["mfu"] = tokens * per_token / elapsed / (self.peak_flops * self.env.world_size)
        if why is not None:
            record["skipped"] = why
        return record

    def _bad_step(self, why: str, loss: float) -> None:
        self.bad_in_a_row += 1
        if self.bad_in_a_row > self.config.fault.max_bad_steps:
            raise RuntimeError(f"{self.bad_in_a_row} bad steps in a row (last: {why}); stopping the run")
        step = self.step + 1  # the step being taken, as metrics.jsonl numbers it (self.step counts those done)
        restored = self.restore(keep_data=True) if self.config.fault.nonfinite == "rollback" else None
        if restored is not None:
            self.stuck_rollbacks = self.stuck_rollbacks + 1 if step <= self.last_bad_step else 1
            self.last_bad_step = step
            if self.stuck_rollbacks > self.config.fault.max_bad_steps:
                raise RuntimeError(f"{self.stuck_rollbacks} rollbacks to {restored.name} in a row never got past "
                                   f"step {step} (last: {why}); stopping the run: lower training.lr or raise "
                                   "fault.spike_factor")
        action = f"rolled back to {restored.name}" if restored else "skipped the batch"
        if self.is_main:
            fault.log_fault(self.run_dir, {"step": step, "kind": "bad_step", "why": why, "loss": loss,
                                           "action": action})
            self.log.note(f"step {step}: {why}; {action}")
        if restored is None:
            # The batch is consumed: the step counts, the weights stay as they were.
            for scheduler in self.schedulers:
                scheduler.step()
            self.step += 1

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean per-token loss over the held-out batches, reduced over data-parallel ranks (and pipeline stages:
        the last one holds it)."""
        if not self.eval_batches:
            return None
        for part in self.parts:
            part.eval()
        totals = torch.zeros(2, device=self.env.device)
        for batch in self.eval_batches:
            batch = {k: v.to(self.env.device) for k, v in batch.items()}
            with self._autocast():
                loss, n = (self.pipeline.evaluate(batch) if self.pipeline is not None
                           else self.loss_fn(self.model, batch))
            totals += torch.stack([loss.float(), n.float()])
        for part in self.parts:
            part.train()
        self.env.all_reduce(totals, "dp_replicate", "dp_shard")
        if self.env.pp > 1:
            self.env.all_reduce(totals, "pp")
        return float(totals[0] / totals[1].clamp(min=1))

    # ------------------------------------------------------------ the loop

    def _logged_steps(self) -> bool:
        """Whether run.dir's metrics.jsonl holds steps (an earlier run's, which MetricsLog truncates)."""
        metrics = self.run_dir / "metrics.jsonl"
        return metrics.is_file() and metrics.stat().st_size > 0

    def _out_of_time(self, started: float) -> bool:
        limit = self.run.time_limit_s
        if not limit:
            return False
        # Every rank must stop at the same step: rank 0's clock decides.
        flag = torch.tensor([float(time.monotonic() - started > limit)], device=self.env.device)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    @contextlib.contextmanager
    def _run_dir_claimed(self):
        """The run directory held by this run alone while it trains (rank 0 holds it): a second job started on it
        had resumed from the same checkpoint, and the two overwrote each other's until one failed on a vanished
        .tmp, blamed on the disk."""
        if not self.is_main:
            yield
            return
        import fcntl
        import os

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise ConfigError(f"run.dir {self.run_dir} is in use by another run ({holder}): wait for it to end "
                                  "or give another run.dir") from None
            except OSError as error:  # a file system without locks (some network and FUSE ones): the run goes on
                print(f"herd: warning: run.dir {self.run_dir} cannot be locked ({error.strerror}): nothing keeps a "
                      "second run out of it", file=sys.stderr, flush=True)
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}\n")
            lock.flush()
            yield

    def fit(self) -> dict:
        with self._run_dir_claimed():
            return self._fit()

    def _fit(self) -> dict:
        fault.reset_injections()
        latest = self.restore()
        trained_before = latest is None and self._logged_steps()
        self.log = MetricsLog(self.run_dir, enabled=self.is_main, total_steps=self.cfg.steps, start_step=self.step,
                              progress=self.run.progress, tensorboard=self.run.tensorboard)
        if latest is not None:
            self.log.note(f"resumed from {latest} (step {self.step})")
        elif trained_before:
            self.log.note(f"{self.run_dir / 'metrics.jsonl'} holds steps of an earlier run but there is no checkpoint "
                          "to resume from: training starts from step 0 (checkpoint.interval sets how often one is "
                          "saved)")
        if self.is_main and self.record is not None:
            with atomic_output(self.run_dir / "config.toml") as tmp:
                tmp.write_text(self.record)
        watchdog = fault.Watchdog(self.config.fault.watchdog_s)
        replicas = self.env.group("dp_replicate")
        interval = self.config.checkpoint.interval
        started = time.monotonic()
        try:
            for part in self.parts:
                part.train()
            every = self.config.fault.checksum_interval
            checked = -1  # the last step whose replicas were compared

            def check_replicas(step: int) -> None:
                nonlocal checked
                if every and replicas is not None and checked != step:
                    fault.check_replicas(self.parts, replicas, step, self.run_dir)
                    checked = step

            # The watchdog times the steps alone: an evaluation or a save longer than a step had killed every
            # attempt of a run in it.
            held_out = None  # the held-out loss of the step the loop ended on, where it evaluated one
            while self.step < self.cfg.steps:
                record = self.train_step()
                watchdog.beat()
                if self.checkpointer.written():
                    with watchdog.paused():
                        self.checkpointer.wait()  # left to the next save, a crash before it had lost this one
                step = self.step
                # Known before the evaluation: the step a run stops at is evaluated and logged, so metrics.jsonl
                # holds the held-out loss the run's summary reports (with eval_interval 0 it had held none).
                stopping = self._out_of_time(started)
                last = stopping or step == self.cfg.steps
                due = last or self.run.eval_interval and step % self.run.eval_interval == 0
                if due and self.eval_batches and "skipped" not in record:
                    with watchdog.paused():
                        record["eval_loss"] = self.evaluate()
                held_out = record.get("eval_loss")
                if self.run.log_interval and (step % self.run.log_interval == 0 or last):
                    if self.step_metrics is not None:
                        record.update(self.step_metrics())
                    self.log.log(record)
                saving = interval and step % interval == 0 and step < self.cfg.steps
                # A checkpoint holds replicas that were compared: one written with a corrupted copy unchecked would
                # be the state every recovery goes back to.
                if saving or (every and step % every == 0):
                    check_replicas(step)
                if saving:
                    with watchdog.paused():
                        self.save()
                if stopping:
                    self.log.note(f"run.time_limit_s reached at step {step}: stopping here")
                    break
            with watchdog.paused():
                check_replicas(self.step)
                self.save(final=True)
                self.checkpointer.wait()
                summary = {"step": self.step, "tokens": self.tokens,
                           "eval_loss": held_out if held_out is not None else self.evaluate()}
                if self.export is not None:
                    self.export(self)
            return summary
        finally:
            watchdog.stop()
            self.log.close()
