"""`herd data`: run the pipeline, show its report, train the classifiers it uses."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import typer

from herd.atomic import make_directory

app = typer.Typer(help="The pretraining data pipeline: filters, de-duplication, classifiers, mix, token shards.",
                  no_args_is_help=True, add_completion=False)


def _fail(message: str) -> None:
    typer.secho(f"herd: error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


def _one_line_errors(fn):
    """Turn any failure into one line on stderr and exit status 1; HERD_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except FileNotFoundError as e:
            if os.environ.get("HERD_DEBUG"):
                raise
            _fail(f"not found: {e.filename}" if e.filename else str(e))
        except Exception as e:
            if os.environ.get("HERD_DEBUG"):
                raise
            _fail(str(e) or type(e).__name__)

    return wrapper


@app.command()
@_one_line_errors
def run(
    inputs: list[str] = typer.Argument(..., help="Input files, directories or globs (JSONL, Parquet, text, HTML, "
                                       "WARC/WET; .gz/.zst/.bz2/.xz)."),
    out: Path = typer.Option(..., "--out", help="Output directory; running again on it resumes."),
    config: Optional[Path] = typer.Option(None, "--config", help="PIPELINE.toml; default: the Llama-3-like pipeline."),
    executor: str = typer.Option("local", "--executor", help="local (this machine's cores) or dask."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="A running dask-scheduler's address "
                                            "(tcp://HOST:PORT); its workers must see the inputs and --out at the same "
                                            "paths. Implies dask."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                         help="Worker processes; default: every core."),
    quality_model: Optional[Path] = typer.Option(None, help="With the default pipeline: a trained quality classifier."),
    domain_model: Optional[Path] = typer.Option(None, help="With the default pipeline: a trained domain classifier."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or tables: the one-line result alone."),
) -> None:
    """Filter, de-duplicate, classify and mix INPUT..., and write token shards, JSONL and a report to --out."""
    from herd.data import pipeline
    from herd.data.config import default_config, load_config
    from herd.data.executors import make_executor
    from herd.data.readers import iter_inputs
    from herd.data.report import render

    if config and (quality_model or domain_model):
        _fail("--quality-model/--domain-model extend the default pipeline; with --config, name them in the TOML")
    if scheduler:
        # a remote worker reads every path from its own working directory: a relative one had named nothing there
        # (or made --out under it), so the run found "no document" in the inputs. Only then: a record without an id
        # is named by a hash of FILE:LINE as given, which a local run keeps free of where the corpus lies.
        inputs = [str(Path(i).absolute()) for i in inputs]
        out = out.absolute()
        quality_model, domain_model = (m.absolute() if m else None for m in (quality_model, domain_model))
    cfg = load_config(config) if config else default_config(quality_model, domain_model)
    for model in (quality_model, domain_model):
        if model and not model.exists():
            _fail(f"classifier not found: {model}")
    try:
        files = iter_inputs(inputs)
    except FileNotFoundError as e:
        _fail(f"input not found: {e}")
    if not files:
        _fail("no input files found")
    try:
        make_directory(out, "--out")
    except OSError as e:
        _fail(str(e))
    ex = make_executor(executor, workers, progress=not quiet, scheduler=scheduler)
    try:
        result = pipeline.run(files, out, cfg, ex)
    finally:
        ex.close()
    for warning in result.warnings:  # even under --quiet: these inputs are missing from the output
        typer.secho(f"herd: warning: {warning}", err=True, fg=typer.colors.YELLOW)
    if not quiet:
        render(result.report)
    # Under --quiet too: it had hidden the run's one-line result, which is no progress bar or table.
    typer.echo(f"{result.manifest['documents']:,} documents, {result.manifest['tokens']:,} tokens in "
               f"{len(result.manifest['shards'])} shard(s) under {out}")


@app.command()
@_one_line_errors
def report(directory: Path = typer.Argument(..., help="A `herd data run` output directory.")) -> None:
    """Print what each stage kept and dropped, and (re)draw DIR/report.png."""
    from herd.data.report import CHART, chart, load_report, render

    data = load_report(directory)
    render(data)
    typer.echo(f"chart: {chart(data, directory / CHART)}")


@app.command("train-classifier")
@_one_line_errors
def train_classifier(
    inputs: list[str] = typer.Argument(None, help="Documents to sample and label (any format `run` reads)."),
    out: Path = typer.Option(..., "--out", help="Where to save the classifier (.npz)."),
    task: str = typer.Option("quality", "--task", help="quality (high/low) or domain (code, math_reasoning, ...)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Model for herd.load; default: the built-in one."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="JSONL of {text, label}: train on these, no judge."),
    sample: int = typer.Option(500, "--sample", min=1, help="How many documents the judge labels."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Label a sample with an LLM judge (as Llama 3 did with Llama 2), fit the fast classifier, save it."""
    from herd.data.classify import TASKS, label_texts, model_judge, train
    from herd.data.document import Document
    from herd.atomic import atomic_output, prepare_output
    from herd.data.readers import iter_inputs, read

    if task not in TASKS:
        _fail(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    out = prepare_output(out, "file", "--out")  # before the judge's work, not after it
    if labels:
        texts, found = _labelled(labels)
    else:
        if not inputs:
            _fail("give INPUT files to label, or --labels")
        texts = _reservoir((d.text for f in iter_inputs(inputs) for d in read(f) if isinstance(d, Document)),
                           sample, seed)
        if not texts:
            _fail("no documents in the inputs")
        import herd

        found = label_texts(texts, model_judge(herd.load(judge), task), task)
        labels_path = out.with_suffix(".labels.jsonl")
        with atomic_output(labels_path) as tmp:
            tmp.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(texts, found)))
        typer.echo(f"labels: {labels_path} ({sum(lab is None for lab in found)} replies unparsed)")
    result = train(texts, found, task, seed=seed)
    result.model.save(out)
    accuracy = (f"held-out accuracy {result.accuracy:.3f}" if result.n_test else
                "no held-out accuracy (a fifth is held out from 10 labelled texts on)")
    typer.echo(f"saved {out}: {result.n_train} train / {result.n_test} held out, {accuracy}, "
               f"labels {result.model.info['label_counts']}")


def _reservoir(items, k: int, seed: int) -> list:
    """A uniform sample of k items in their input order, holding only k at a time (every document had been read
    into one list first: 509 MB for 200 MB of JSONL); the same seed and inputs pick the same sample."""
    import random

    rng = random.Random(seed)
    picked: list[tuple[int, object]] = []
    for n, item in enumerate(items):
        if n < k:
            picked.append((n, item))
        elif (j := rng.randrange(n + 1)) < k:
            picked[j] = (n, item)
    return [item for _, item in sorted(picked, key=lambda p: p[0])]


def _labelled(path: Path) -> tuple[list[str], list[str]]:
    """The texts and labels of a --labels file, every row checked: a DataError naming the row and what to fix
    (a row without its text had been Python's "'text'" alone, a row of another shape an AttributeError)."""
    from herd.rows import DataError, read_jsonl

    texts, labels = [], []
    for where, row in read_jsonl(path):
        for key in ("text", "label"):
            if not isinstance(row.get(key), str):
                raise DataError(f'{where}: "{key}" must be a string, got {json.dumps(row.get(key))}; give rows of '
                                '{"text": ..., "label": ...}')
        texts.append(row["text"])
        labels.append(row["label"])
    return texts, labels


if __name__ == "__main__":
    app()
