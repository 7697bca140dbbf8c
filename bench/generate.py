"""herd vs llama.cpp (llama-cpp-python, the same GGUF) vs Hugging Face transformers on the built-in default model
(or the GGUF that --model names):
decode speed of a 128-token chat reply (a story; and a reply that copies code from its prompt, where herd's
prompt-lookup speculative decoding pays most), prefill speed of a 512-token prompt, load time and peak resident
memory. Each engine runs its default path (llama.cpp with flash attention, as its own CLI does by default); herd
also runs without speculative decoding, to show what it adds, and under another quantization scheme where --quantize
names one (fp8, int8, int8-wo, int4, none...). --prompt-tokens 8000 measures a long prompt's prefill instead.

Each engine runs in its own subprocess (so peak RSS is its own), with the same thread count and the same prompts,
and prefills a short unrelated prompt before the timed one (a warm-up, as llama-bench does); the rounds are
interleaved and the best of each is kept, which evens out a shared machine. Ratios are herd / peer.

    .venv/bin/python bench/generate.py [--threads 2] [--rounds 2] [--png docs/generate.png] [--model F.gguf]
                                       [--quantize auto]
    (llama.cpp: `pip install -e ".[bench]"`, which compiles llama-cpp-python; skipped when absent)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

# Read as files, not imported: the llama.cpp worker's peak memory must be llama.cpp's own, not herd's and torch's
# (importing them and loading the model for the chat's ids had added some 260 MB to it).
HERD_SOURCE = Path(__file__).resolve().parents[1] / "herd"
QUESTION = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
_SOURCE = (HERD_SOURCE / "generate" / "speculative.py").read_text()
COPY = [{"role": "user", "content": f"{_SOURCE}\n\nRepeat the function ngram_draft above, exactly."}]
PROMPT_TEXT = (HERD_SOURCE / "llm.py").read_text() * 4  # any real text, long enough
# Prefilled once before the timed prompt, as llama-bench warms up: first-call costs are not prefill speed.
WARMUP_TEXT = _SOURCE
WARMUP_TOKENS = 64


def run_herd(model: str, threads: int, new_tokens: int, prompt_tokens: int, chats: dict,
             quantize: str = "auto") -> dict:
    import torch

    import herd
    from herd.generate import EngineConfig, Generator, SamplingParams
    from herd.generate.speculative import SpeculativeConfig

    torch.set_num_threads(threads)
    start = time.perf_counter()
    llm = herd.load(model, quantize=None if quantize == "none" else quantize)
    load = time.perf_counter() - start
    prompt = llm.tokenizer.encode(PROMPT_TEXT, bos=True)[:prompt_tokens]
    params = SamplingParams(max_tokens=1, temperature=0)
    next(iter(llm.generator.stream([llm.tokenizer.encode(WARMUP_TEXT, bos=True)[:WARMUP_TOKENS]], params)))
    start = time.perf_counter()
    next(iter(llm.generator.stream([prompt], params)))
    prefill = len(prompt) / (time.perf_counter() - start)
    plain = Generator(llm.model, llm.tokenizer, config=EngineConfig(speculative=SpeculativeConfig(draft_tokens=0)))
    result = {"load_s": load, "prefill_tok_s": prefill}
    for key, chat in chats.items():
        for engine, suffix in ((llm.generator, ""), (plain, "_plain")):
            stamps = [time.perf_counter() for _ in engine.stream(
                [chat], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))]
            result[key + suffix] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return result


def run_llama_cpp(model: str, threads: int, new_tokens: int, prompt_tokens: int, chats: dict) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    # flash_attn: llama.cpp's faster attention (its own CLI turns it on by default), 22% faster prefill and 10%
    # faster decode here than llama-cpp-python's default; a context that holds the longest prompt asked for.
    llm = Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=max(2048, prompt_tokens + 64), n_batch=512,
                flash_attn=True, verbose=False)
    load = time.perf_counter() - start
    prompt = llm.tokenize(PROMPT_TEXT.encode())[:prompt_tokens]
    llm.eval(llm.tokenize(WARMUP_TEXT.encode())[:WARMUP_TOKENS])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    result = {"load_s": load, "prefill_tok_s": len(prompt) / (time.perf_counter() - start)}
    for key, chat in chats.items():
        llm.reset()
        stamps = []
        for _ in llm.generate(chat, top_k=1, temp=0.0, reset=True):  # the ids herd decodes from
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        result[key] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return result


def chat_ids(model: str) -> dict[str, list[int]]:
    """The two chats' prompt ids, as herd's chat format encodes them: every engine decodes from the same ids."""
    from herd.checkpoint import load_checkpoint
    from herd.tokenizer import chat_format_for

    chat_format = chat_format_for(load_checkpoint(model).tokenizer)
    return {key: chat_format.encode_dialog(messages) for key, messages in (("decode_tok_s", QUESTION),
                                                                           ("copy_tok_s", COPY))}


def run_transformers(model_path: str, threads: int, new_tokens: int, prompt_tokens: int, chats: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    path = Path(model_path)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load = time.perf_counter() - start
    prompt = torch.tensor([tokenizer(PROMPT_TEXT)["input_ids"][:prompt_tokens]])
    with torch.inference_mode():
        model(torch.tensor([tokenizer(WARMUP_TEXT)["input_ids"][:WARMUP_TOKENS]]))
        start = time.perf_counter()
        model(prompt, logits_to_keep=1)  # the next token's logits only, as herd and llama.cpp compute a prompt
        prefill = prompt.shape[1] / (time.perf_counter() - start)
        result = {"load_s": load, "prefill_tok_s": prefill}
        for key, ids in chats.items():
            chat = torch.tensor([ids])
            start = time.perf_counter()
            model.generate(chat, max_new_tokens=1, do_sample=False, pad_token_id=0)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(chat, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
            result[key] = (new_tokens - 1) / (time.perf_counter() - start - first)
    return result


ENGINES = {"herd": run_herd, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def worker(name: str, model: str, threads: int, new_tokens: int, prompt_tokens: int, quantize: str,
           chats: dict) -> None:
    warnings.filterwarnings("ignore")
    scheme = {"quantize": quantize} if name == "herd" else {}
    result = ENGINES[name](model, threads, new_tokens, prompt_tokens, chats, **scheme)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each figure is kept")
    parser.add_argument("--engines", default="herd,llama.cpp,transformers")
    parser.add_argument("--model", help="a GGUF file (default: the built-in default model)")
    parser.add_argument("--png", help="also draw the ratios here")
    parser.add_argument("--quantize", default="auto", help="herd's scheme (auto: its default path)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.threads, args.new_tokens, args.prompt_tokens, args.quantize,
                      json.loads(args.chats))
    from herd.llm import default_model_path

    model = args.model or str(default_model_path())
    chats = json.dumps(chat_ids(model))
    engines = args.engines.split(",")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in engines:
            done = subprocess.run([sys.executable, __file__, "--worker", name, "--model", model,
                                   "--threads", str(args.threads),
                                   "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
                                   "--quantize", args.quantize, "--chats", chats],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: skipped ({(done.stderr.strip().splitlines() or ['failed'])[-1]})", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            old = best.setdefault(name, result)
            for key, value in result.items():
                old[key] = min(old[key], value) if key in ("load_s", "peak_rss_mb") else max(old[key], value)
    print(f"{Path(model).name}, {args.threads} threads, decode {args.new_tokens} tokens of a chat reply, "
          f"prefill {args.prompt_tokens} tokens, herd under {args.quantize}, best of {args.rounds} interleaved rounds; "
          "load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min; above {os.cpu_count()}: a shared machine)")
    keys = ("decode_tok_s", "copy_tok_s", "prefill_tok_s", "load_s", "peak_rss_mb")
    print(f"{'':14}" + "".join(f"{k:>15}" for k in keys))
    for name, result in best.items():
        print(f"{name:14}" + "".join(f"{result[k]:15.2f}" for k in keys))
    if "herd" in best:
        herd_result = best["herd"]
        print(f"herd without speculative decoding: decode {herd_result['decode_tok_s_plain']:.2f}, copy "
              f"{herd_result['copy_tok_s_plain']:.2f} tok/s; prompt lookup gains "
              f"{herd_result['decode_tok_s'] / herd_result['decode_tok_s_plain']:.2f}x and "
              f"{herd_result['copy_tok_s'] / herd_result['copy_tok_s_plain']:.2f}x")
    for peer in (p for p in best if p != "herd"):
        if "herd" in best:
            ratios = {k: best["herd"][k] / best[peer][k] for k in keys}
            plain = best["herd"]["decode_tok_s_plain"] / best[peer]["decode_tok_s"]
            plain_copy = best["herd"]["copy_tok_s_plain"] / best[peer]["copy_tok_s"]
            print(f"herd / {peer}: decode {ratios['decode_tok_s']:.2f}x ({plain:.2f}x without drafts), copy "
                  f"{ratios['copy_tok_s']:.2f}x ({plain_copy:.2f}x without drafts), prefill "
                  f"{ratios['prefill_tok_s']:.2f}x, load time "
                  f"{ratios['load_s']:.2f}x, peak RSS {ratios['peak_rss_mb']:.2f}x")
    if args.png:
        plot(best, keys, args.png)


def plot(best: dict, keys: tuple, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(14, 3))
    for axis, key in zip(axes, keys):
        axis.barh(list(best), [best[n][key] for n in best], color=["#2a7", "#58c", "#888"][: len(best)])
        axis.set_title(key.replace("_", " ") + (" (lower is better)" if key in ("load_s", "peak_rss_mb") else ""))
        axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
