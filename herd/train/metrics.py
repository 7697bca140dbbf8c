"""What a run reports: one JSON object per optimizer step in run.dir/metrics.jsonl, a progress bar, TensorBoard,
and the arithmetic behind tokens/s and MFU (model FLOPs over a matmul peak measured on the device)."""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import torch

from herd.atomic import atomic_output
from herd.train.report import read_records


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of a herd ModelConfig: 6 per weight of every matmul (forward + backward) plus
    attention's scores and values, 12 * layers * dim * seq_len (the PaLM paper's count; the embedding lookup is
    no matmul, the output projection is)."""
    hd, kv = config.head_dim, config.kv_heads
    per_layer = 2 * config.dim * config.n_heads * hd + 2 * config.dim * kv * hd + 3 * config.dim * config.hidden_dim
    matmul = config.n_layers * per_layer + config.vocab_size * config.dim
    return 6.0 * matmul + 12.0 * config.n_layers * config.dim * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                       reps: int = 3) -> float:
    """The best of a few square matmuls, in FLOP/s: the ceiling that MFU is measured against."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


class _Lines(io.TextIOBase):
    """A file for tqdm that ends each redraw of the bar with a newline, and drops the blank ones that clear it."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> int:
        if text.strip():
            self.out.write(text.strip("\r\n") + "\n")
            self.out.flush()
        return len(text)


class MetricsLog:
    """Appends step records to metrics.jsonl (rank 0 only), mirrors them to TensorBoard and a tqdm bar."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 tensorboard: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if progress:
            from tqdm import tqdm

            # Where stderr is a file (CI, nohup, a scheduler's log), a line every half minute: tqdm's redraws by
            # carriage return had made one line of 60 KB in a minute and a half.
            terminal = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=terminal,
                            **({} if terminal else {"file": _Lines(sys.stderr), "ncols": 100, "mininterval": 30}))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate(self, start_step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: keep only those before it."""
        if not self.path.exists():
            return
        kept = [record for record in read_records(self.path, ("step",)) if record["step"] <= start_step]
        with atomic_output(self.path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.update(record["step"] - self.bar.n)
            postfix = {"loss": f"{record['loss']:.3f}", "tok_s": f"{record.get('tokens_per_s', 0):,.0f}"}
            if "score" in record:  # a recipe that samples and scores (PPO)
                postfix["score"] = f"{record['score']:.3f}"
            self.bar.set_postfix(postfix, refresh=False)

    def note(self, message: str) -> None:
        # stderr, not stdout: a piped stdout is block-buffered and a rank torn down for a restart loses its buffer.
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
