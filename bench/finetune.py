"""Post-training throughput: herd's SFT and DPO recipes (the shared Trainer) against TRL's SFTTrainer and DPOTrainer.

Same model (herd's checkpoint converted to Hugging Face's format for TRL), same dialogs, batch, steps and threads,
full fine-tuning, float32, in one process. Tokens/s counts prompt + reply tokens of the rows trained on; the first
step of each run (warm-up) is not timed. DPO is the original loss on both sides (Llama 3's masking and NLL term off)
with the reference log-probs computed before training on both sides (herd always caches them; TRL's
`precompute_ref_log_probs`), so a step is the policy's forward and backward over chosen and rejected alone.
The two sides alternate `--repeats` times per recipe (herd first, then TRL first, ...) so that a machine shared
with other work slows both alike; the ratio is of the summed tokens over the summed step times.

    .venv/bin/python bench/finetune.py --threads 2 --steps 6 --repeats 2 [--recipes sft,dpo] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

import herd
from herd.checkpoint import convert
from herd.posttrain.finetune import finetune, load_finetune_config


def rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """SFT rows and preference rows of near-constant length (so both sides pad the same)."""
    rng = random.Random(seed)
    sft, pref = [], []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = [{"role": "user", "content": f"What is {a} plus {b}? Show the sum."}]
        good, bad = f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.randint(1, 9)}."
        sft.append({"messages": [*prompt, {"role": "assistant", "content": good}]})
        pref.append({"prompt": prompt, "chosen": {"role": "assistant", "content": good},
                     "rejected": {"role": "assistant", "content": bad}})
    return sft, pref


def herd_times(recipe: str, model: str, data: Path, work: Path, steps: int, batch: int) -> list[float]:
    """The timed steps' durations (all but the first) of one `herd finetune` run."""
    run = Path(tempfile.mkdtemp(prefix=f"herd-{recipe}-", dir=work))
    finetune(load_finetune_config(None, [
        f"--finetune.recipe={recipe}", f"--finetune.model={model}", f"--finetune.data={data}",
        "--finetune.pack=false", f"--run.dir={run}", "--run.progress=false", f"--training.steps={steps}",
        f"--training.batch_size={batch}", "--training.seq_len=512", "--dpo.nll_weight=0",
        "--dpo.mask_formatting=false", "--checkpoint.export_format=hf"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in records if "step_time" in r][1:]


def trl_times(recipe: str, hf_dir: Path, data: list[dict], work: Path, steps: int, batch: int) -> list[float]:
    """The timed steps' durations (all but the first) of one TRL run."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.started)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    common = dict(output_dir=str(work / f"trl-{recipe}"), max_steps=steps, per_device_train_batch_size=batch,
                  learning_rate=1e-5, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                  logging_strategy="no", dataloader_num_workers=0, gradient_checkpointing=False)
    if recipe == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in data])
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                             args=SFTConfig(**common, packing=False), callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"]]}
                                     for r in data])
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, ref_model=ref, processing_class=tokenizer, train_dataset=dataset,
                             args=DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True, max_length=512),
                             callbacks=[Clock()])
    trainer.train()
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="herd/TRL runs per recipe, alternating who goes first")
    p.add_argument("--recipes", default="sft,dpo", help="which of sft, dpo to measure")
    args = p.parse_args()
    if args.steps < 2:  # it had ended in a ZeroDivisionError after both runs
        p.error("--steps must be at least 2: the first step (allocation, warm-up) is not timed")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="herd-bench-finetune-") as tmp:
        work = Path(tmp)
        llm = herd.load(args.model, quantize=None)
        hf_dir = convert(herd.llm.resolve_model_path(args.model), work / "hf", "hf")
        sft, pref = rows(args.batch * args.steps)
        lengths = [len(llm.chat_format.encode_dialog(r["messages"][:1])) + len(
            llm.tokenizer.encode(r["messages"][1]["content"], bos=False)) + 1 for r in sft]
        per_row = sum(lengths) / len(lengths)
        del llm
        for recipe, data in (("sft", sft), ("dpo", pref)):
            if recipe not in args.recipes.split(","):
                continue
            path = work / f"{recipe}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in data))
            step_tokens = args.batch * (2 if recipe == "dpo" else 1) * per_row
            runs = {"herd": lambda: herd_times(recipe, args.model, path, work, args.steps, args.batch),
                    "trl": lambda: trl_times(recipe, hf_dir, data, work, args.steps, args.batch)}
            times: dict[str, list[float]] = {"herd": [], "trl": []}
            for repeat in range(args.repeats):
                for side in (("herd", "trl") if repeat % 2 == 0 else ("trl", "herd")):
                    took = runs[side]()
                    times[side] += took
                    print(json.dumps({"recipe": recipe, "side": side, "repeat": repeat,
                                      "tokens_per_s": round(step_tokens * len(took) / sum(took), 1)}), flush=True)
            ours, theirs = (step_tokens * len(times[s]) / sum(times[s]) for s in ("herd", "trl"))
            print(json.dumps({"recipe": recipe, "herd_tokens_per_s": round(ours, 1),
                              "trl_tokens_per_s": round(theirs, 1), "ratio": round(ours / theirs, 2),
                              "threads": args.threads, "batch": args.batch, "steps": args.steps,
                              "repeats": args.repeats, "tokens_per_row": round(per_row, 1)}), flush=True)


if __name__ == "__main__":
    main()
