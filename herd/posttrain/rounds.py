"""Rounds of Llama 3's post-training: sample → score → select → SFT → DPO, each round from the last one's model.

Every round draws K replies per prompt from the current model (rejection sampling; all of them, scored, are kept in
`samples.jsonl`), keeps each prompt's best as SFT data and fine-tunes on it (`herd finetune` recipe sft). DPO
then runs from the SFT model on best-versus-worst pairs of replies that the SFT model itself samples
(`dpo-samples.jsonl`): as in Llama 3, preference data comes from the latest policy, and pairs drawn from the
model before SFT teach the new one about mistakes it no longer makes (measured on the gains benchmark: DPO on the
pre-SFT pairs lost 16 of SFT's 90 held-out successes). `pairs_from="before"` uses the first samples instead (one
sampling pass per round). Stages are ordinary `herd finetune` runs under `out_dir/round-N/`, so each can be
inspected, resumed or reused; `on_stage(name, model_path)` lets a caller measure every stage.
"""
from __future__ import annotations

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
            raise ValueError(f"round {r}: no reply reached the minimum score; sample more (k) or lower min_score")
        rejection.write_jsonl(sft_rows, here / "sft.jsonl")
        current = _stage("sft", current, here / "sft.jsonl", here / "sft", sft_overrides)
        if on_stage:
            on_stage(f"round {r}: SFT", current)
        if pairs_from == "sft":
            samples = _sample(current, prompts, scorer, sample, sample_quantize, here / "dpo-samples.jsonl")
        pairs = rejection.preference_rows(samples, pairs_per_prompt)
        rejection.write_jsonl(pairs, here / "pairs.jsonl")
        if pairs:
            current = _stage("dpo", current, here / "pairs.jsonl", here / "dpo", dpo_overrides)
            if on_stage:
                on_stage(f"round {r}: DPO", current)
    return current


def _sample(model: str, prompts: Sequence[dict], scorer: rejection.Scorer, config: rejection.SampleConfig,
            quantize: str | None, path: Path) -> list[rejection.Sampled]:
    """K scored replies per prompt from `model`, all of them written to `path`."""
    import herd

    llm = herd.load(model, quantize=quantize)
    samples = rejection.generate_samples(llm, prompts, config)
    del llm
    rejection.score(samples, scorer)
    rejection.write_jsonl(({**s.row, "replies": s.replies, "scores": s.scores} for s in samples), path)
    return samples


def _stage(recipe: str, model: str, data: Path, run_dir: Path, overrides: Sequence[str]) -> str:
    config = load_finetune_config(None, [f"--finetune.recipe={recipe}", f"--finetune.model={model}",
                                         f"--finetune.data={data}", f"--run.dir={run_dir}", *overrides])
    finetune(config)
    return str(run_dir / "model")
