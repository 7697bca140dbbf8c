"""`herd finetune` and `herd sample`: thin commands over herd.posttrain (heavy imports happen inside)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from herd.cli import DtypeOpt
from herd.train.cli import LOSS_UNITS, config_args


def finetune_cmd(
    ctx: typer.Context,
    print_config: bool = typer.Option(False, "--print-config", help="print the complete TOML config and exit"),
):
    """Post-train a model: herd finetune CONFIG.toml [--section.field VALUE ...]; recipe = sft | rm | dpo | ppo | kd.
    Run again to resume."""
    import time

    from herd.posttrain.finetune import FinetuneConfig, finetune, load_finetune_config
    from herd.train.report import read_metrics

    args = config_args(ctx, FinetuneConfig, "finetune", print_config)
    if args is None:
        return
    started = time.monotonic()
    config = load_finetune_config(*args)
    summary = finetune(config)
    typer.echo(json.dumps(summary))
    # For a person, on stderr as herd train's: stdout stays the one JSON summary that scripts read.
    run_dir, unit = Path(config.run.dir), LOSS_UNITS.get(config.finetune.recipe, "nats/token")
    trained = [r for r in read_metrics(run_dir) if "skipped" not in r] if (run_dir / "metrics.jsonl").is_file() else []
    line = f"trained {summary['step']} steps, {summary['tokens']:,} tokens"
    if trained:
        line += f", loss {trained[-1]['loss']:.4f} {unit}"
    if summary.get("eval_loss") is not None:
        line += f", held-out loss {summary['eval_loss']:.4f} {unit}"
    typer.echo(f"{line}, in {time.monotonic() - started:.1f} s; model in {run_dir / 'model'}", err=True)


def sample_cmd(
    model: str = typer.Argument(..., help="the checkpoint to sample from (or default)"),
    prompts: Path = typer.Argument(..., help='JSONL of {"messages": [...]} prompts (plus what the scorer reads)'),
    out: Path = typer.Option(..., "--out", "-o", help="SFT rows: each prompt with its best reply"),
    k: int = typer.Option(16, "--k", help="samples per prompt"),
    verifier: Optional[str] = typer.Option(None, help="answer, only_answer, python_tests, or module:function"),
    reward_model: Optional[Path] = typer.Option(None, help="a `herd finetune` reward model (run.dir/model)"),
    pairs: Optional[Path] = typer.Option(None, help="also write preference rows (best vs worst reply)"),
    pairs_per_prompt: int = typer.Option(1, help="preference rows per prompt: best vs worst, then the next ones"),
    min_score: Optional[float] = typer.Option(None, help="keep a prompt's best reply only from this score up"),
    temperature: float = typer.Option(0.8),
    top_p: float = typer.Option(0.95),
    max_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(32, help="sequences per generation batch"),
    seed: int = typer.Option(0),
    quantize: str = typer.Option("auto", help="int8, none, or auto"),
    device: Optional[str] = typer.Option(None),
    dtype: str = DtypeOpt,
):
    """Rejection sampling: K replies per prompt, scored by a verifier or a reward model, the best kept."""
    from herd.cli import _load, _status
    from herd.posttrain import rejection

    if (verifier is None) == (reward_model is None):
        raise typer.BadParameter("give exactly one scorer: --verifier or --reward-model")
    if k < 1 or pairs_per_prompt < 1:
        raise typer.BadParameter("--k and --pairs-per-prompt must be at least 1")
    from herd.atomic import prepare_output

    out = prepare_output(out, "file", "--out")  # before the sampling, which an unwritable path would waste
    pairs = None if pairs is None else prepare_output(pairs, "file", "--pairs")
    for option, path in (("--out", out), ("--pairs", pairs)):
        if path is not None and path.resolve() == prompts.resolve():
            raise typer.BadParameter(f"{option} is the prompts file {prompts}, which writing would destroy; give "
                                     "another path")
    if pairs is not None and pairs.resolve() == out.resolve():
        raise typer.BadParameter("--pairs and --out are one file; give each its own")
    # Checked before the model loads, as herd generate checks its options.
    config = rejection.SampleConfig(k=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                    batch_size=batch_size, seed=seed, min_score=min_score)
    from herd.posttrain.verify import NEEDS, ROW_CHECKS, load_verifier

    rows = rejection.read_prompts(prompts, NEEDS.get(verifier), ROW_CHECKS.get(verifier))
    if verifier is not None:
        scorer = rejection.verifier_scorer(load_verifier(verifier))
    else:
        scorer = rejection.reward_scorer(reward_model)
    llm = _load(model, quantize, device, dtype=dtype)
    samples = rejection.generate_samples(llm, rows, config)
    rejection.score(samples, scorer)
    kept = rejection.write_jsonl(rejection.best_rows(samples, min_score), out)
    _status(f"kept {kept} of {len(rows)} prompts in {out}")
    if pairs is not None:
        _status(f"wrote {rejection.write_jsonl(rejection.preference_rows(samples, pairs_per_prompt), pairs)} preference rows to {pairs}")
