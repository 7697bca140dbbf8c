"""Peak memory of a training step: full fine-tuning vs LoRA vs QLoRA (int8 or int4 base weights), each in its own
process.

Resident memory is sampled every few milliseconds while `--steps` AdamW steps run on a batch of random tokens (the
memory does not depend on their values), the loss on every position; loading (which reads float weights in every mode) is measured apart, and the process's
lifetime peak (`ru_maxrss`, loading included) is reported too.

    .venv/bin/python bench/finetune_memory.py [--model PATH] [--steps 3] [--seq 256] [--batch 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


MODES = {"full": None, "lora": "none", "qlora-int8": "int8", "qlora-int4": "int4"}  # mode: LoRA base format


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(mode: str, model: str, steps: int, seq: int, batch: int, threads: int) -> dict:
    import gc
    import resource

    import torch

    import herd
    from herd.posttrain.lora import LoRAConfig, apply_lora
    from herd.posttrain.sft import sft_loss

    torch.set_num_threads(threads)
    llm = herd.load(model, quantize=None)
    net = llm.model.train()
    if mode != "full":
        apply_lora(net, LoRAConfig(rank=16, quantize=MODES[mode]))
    gc.collect()
    loaded = rss_mib()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    tokens = torch.randint(0, net.config.vocab_size, (batch, seq))
    batch_ = {"tokens": tokens, "labels": tokens.roll(-1, 1)}
    peak, done = [loaded], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(steps):
        loss, n = sft_loss(net, batch_)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    done.set()
    watcher.join()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"mode": mode, "trainable_params": trainable, "after_setup_mib": round(loaded),
            "training_peak_mib": round(peak[0]),
            "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args.steps, args.seq, args.batch, args.threads)))
        return
    results = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--one", mode, "--model", args.model, "--steps",
                               str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    full = results[0]["training_peak_mib"]
    for r in results[1:]:
        print(f"{r['mode']}: training peak {r['training_peak_mib']} MiB = {r['training_peak_mib'] / full:.2f}x full")


if __name__ == "__main__":
    main()
