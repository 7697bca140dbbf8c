"""`herd train`, `herd report`, `herd scaling`: thin commands over herd.train (heavy imports happen inside)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# Overrides (--section.field VALUE) are not options typer knows: they are passed through as extra args.
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def config_args(ctx: typer.Context, config_class, command: str, print_config: bool):
    """A config-driven command's CONFIG.toml and --section.field overrides; with --print-config, the complete
    config is printed instead and None returned."""
    from herd.train.config import load_config, to_toml
    from herd.train.launch import split_args

    config_path, overrides = split_args(list(ctx.args))
    if print_config:
        typer.echo(to_toml(load_config(config_class, config_path, overrides)), nl=False)
        return None
    if config_path is None and not overrides:
        raise typer.BadParameter(f"give a CONFIG.toml (herd {command} --print-config writes one)")
    return config_path, overrides


def train_cmd(
    ctx: typer.Context,
    nproc: int = typer.Option(1, "--nproc", help="processes (ranks) on this machine; > 1 launches torchrun"),
    print_config: bool = typer.Option(False, "--print-config", help="print the complete TOML config and exit"),
):
    """Pretrain a Llama 3 model: herd train CONFIG.toml [--section.field VALUE ...]. Run again to resume."""
    from herd.train.config import TrainConfig
    from herd.train.launch import launch

    args = config_args(ctx, TrainConfig, "train", print_config)
    if args is None:
        return
    code = launch(*args, nproc)
    if code:
        raise typer.Exit(code)


# What a step's loss is averaged over, by `herd finetune` recipe: a preference recipe's loss is per example (a pair,
# or a ranked row's pairs averaged), PPO's per reply token; the rest are cross-entropies (KD's teacher-weighted).
LOSS_UNITS = {"dpo": "per preference example", "rm": "per preference example", "ppo": "per reply token"}


def report_cmd(
    run_dir: Path = typer.Argument(..., help="a `herd train` or `herd finetune` run.dir"),
    png: Optional[Path] = typer.Option(None, "--png", help="where to write the plot (default: RUN_DIR/report.png)"),
    baseline: bool = typer.Option(True, help="draw the unigram baseline of the run's shards (a `herd train` run)"),
):
    """Draw a run's loss, learning rate, gradient norm and throughput to a PNG."""
    from herd.data.config import read_toml
    from herd.train.config import TrainConfig, load_config
    from herd.train.report import draw, read_metrics, unigram_loss

    records = read_metrics(run_dir)
    config_path = run_dir / "config.toml"
    raw = read_toml(config_path) if config_path.is_file() else {}
    # A fine-tuning run's config names no shards: its data is rows of dialogs or preferences, with no unigram
    # baseline to draw (reading it as a TrainConfig had failed on its [finetune] section).
    recipe = raw["finetune"].get("recipe", "sft") if isinstance(raw.get("finetune"), dict) else None
    level = None
    if baseline and raw and recipe is None:
        config = load_config(TrainConfig, config_path)
        level = unigram_loss(config.data.shards, config.data.held_out, config.training.seed)
    out = draw(run_dir, png or run_dir / "report.png", level, loss_unit=LOSS_UNITS.get(recipe, "nats/token"))
    last = records[-1]
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    typer.echo(f"step {last['step']}: loss {last['loss']:.3f}" + (f", held-out {evals[-1]:.3f}" if evals else "")
               + (f", unigram baseline {level:.3f}" if level is not None else "") + f"; plot: {out}")


def scaling_cmd(ctx: typer.Context,
                print_config: bool = typer.Option(False, "--print-config", help="print the complete TOML and exit")):
    """Fit compute-optimal size and tokens on an IsoFLOP grid, predict a larger run's loss, train it, plot:
    herd scaling [CONFIG.toml] [--grid.budgets "[1e10, 3e10]"] [--data.shards DIR] ..."""
    from herd.train.config import load_config, to_toml
    from herd.train.launch import split_args
    from herd.train.scaling import ScalingConfig, run_grid

    config_path, overrides = split_args(list(ctx.args))
    config = load_config(ScalingConfig, config_path, overrides)
    if print_config:
        typer.echo(to_toml(config), nl=False)
        return
    result = run_grid(config)
    law, target = result["law"], result["target"]
    typer.echo(f"N* = {law['N_coefficient']:.3g} C^{law['N_exponent']:.3f}, "
               f"D* = {law['D_coefficient']:.3g} C^{law['D_exponent']:.3f}")
    typer.echo(f"at C = {target['budget']:.1e}: predicted loss {target['predicted']['loss']:.4f} "
               f"(N* {target['predicted']['N'] / 1e6:.2f}M), trained dim {target['dim']}: "
               f"{target['actual']['loss']:.4f}; error {100 * target['error']:+.1f}%; "
               f"plot: {config.run.dir}/scaling.png")
