"""Training throughput of herd and of a plain Hugging Face transformers loop, on the same model, batch and threads.

One process: the same Llama 3 shape built twice (herd's Transformer, transformers' LlamaForCausalLM with the same
weights), the same packed batches of real text, AdamW with the same settings, steps interleaved herd / HF so both
see the same machine load. herd trains as `herd train` does (herd.train's loss under the document mask, its
optimizer, clipping); transformers as its documentation shows (labels in the forward, loss.backward(),
clip_grad_norm_, AdamW), with plain causal attention over the packed rows (it has no document mask for them). Reported: tokens/s, MFU against a float32 matmul peak measured here, and the ratio.

    .venv/bin/python bench/train.py [--threads 2] [--dim 256] [--layers 4] [--seq 256] [--batch 4] [--steps 6]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from herd.model.llama import Transformer
from herd.train.config import ModelSection, TrainingSection
from herd.train.loop import causal_lm_loss
from herd.train.metrics import flops_per_token, measure_peak_flops
from herd.train.optim import build_optimizer, clip_grad_norm
from herd.train.pretrain import build_model_config, init_weights


def hf_model(herd_model: Transformer):
    """transformers' Llama with herd's weights (its q/k rows permuted to HF's rotate-half layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.checkpoint.hf import hf_config, hf_name, rotary_heads, to_hf_rows

    config = LlamaConfig(**{k: v for k, v in hf_config(herd_model.config, torch.float32, None).items()
                            if k not in ("architectures", "torch_dtype")}, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    state = {}
    for name, w in herd_model.state_dict().items():
        heads = rotary_heads(name, herd_model.config)
        state[hf_name(name)] = to_hf_rows(w, heads) if heads else w
    model.load_state_dict(state, strict=True)
    return model


def batches(seq: int, batch: int, vocab: int, n: int, seed: int = 0) -> list[dict]:
    """Packed real text: English fortunes, byte values folded into the vocabulary, several documents a row."""
    from pathlib import Path

    text = Path("/usr/share/games/fortunes/fortunes").read_bytes()
    docs = text.split(b"\n%\n")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens, doc_ids = [], []
        while len(tokens) < batch * (seq + 1):
            d = docs[int(torch.randint(len(docs), (1,), generator=g))]
            tokens += [1] + [b % vocab for b in d] + [2]
            doc_ids += [len(doc_ids) and doc_ids[-1] + 1] * (len(d) + 2)
        t = torch.tensor(tokens[:batch * (seq + 1)]).view(batch, seq + 1)
        docs_t = torch.tensor(doc_ids[:batch * (seq + 1)]).view(batch, seq + 1)
        labels = torch.where(docs_t[:, 1:] == docs_t[:, :-1], t[:, 1:], -100)
        out.append({"tokens": t[:, :-1].contiguous(), "labels": labels, "document_ids": docs_t[:, :-1].contiguous()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps each (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="herd's blocks compiled, as training.compile does")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    section = ModelSection(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                           multiple_of=64)
    config = build_model_config(section, args.vocab)
    herd_model = Transformer(config)
    init_weights(herd_model, 0.02, 0)
    hf = hf_model(herd_model)
    if args.compile:
        for block in herd_model.layers:
            block.compile()
    train_cfg = TrainingSection(lr=1e-3, weight_decay=0.1)
    herd_opt = build_optimizer(herd_model, train_cfg)
    # fused, as transformers' Trainer defaults to (adamw_torch_fused) and herd's optimizer is: the default per-tensor
    # loop had cost the peer some 10% of a step.
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = batches(args.seq, args.batch, args.vocab, args.steps + 1)
    peak = measure_peak_flops(torch.device("cpu"))
    fpt = flops_per_token(config, args.seq)

    def herd_step(batch):
        loss, n = causal_lm_loss(herd_model, batch)
        (loss / n).backward()
        clip_grad_norm(herd_model.parameters(), 1.0)
        herd_opt.step()
        herd_opt.zero_grad(set_to_none=True)
        return float(loss / n)

    def hf_step(batch):
        # transformers shifts the labels itself: position t's label is the token at t (-100 where masked).
        labels = torch.full_like(batch["labels"], -100)
        labels[:, 1:] = batch["labels"][:, :-1]
        loss = hf(input_ids=batch["tokens"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return float(loss)

    times = {"herd": [], "transformers": []}
    losses = {"herd": [], "transformers": []}
    for i, batch in enumerate(data):
        for name, step in (("herd", herd_step), ("transformers", hf_step)):
            start = time.perf_counter()
            losses[name].append(step(batch))
            if i:  # the first step warms up
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    print(f"model: dim {args.dim}, {args.layers} layers, vocab {args.vocab} ({fpt / 6 / 1e6:.1f}M FLOPs-bearing "
          f"parameters); batch {args.batch} x {args.seq} tokens; {args.threads} threads; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    rate = {}
    for name in times:
        rate[name] = tokens / statistics.median(times[name])
        print(f"{name:>13}: {rate[name]:8.0f} tokens/s  MFU {100 * rate[name] * fpt / peak:5.1f}%  "
              f"first/last loss {losses[name][0]:.3f} / {losses[name][-1]:.3f}")
    print(f"herd / transformers: {rate['herd'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
