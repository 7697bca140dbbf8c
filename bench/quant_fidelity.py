"""Fidelity of every quantization scheme on the default model: KL from the float32 logits (mean, p99), top-1
agreement and perplexity over 512 tokens (--tokens) of the GPL-3 text in tests/quant/data; a table and a PNG.

    .venv/bin/python bench/quant_fidelity.py [--tokens 512] [--png docs/quant-fidelity.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path


import herd
from herd.quant.fidelity import compare, logits
from herd.quant.schemes import Scheme

TEXT = Path(__file__).parent.parent / "tests" / "quant" / "data" / "GPL-3.txt"
# (label, scheme, how the tokens are fed: None = as one prompt, 8 = eight at a time as decoding does)
RUNS = [("default (GGUF Q4_1 blocks), decode path", "auto", 8), ("default, prompt path", "auto", None),
        ("int8", "int8", 8), ("int8-wo", "int8-wo", 8), ("fp8", "fp8", None),
        ("fp8, Meta's 405B recipe (FFN of layers 1..n-2)", "fp8-meta", None), ("int4-g32", "int4-g32", 8),
        ("int4-g64", "int4-g64", 8), ("int4-g64-gptq", "int4-g64-gptq", 8)]


def scheme(name: str, n_layers: int) -> str | Scheme:
    """fp8-meta: FP8 only in the feed-forward layers, the first and last layers and attention kept high precision."""
    if name != "fp8-meta":
        return name
    return Scheme("fp8", keep=("output", "*.attention.*", "layers.0.*", f"layers.{n_layers - 1}.*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--png")
    args = parser.parse_args()
    reference = herd.load(quantize=None)
    ids = reference.tokenizer.encode(TEXT.read_text(), bos=True)[: args.tokens]
    ref = logits(reference.model, ids)
    rows = {}
    for label, name, step in RUNS:
        model = herd.load(quantize=scheme(name, reference.model.config.n_layers)).model
        fidelity = compare(ref, logits(model, ids, step=step), ids)
        rows[label] = fidelity
        print(f"{label:42} KL mean {fidelity.kl_mean:.4f}  p99 {fidelity.kl_p99:.4f}  top-1 {fidelity.top1:.3f}  "
              f"ppl {fidelity.ppl:.2f} (float32 {fidelity.ppl_reference:.2f})", flush=True)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(figsize=(9, 4))
        axis.barh(list(rows), [f.kl_mean for f in rows.values()], color="#2a7")
        axis.axvline(0.005, color="#c33", linestyle="--", label="goal 0.005")
        axis.axvline(0.0039, color="#888", linestyle=":", label="llama.cpp Q4_1 0.0039")
        axis.set_xscale("symlog", linthresh=1e-3)  # schemes span 0 to 0.5: linear up to 0.001, then log
        axis.set_xlabel(f"KL(float32 || scheme), nats/token, mean over {len(ids)} tokens of GPL-3")
        axis.invert_yaxis()
        axis.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
