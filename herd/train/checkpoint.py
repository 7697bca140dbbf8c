"""Training checkpoints (torch.distributed.checkpoint, sharded) and the final export (herd's checkpoint formats).

A checkpoint is the directory `run.dir/checkpoints/step-N`: the DCP shards of the model and optimizer state, keyed
by parameter name (every rank writes its own part, whatever mix of FSDP, TP and PP produced it, and DCP reshards on
load), plus `extra-R.pt` per rank with what is not a tensor of the model: scheduler, data position, RNG states,
trainer counters. Every rank writes into `step-N.tmp`; rank 0 renames it to `step-N` only once all ranks are done, so a
crash mid-save leaves a `.tmp` that is ignored (and later removed) and the previous checkpoint stays the latest.
Each carries a `checklist.chk` (every file's MD5, as Meta's downloads do: `herd verify` and `md5sum -c` read it),
checked before a resume: damaged bytes load without an error (a flipped bit had resumed silently, a block
overwritten had exported 3.4e38s). One that fails its checklist or cannot be loaded (a damaged disk, a deleted
file) is set aside as `step-N.damaged` and the one before it taken; where none loads (another model's: the shape
changed), a ConfigError says so in one line.
The newest `keep` checkpoints are kept. With `async_save` the tensors are written in the background while
training goes on; the rename happens once every rank's write has finished: at the first step after it (the Trainer
asks `written()` each step), or at the next save, a load or the end, whichever comes first.

    ckpt = Checkpointer(run_dir, config.checkpoint)
    ckpt.save(step, model_parts, optimizers, extra)     # extra: a picklable dict, per rank
    path, extra = ckpt.load_latest(model_parts, optimizers)

`export_model(run_dir, step_dirs, model_config, tokenizer)` reads the model weights back from one checkpoint (or
averages several: Llama 3 averaged the checkpoints of its annealing stage) on one process, and writes them with
the tokenizer into `run_dir` in Meta's (or HF's) layout, so `herd.load(run_dir)`, `herd chat --model run_dir`
and `herd convert run_dir ...` work on a training run.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from herd.checkpoint.checksums import CHECKLIST, file_md5, read_checklist
from herd.model.config import ModelConfig
from herd.train import fault
from herd.train.config import CheckpointSection, ConfigError

_STEP = re.compile(r"^step-(\d+)$")
# What a step's extra state (step, data position, RNG states) may hold besides tensors and plain values: numpy's
# RNG state array. It is read with weights_only, as torch reads weights: with weights_only=False, resuming a run
# directory someone else had prepared ran whatever pickle they put there.
_EXTRA_GLOBALS = [getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32))]


def _load_extra(path: Path) -> dict:
    with torch.serialization.safe_globals(_EXTRA_GLOBALS):
        return torch.load(path, weights_only=True)
# One process saving or loading without a process group is intended here (single-process runs, export).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _my_share(items: list) -> list:
    """This rank's share of `items`: every world-size-th one."""
    return items[_rank()::dist.get_world_size()] if dist.is_initialized() else items


def _merged(part: dict) -> dict:
    """The dicts every rank made of its share, merged (on every rank)."""
    if not dist.is_initialized():
        return part
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, part)
    return {k: v for each in gathered for k, v in each.items()}


def _write_checklist(tmp: Path) -> None:
    names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != CHECKLIST)
    digests = _merged({name: file_md5(tmp / name) for name in _my_share(names)})
    if _rank() == 0:
        (tmp / CHECKLIST).write_text("".join(f"{digests[name]}  {name}\n" for name in names))


def _check_checklist(path: Path) -> None:
    """ValueError naming the first of this rank's share of the checkpoint's files that is missing or differs from
    its checklist (none: a checkpoint written without one)."""
    if not (path / CHECKLIST).is_file():
        return
    for digest, name in _my_share(read_checklist(path / CHECKLIST)):
        if not (path / name).is_file():
            raise ValueError(f"{name} is missing (checklist.chk)")
        if file_md5(path / name) != digest:
            raise ValueError(f"{name} differs from its checksum (checklist.chk)")


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every rank: they must all resume from the same checkpoint."""
    if not dist.is_initialized():
        return ok
    flags = [False] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


class UnloadableCheckpoint(ConfigError):
    """A checkpoint that cannot be loaded: a damaged one, or another model's."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} cannot be loaded ({why}): it is damaged or from another model")
        self.path, self.why = path, why


