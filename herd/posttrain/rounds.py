"""Rounds of Llama 3's post-training: sample → score → select → SFT → DPO, each round from the last one's model.

Every round draws K replies per prompt from the current model (rejection sampling; all of them, scored, are kept in
`samples.jsonl`), keeps each prompt's best as SFT data and its best-versus-worst as preference pairs, fine-tunes on the first (`herd finetune` recipe sft), then
runs DPO from there on the second. Stages are ordinary `herd finetune` runs under `out_dir/round-N/`, so each
can be inspected, resumed or reused; `on_stage(name, model_path)` lets a caller measure every stage.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from herd.posttrain import rejection
from herd.posttrain.finetune import finetune, load_finetune_config


def run_rounds(model: str, prompts: Sequence[dict], scorer: rejection.Scorer, out_dir: str | Path, *,
               rounds: int = 1, sample: rejection.SampleConfig | None = None, sft_overrides: Sequence[str] = (),
               dpo_overrides: Sequence[str] = (), sample_quantize: str | None = "int8",
               on_stage: Callable[[str, str], None] | None = None) -> str:
    """Run `rounds` rounds from `model`; returns the final model's path. Overrides are `--section.field=VALUE`."""
    import herd

    sample = sample or rejection.SampleConfig()
    out_dir = Path(out_dir)
    current = model
    for r in range(1, rounds + 1):
        here = out_dir / f"round-{r}"
        llm = herd.load(current, quantize=sample_quantize)
        samples = rejection.generate_samples(llm, prompts, sample)
        del llm
        rejection.score(samples, scorer)
        rejection.write_jsonl(({**s.row, "replies": s.replies, "scores": s.scores} for s in samples),
                              here / "samples.jsonl")
        sft_rows = rejection.best_rows(samples, sample.min_score)
        pairs = rejection.preference_rows(samples)
        if not sft_rows:
            raise ValueError(f"round {r}: no reply reached the minimum score; sample more (k) or lower min_score")
        rejection.write_jsonl(sft_rows, here / "sft.jsonl")
        rejection.write_jsonl(pairs, here / "pairs.jsonl")
        current = _stage("sft", current, here / "sft.jsonl", here / "sft", sft_overrides)
        if on_stage:
            on_stage(f"round {r}: SFT", current)
        if pairs:
            current = _stage("dpo", current, here / "pairs.jsonl", here / "dpo", dpo_overrides)
            if on_stage:
                on_stage(f"round {r}: DPO", current)
    return current


def _stage(recipe: str, model: str, data: Path, run_dir: Path, overrides: Sequence[str]) -> str:
    config = load_finetune_config(None, [f"--finetune.recipe={recipe}", f"--finetune.model={model}",
                                         f"--finetune.data={data}", f"--run.dir={run_dir}", *overrides])
    finetune(config)
    return str(run_dir / "model")
