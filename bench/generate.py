"""Prefill and decode speed of herd and of Hugging Face transformers on the built-in default model.

Both run in this one process, on the same prompt, with the same thread count; transformers loads the same GGUF
(dequantized to float32, as it does). herd runs twice: as `herd.load()` gives it (int8, since the GGUF was stored
quantized) and in float32 like transformers.

    .venv/bin/python bench/generate.py [--threads 2] [--prompt-tokens 256] [--new-tokens 64] [--png out.png]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import herd
from herd.generate import SamplingParams
from herd.llm import default_model_path


def time_herd(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in llm.generator.stream([prompt], params)]
    return len(prompt) / (stamps[0] - start), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def time_transformers(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])

    def run(n):
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    prefill = run(1)
    return len(prompt) / prefill, (new_tokens - 1) / (run(new_tokens) - prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--png", help="also draw the figures as a bar chart here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = default_model_path()
    contenders = {
        "herd (default: int8)": herd.load(),
        "herd float32": herd.load(quantize=None),
        "transformers float32": AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval(),
    }
    text = open(herd.__file__).read() * 20  # any real text, long enough
    prompt = contenders["herd float32"].tokenizer.encode(text)[: args.prompt_tokens]

    results = {}
    with torch.inference_mode():
        for name, contender in contenders.items():
            runs = [time_herd(contender, prompt, args.new_tokens) if isinstance(contender, herd.LLM)
                    else time_transformers(contender, prompt, args.new_tokens) for _ in range(args.repeats)]
            results[name] = (max(r[0] for r in runs), max(r[1] for r in runs))

    base_prefill, base_decode = results["transformers float32"]
    print(f"{path.name}, {args.threads} threads, prompt {len(prompt)} tokens, {args.new_tokens} new tokens (greedy)")
    print(f"{'':24} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill x':>10} {'decode x':>9}")
    for name, (prefill, decode) in results.items():
        print(f"{name:24} {prefill:14.1f} {decode:13.1f} {prefill / base_prefill:10.2f} {decode / base_decode:9.2f}")
    if args.png:
        plot(results, args.png)


def plot(results: dict[str, tuple[float, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, index, title in ((axes[0], 0, "prefill tokens/s"), (axes[1], 1, "decode tokens/s")):
        axis.barh(list(results), [v[index] for v in results.values()], color=["#2a7", "#5b9", "#888"])
        axis.set_title(title)
        axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