@contextlib.contextmanager
def _quiet_metadata_fallback():
    """DCP logs a traceback, on the root logger, for each metadata file of a damaged checkpoint it cannot read; the
    failure is reported in one line instead."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.pathname.endswith("state_dict_loader.py")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _why(error: BaseException) -> str:
    """The first line of what went wrong; DCP wraps each rank's exception, with its traceback, in one of its own."""
    if isinstance(error, dcp.CheckpointException):
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class UnwritableCheckpoint(OSError):
    """A checkpoint that could not be written (a full disk, a file system gone read-only)."""


def _written(tmp: Path, write):
    """`write()`'s result. DCP gathers a failure into a CheckpointException, which is no Exception, so a full disk
    had ended the run in two tracebacks: it is an UnwritableCheckpoint naming the directory, and an interrupt
    (Ctrl-C) inside the write the KeyboardInterrupt it was."""
    try:
        return write()
    except dcp.CheckpointException as error:
        cause = next(iter(error.failures.values()))[0]
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise UnwritableCheckpoint(f"{tmp}: the checkpoint could not be written ({_why(error)}); free space there "
                                   "or give run.dir on another disk, then run again to resume from the last "
                                   "checkpoint") from None


class _ModelState(Stateful):
    """Every model part this rank holds (one, or several pipeline stages) as one state dict."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))


# By parameter name ("param_groups.layers.0.attention.wq.weight.lr"), not group index ("param_groups.0.lr"): under
# pipeline parallelism each rank's groups hold other parameters, and groups keyed by index collide across ranks in
# DCP, which keeps one rank's (and a rank with two stages has two optimizers, each with its groups 0 and 1).
_BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)
_BY_INDEX = re.compile(r"^optim\.param_groups\.\d+\.")


class _OptimState(Stateful):
    """Every optimizer this rank holds, as one state dict.

    `by_index`: a checkpoint written before herd keyed the groups by name. A pipeline-parallel run kept one stage's
    groups only in those: the other stages' parameters cannot be given theirs.
    """

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], by_index: bool = False):
        self.pairs = list(zip(parts, optimizers))
        self.by_index = by_index

    def state_dict(self) -> dict:
        if not self.by_index:
            return {k: v for part, optim in self.pairs for k, v in
                    get_optimizer_state_dict(part, optim, options=_BY_NAME).items()}
        states = [get_optimizer_state_dict(part, optim) for part, optim in self.pairs]
        # The saved groups are read whole over these, their "params" lists included, so one part's will do: each
        # optimizer then picks its own parameters out of them.
        return {"state": {k: v for s in states for k, v in s["state"].items()},
                "param_groups": states[0]["param_groups"]}

    def load_state_dict(self, state: dict) -> None:
        if not self.by_index:
            for part, optim in self.pairs:
                set_optimizer_state_dict(part, optim, state, options=_BY_NAME)
            return
        named = {name for group in state["param_groups"] for name in group["params"]}
        for part, optim in self.pairs:
            # A group takes its settings (betas, eps...) from the saved groups that share a parameter with it; one
            # that shares none would be left without and fail at the first step.
            for group in get_optimizer_state_dict(part, optim)["param_groups"]:
                if named.isdisjoint(group["params"]):
                    raise ValueError(f"no optimizer group holds {group['params'][0]}: a pipeline-parallel run wrote "
                                     "it before herd kept the groups by parameter name")
            set_optimizer_state_dict(part, optim, state)


def _by_index(path: Path) -> bool:
    """Whether the checkpoint at `path` keeps its optimizer groups by index, as herd wrote them before."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(_BY_INDEX.match(key) for key in keys)


