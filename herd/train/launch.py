"""Starting a training job: one process, or torchrun (torch.distributed.run) with restarts for several.

`herd train CONFIG --nproc N` validates the config in the launcher (bad configs fail before any worker starts),
then runs `python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts R -m herd.train ...`.
A worker that dies (killed, hung and stopped by the watchdog or a collective's timeout, a corruption check)
makes torchrun restart every worker; they resume from the latest checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from herd.data.executors import cpu_count
from herd.train.config import ConfigError, TrainConfig, load_config


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(the config path or None, the --section.field overrides)."""
    if args and not args[0].startswith("--"):
        return args[0], args[1:]
    return None, args


def launch(config_path: str | None, overrides: list[str], nproc: int) -> int:
    from herd.train.pretrain import check

    config = load_config(TrainConfig, config_path, overrides)
    check(config, world_size=nproc)
    if nproc == 1 and "WORLD_SIZE" not in os.environ:
        from herd.train.pretrain import pretrain

        try:
            _print_summary(pretrain(config), config)
        except KeyboardInterrupt:
            _stopped(config)
            raise
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={config.parallel.max_restarts}", "-m", "herd.train"]
    cmd += ([config_path] if config_path else []) + overrides
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(cpu_count() // nproc, 1)))
    # torchrun in a session of its own, told of every stop by this process: stopping the launcher alone (kill, a
    # scheduler, a terminal's Ctrl-C) had left the workers training on, re-parented to init.
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    stops: list[int] = []

    def forward(signum, frame):
        stops.append(signum)
        process.send_signal(signum)

    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stop) is not signal.SIG_IGN:  # under nohup the workers outlive the terminal too
            signal.signal(stop, forward)
    code = process.wait()
    if stops:
        _stopped(config)
        return 128 + stops[0]
    return code


def _print_summary(summary: dict, config: TrainConfig) -> None:
    print(f"trained {summary['step']} steps, {summary['tokens']:,} tokens"
          + (f", held-out loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else "")
          + f"; weights in {config.run.dir}", file=sys.stderr)


def _stopped(config: TrainConfig) -> None:
    """Where a stopped run can go on from: the steps since its last checkpoint are trained again."""
    from herd.train.checkpoint import Checkpointer

    latest = Checkpointer(config.run.dir, config.checkpoint).latest()
    print("herd train: stopped; " + (f"its last checkpoint is {latest}: run the same command to resume from it"
                                     if latest else "no checkpoint had been saved: the same command starts over"),
          file=sys.stderr)


def worker_main(argv: list[str] | None = None) -> None:
    """A torchrun worker: load the config, train, tear the process group down; errors end in one line."""
    import torch.distributed as dist

    from herd.train.pretrain import pretrain

    config_path, overrides = split_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(TrainConfig, config_path, overrides)
        summary = pretrain(config)
        if os.environ.get("RANK", "0") == "0":  # torchrun's launcher prints none: rank 0 says what one process would
            _print_summary(summary, config)
    except ConfigError as e:
        print(f"herd train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the launcher says where to resume; each rank's traceback had said nothing more
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
