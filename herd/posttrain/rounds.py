"""Rounds of Llama 3's post-training: sample → score → select → SFT → DPO, each round from the last one's model.

Every round draws K replies per prompt from the current model (rejection sampling; all of them, scored, are kept in
`samples.jsonl`), keeps each prompt's best as SFT data and fine-tunes on it (`herd finetune` recipe sft). DPO
then runs from the SFT model on best-versus-worst pairs of replies that the SFT model itself samples
(`dpo-samples.jsonl`): as in Llama 3, preference data comes from the latest policy, and pairs drawn from the
model before SFT teach the new one about mistakes it no longer makes (measured on the gains benchmark: DPO on the
pre-SFT pairs lost 16 of SFT's 90 held-out successes). `pairs_from="before"` uses the first samples instead (one
sampling pass per round). Stages are ordinary `herd finetune` runs under `out_dir/round-N/`, so each can be
inspected, resumed or reused (a stage resumes only on the data it was trained on, recorded in its directory: run
again with other prompts, it refuses, since the old checkpoints would stand beside the new data); `on_stage(name,
model_path)` lets a caller measure every stage.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from herd.posttrain import rejection
from herd.posttrain.finetune import finetune, load_finetune_config


def run_rounds(model: str, prompts: Sequence[dict], scorer: rejection.Scorer, out_dir: str | Path, *,
               rounds: int = 1, sample: rejection.SampleConfig | None = None, sft_overrides: Sequence[str] = (),
               dpo_overrides: Sequence[str] = (), sample_quantize: str | None = "int8", pairs_from: str = "sft",
               pairs_per_prompt: int = 1, on_stage: Callable[[str, str], None] | None = None) -> str:
    """Run `rounds` rounds from `model`; returns the final model's path. Overrides are `--section.field=VALUE`;
    pairs_from: "sft" (DPO pairs sampled from the SFT model) or "before" (from the round's first samples);
    pairs_per_prompt: preference pairs drawn from each prompt's samples (best vs worst, then the next ones)."""
    if pairs_from not in ("sft", "before"):
        raise ValueError(f"pairs_from must be 'sft' or 'before', not {pairs_from!r}")
    sample = sample or rejection.SampleConfig()
    out_dir = Path(out_dir)
    current = model
    for r in range(1, rounds + 1):
        here = out_dir / f"round-{r}"
        samples = _sample(current, prompts, scorer, sample, sample_quantize, here / "samples.jsonl")
        sft_rows = rejection.best_rows(samples, sample.min_score)
        if not sft_rows:
            raise ValueError(f"round {r}: no prompt has a reply to keep (each was cut off at max_tokens, failed its "
                             "verifier or scored under min_score); sample more (k), raise max_tokens or lower "
                             "min_score")
        current = _stage("sft", current, sft_rows, here / "sft.jsonl", here / "sft", sft_overrides)
        if on_stage:
            on_stage(f"round {r}: SFT", current)
        if pairs_from == "sft":
            samples = _sample(current, prompts, scorer, sample, sample_quantize, here / "dpo-samples.jsonl")
        pairs = rejection.preference_rows(samples, pairs_per_prompt)
        if pairs:
            current = _stage("dpo", current, pairs, here / "pairs.jsonl", here / "dpo", dpo_overrides)
            if on_stage:
                on_stage(f"round {r}: DPO", current)
        else:
            rejection.write_jsonl(pairs, here / "pairs.jsonl")
    return current


def _sample(model: str, prompts: Sequence[dict], scorer: rejection.Scorer, config: rejection.SampleConfig,
            quantize: str | None, path: Path) -> list[rejection.Sampled]:
    """K scored replies per prompt from `model`, all of them written to `path`."""
    import herd

    llm = herd.load(model, quantize=quantize)
    samples = rejection.generate_samples(llm, prompts, config)
    del llm
    rejection.score(samples, scorer)
    rejection.write_jsonl(({**s.row, "replies": s.replies, "scores": s.scores, "finish_reasons": s.finish_reasons}
                           for s in samples), path)
    return samples


def _stage(recipe: str, model: str, rows: list[dict], data: Path, run_dir: Path, overrides: Sequence[str]) -> str:
    """Fine-tune `model` on `rows`, written to `data`, as `herd finetune` in `run_dir`; a run already there is
    resumed only if it was trained on the same rows (refused before `data` is overwritten)."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    record = run_dir / "data.sha256"
    if run_dir.is_dir() and any(run_dir.iterdir()) and (not record.is_file() or record.read_text().strip() != digest):
        raise ValueError(f"{run_dir} holds a {recipe} run trained on other data than this run's {data.name} (or on "
                         "data it did not record), which resuming would mix; give run_rounds a new out_dir")
    rejection.write_jsonl(rows, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(digest + "\n")
    config = load_finetune_config(None, [f"--finetune.recipe={recipe}", f"--finetune.model={model}",
                                         f"--finetune.data={data}", f"--run.dir={run_dir}", *overrides])
    finetune(config)
    return str(run_dir / "model")