# What a checkpoint's weights are the weights of: resumed into a model that differs in any, DCP had loaded what
# matched and dropped the rest without a word (a second layer, an untied output, heads split otherwise).
_ARCHITECTURE = ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size", "tie_embeddings")


def _architecture(parts: list[nn.Module]) -> dict | None:
    """The model's shape, for a model whose parts say it (herd's Transformer, or its pipeline stages)."""
    config = next((p.config for p in parts if isinstance(getattr(p, "config", None), ModelConfig)), None)
    return None if config is None else {name: getattr(config, name) for name in _ARCHITECTURE}


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointSection):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self._pending: tuple[object, Path, Path] | None = None  # (future, tmp, final) of an async save

    @functools.cached_property
    def _async_group(self):
        """The background save's own process group (made by every rank at its first save): on the training's, its
        collectives met FSDP's and every rank hung at the first save. torchtitan gives it a gloo group too."""
        return dist.new_group(backend="gloo") if dist.is_initialized() else None

    def steps(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1][1] if steps else None

    def save(self, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], extra: dict,
             *, final: bool = False) -> None:
        self.wait()
        final_dir = self.dir / f"step-{step}"
        if final_dir.exists():
            return
        tmp = self.dir / f"step-{step}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save({**extra, "architecture": _architecture(parts)}, tmp / f"extra-{_rank()}.pt")
        state = {"model": _ModelState(parts), "optim": _OptimState(parts, optimizers)}
        if self.cfg.async_save and not final:
            group = self._async_group
            self._pending = (_written(tmp, lambda: dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)),
                             tmp, final_dir)
        else:
            _written(tmp, lambda: dcp.save(state, checkpoint_id=str(tmp)))
            self._commit(tmp, final_dir)

    @functools.cached_property
    def _poll_group(self):
        """Where the ranks agree that a background save is written: not the save's own group, whose collectives its
        thread may be running."""
        return dist.new_group(backend="gloo") if dist.is_initialized() else None

    def written(self) -> bool:
        """Whether a background save is in flight and written by every rank, so that wait() commits it at once: left
        to the next save, a crash in between lost a checkpoint that was on disk. Cheap enough for every step: a flag
        (across ranks, one all-reduce of it, while a save is in flight)."""
        if self._pending is None:
            return False
        done = torch.tensor([int(self._pending[0].done())])
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_group)
        return bool(done.item())

    def wait(self) -> None:
        """Finish an asynchronous save in flight (a no-op when there is none)."""
        if self._pending is not None:
            future, tmp, final_dir = self._pending
            self._pending = None
            _written(tmp, future.result)
            self._commit(tmp, final_dir)

    def _commit(self, tmp: Path, final_dir: Path) -> None:
        _barrier()  # every rank has written its part
        if self.cfg.checksums:
            _write_checklist(tmp)
        if _rank() == 0:
            tmp.rename(final_dir)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        keep = max(self.cfg.keep, self.cfg.average_last, 1)
        for _, path in self.steps()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.dir.glob("step-*.tmp"):
            if self._pending is None:
                shutil.rmtree(stale, ignore_errors=True)

    def latest_extra(self) -> dict:
        """Rank 0's extra dict of the newest checkpoint, read without loading the checkpoint; empty where there is
        none or it cannot be read (a damaged one, which load_latest sets aside)."""
        latest = self.latest()
        try:
            return _load_extra(latest / "extra-0.pt") if latest else {}
        except Exception:  # whatever damaged bytes make torch.load raise
            return {}

    def load_latest(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, restored in place, and this rank's extra dict; None where there is none.

        The ones after it that cannot be loaded are set aside: restarted on them, a fault-tolerant run would fail
        again and again, and a new save of their step would be skipped (the directory exists). Where none loads, the
        run is another model's (or every copy is damaged): a ConfigError, and nothing is set aside.
        A save in flight is finished first, so that it counts as the newest: a rollback that passed over it would see
        it committed afterwards, from the timeline it discarded, under a step the redone run could then not save.
        """
        self.wait()
        failed: list[UnloadableCheckpoint] = []
        for _, path in reversed(self.steps()):
            try:
                extra = self.load(path, parts, optimizers)
            except UnloadableCheckpoint as e:
                failed.append(e)
                continue
            self._set_aside(failed, path)
            return path, extra
        if not failed:
            return None
        before = f", nor can the {len(failed) - 1} before it" if len(failed) > 1 else ""
        raise ConfigError(f"{failed[0]}{before}; use a new run.dir, or delete {self.dir} to train this one from the "
                          "start")

    def _set_aside(self, failed: list[UnloadableCheckpoint], taken: Path) -> None:
        if _rank() == 0:
            for error in failed:
                aside = error.path.with_name(f"{error.path.name}.damaged")
                shutil.rmtree(aside, ignore_errors=True)
                error.path.rename(aside)
                print(f"herd train: {error}; set aside as {aside.name}, resuming from {taken.name}", file=sys.stderr,
                      flush=True)
                fault.log_fault(self.dir.parent, {"kind": "bad_checkpoint", "checkpoint": error.path.name,
                                                  "why": error.why, "action": f"set aside; resumed from {taken.name}"})
        _barrier()

    def load(self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
        """Restore model and optimizer in place from `path`; returns this rank's extra dict. UnloadableCheckpoint on
        every rank where any rank cannot load it (the model and optimizer may then be partly overwritten)."""
        error = None
        try:
            if self.cfg.checksums:
                _check_checklist(path)
            with _quiet_metadata_fallback():
                state = {"model": _ModelState(parts), "optim": _OptimState(parts, optimizers, _by_index(path))}
                dcp.load(state, checkpoint_id=str(path))
            rank_file = path / f"extra-{_rank()}.pt"
            extra = _load_extra(rank_file if rank_file.exists() else path / "extra-0.pt")
            saved, now = extra.pop("architecture", None), _architecture(parts)
            if saved is not None and now is not None and saved != now:
                name = next(n for n in _ARCHITECTURE if saved.get(n) != now[n])
                raise ValueError(f"its model has {name} {saved.get(name)}, this run's {now[name]}")
        # DCP gathers every rank's failure into a CheckpointException, which is a BaseException.
        except (Exception, dcp.CheckpointException) as e:
            error = e
        if not _everywhere(error is None):
            raise UnloadableCheckpoint(path, _why(error) if error else "on another rank")
        return extra


def load_model_weights(step_dirs: list[Path], model_config) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a checkpoint, averaged over several when given several, on CPU."""
    from herd.checkpoint.base import expected_shapes

    shapes = expected_shapes(model_config)
    total: dict[str, torch.Tensor] | None = None
    for path in step_dirs:
        state = {f"model.{name}": torch.empty(shape) for name, shape in shapes.items()}
        try:
            with _quiet_metadata_fallback():
                dcp.load(state, checkpoint_id=str(path), no_dist=True)
        except (Exception, dcp.CheckpointException) as e:
            raise UnloadableCheckpoint(path, _why(e)) from None
        weights = {name[len("model."):]: t for name, t in state.items()}
        total = weights if total is None else {k: total[k] + weights[k] for k in total}
    assert total is not None, "no checkpoint to read"
    return {k: v / len(step_dirs) for k, v in total.items()}


def export_model(run_dir: str | Path, step_dirs: list[Path], model_config, tokenizer, fmt: str = "meta") -> Path:
    """Write the final weights (one checkpoint, or the average of several) and the tokenizer into `run_dir`.

    The files are written in a temporary directory and moved in one by one, the config (params.json /
    config.json, which makes the directory a checkpoint) last.
    """
    from herd.checkpoint import save_checkpoint

    run_dir = Path(run_dir)
    weights = load_model_weights(step_dirs, model_config)
    tmp = run_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint((model_config, weights, tokenizer), tmp, fmt)
    marker = "params.json" if fmt == "meta" else "config.json"
    for other in ("params.json", "config.json"):
        (run_dir / other).unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == marker):
        item.replace(run_dir / item.name)
    tmp.rmdir()
    return run_dir
