"""`herd train`, `herd report`, `herd scaling`: thin commands over herd.train (heavy imports happen inside)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# Overrides (--section.field VALUE) are not options typer knows: they are passed through as extra args.
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def train_cmd(
    ctx: typer.Context,
    nproc: int = typer.Option(1, "--nproc", help="processes (ranks) on this machine; > 1 launches torchrun"),
    print_config: bool = typer.Option(False, "--print-config", help="print the complete TOML config and exit"),
):
    """Pretrain a Llama 3 model: herd train CONFIG.toml [--section.field VALUE ...]. Run again to resume."""
    from herd.train.config import TrainConfig, load_config, to_toml
    from herd.train.launch import launch, split_args

    config_path, overrides = split_args(list(ctx.args))
    if print_config:
        typer.echo(to_toml(load_config(TrainConfig, config_path, overrides)), nl=False)
        return
    if config_path is None and not overrides:
        raise typer.BadParameter("give a CONFIG.toml (herd train --print-config writes one)")
    code = launch(config_path, overrides, nproc)
    if code:
        raise typer.Exit(code)
