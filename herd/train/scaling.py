"""`herd scaling`: compute-optimal model size and data from an IsoFLOP grid of small runs, as the Llama 3 paper.

For each compute budget C (FLOPs) a few widths of one model family are trained for exactly C / (FLOPs per token)
tokens; the held-out losses against log N trace a parabola whose minimum is that budget's compute-optimal size
N*(C). Power laws N* = A C^a and D* = B C^b are fitted over the budgets (a + b = 1 since C = 6 N D), and the
optimal loss L*(C) = E + K C^-k predicts the loss at a larger budget, whose compute-optimal model is then trained
to measure the prediction's error. N counts the FLOPs-bearing parameters (FLOPs per token / 6, attention
included), so C = 6 N D holds exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from herd.atomic import atomic_output
from herd.bounds import AT_LEAST_ONE, POSITIVE, require, require_value
from herd.train.config import (
    CheckpointSection,
    ConfigError,
    DataSection,
    FaultSection,
    ModelSection,
    ParallelSection,
    RunSection,
    TrainingSection,
)
from herd.train.report import read_records

POINT_FIELDS = ("budget", "dim", "N", "loss")  # what the fit reads of a trained point
TARGET_DIMS = range(16, 1025, 16)  # the widths the target may be trained at


@dataclass
class GridSection:
    budgets: list[float] = field(default_factory=lambda: [1e10, 2e10, 4e10, 8e10])  # FLOPs of the grid runs
    dims: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # widths tried at every budget
    head_dim: int = 16
    dims_per_layer: int = 32  # depth grows with width: n_layers = max(2, dim // dims_per_layer)
    target: float = 3e11  # the larger budget whose loss is predicted, then trained

    def __post_init__(self):
        # here, so that --print-config refuses what would fail in the fit, after the whole grid has trained
        require(self, AT_LEAST_ONE, "head_dim", "dims_per_layer")
        require(self, POSITIVE, "target")
        for name, bounds in (("budgets", POSITIVE), ("dims", AT_LEAST_ONE)):
            for i, value in enumerate(getattr(self, name)):
                require_value(f"{name}[{i}]", value, bounds)
        if len(set(self.budgets)) < 2:
            raise ValueError(f"budgets {self.budgets}: the power laws are fitted over at least two different budgets")
        if not self.dims:
            raise ValueError("dims is empty; give the widths to train at every budget")
        if len(set(self.dims)) < 3:  # two points always fit some curve, and its minimum says nothing
            raise ValueError(f"dims {self.dims}: a budget's parabola is fitted over at least three different widths")


@dataclass
class ScalingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=lambda: TrainingSection(
        batch_size=8, seq_len=128, lr=3e-3, warmup_steps=0, min_lr_ratio=0.1))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(interval=0, keep=1))
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=lambda: RunSection(dir="out/scaling", eval_batches=16, progress=False))
    fault: FaultSection = field(default_factory=FaultSection)
    grid: GridSection = field(default_factory=GridSection)


def family(grid: GridSection, dim: int, base: ModelSection) -> dict:
    heads = max(dim // grid.head_dim, 1)
    return {"dim": dim, "n_layers": max(2, dim // grid.dims_per_layer), "n_heads": heads, "n_kv_heads": heads,
            "multiple_of": 16, "max_seq_len": base.max_seq_len}


def _flops_per_token(config: ScalingConfig, model: ModelSection, vocab: int) -> float:
    from herd.train.metrics import flops_per_token
    from herd.train.pretrain import build_model_config

    return flops_per_token(build_model_config(model, vocab), config.training.seq_len)


def _family_size(config: ScalingConfig, dim: int, vocab: int) -> float:
    """N of the family's model of width `dim`; a ValueError where that width makes none (heads that do not divide it,
    of an odd width, too many layers)."""
    model = dataclasses.replace(config.model, **family(config.grid, dim, config.model))
    return _flops_per_token(config, model, vocab) / 6


def _check_family(config: ScalingConfig, vocab: int) -> dict[int, float]:
    """The sizes of the widths the target may be trained at. A grid width, or a head_dim, that makes no model is
    refused before the grid trains, not when its turn comes or when the target is chosen."""
    for dim in config.grid.dims:
        try:
            _family_size(config, dim, vocab)
        except ValueError as e:
            raise ConfigError(f"grid.dims: {dim} makes no model of the family ({e}); change grid.dims or "
                              "grid.head_dim") from None
    sizes = {}
    for dim in TARGET_DIMS:
        with contextlib.suppress(ValueError):
            sizes[dim] = _family_size(config, dim, vocab)
    if not sizes:
        raise ConfigError(f"grid.head_dim {config.grid.head_dim}: no width from 16 to 1024 makes a model of it; use "
                          "an even head_dim such as 16")
    return sizes


def _setup(config: ScalingConfig) -> str:
    """What a point's training depends on besides its budget and width (the model's other fields, the data, the
    training settings, the family's rule): a point trained under another setup is trained again, not fitted with
    this one's (a changed training.lr had reused every finished point)."""
    parts = (config.model, config.data, config.training, config.grid.head_dim, config.grid.dims_per_layer)
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True,
                      default=str)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _tag(budget: float, dim: int, setup: str) -> str:
    """A point's run directory: the budget in full (1.5e9 and 2e9 had both been "C2e+09", one run)."""
    return f"C{budget:g}-d{dim}-{setup}"


def _point(config: ScalingConfig, budget: float, dim: int, vocab: int, tag: str) -> dict:
    """Train one model of the family for `budget` FLOPs; its size, tokens and held-out loss."""
    from herd.train.pretrain import pretrain, with_overrides

    shape = family(config.grid, dim, config.model)
    model = dataclasses.replace(config.model, **shape)
    fpt = _flops_per_token(config, model, vocab)
    tokens_per_step = config.training.batch_size * config.training.seq_len
    steps = max(round(budget / fpt / tokens_per_step), 1)
    run_dir = Path(config.run.dir) / tag
    cfg = with_overrides(dataclasses.replace(config, model=model),
                         training={"steps": steps, "warmup_steps": max(steps // 10, 1), "anneal_steps": 0},
                         run={"dir": str(run_dir), "eval_interval": 0})
    summary = pretrain(cfg)
    return {"budget": budget, "dim": dim, "n_layers": shape["n_layers"], "N": fpt / 6,
            "tokens": steps * tokens_per_step, "steps": steps, "loss": summary["eval_loss"], "setup": _setup(config)}


def fit(points: list[dict]) -> dict:
    """Per budget: the parabola of loss in log N and its minimum; then the power laws over the budgets whose
    minimum lies inside the widths tried ("bracketed"; the others stay in the result's optima, marked)."""
    for p in points:
        if not math.isfinite(p["loss"]):
            # np.argmin takes a NaN for the minimum, and the laws fitted over it come out NaN.
            raise ValueError(f"the grid run C{p['budget']:g}-d{p['dim']} ended with a held-out loss of {p['loss']}: "
                             "no optimum can be fitted over it; lower training.lr, or leave its width out of grid.dims")
    budgets = sorted({p["budget"] for p in points})
    optima = []
    for c in budgets:
        row = sorted((p for p in points if p["budget"] == c), key=lambda p: p["N"])
        if len({p["N"] for p in row}) < 3:
            raise ValueError(f"budget {c:g} has {len(row)} widths: its parabola needs at least three (grid.dims)")
        x, y = np.log([p["N"] for p in row]), np.array([p["loss"] for p in row])
        a, b, c0 = np.polyfit(x, y, 2)
        bracketed = bool(a > 0 and x.min() <= -b / (2 * a) <= x.max())
        if bracketed:
            log_n = -b / (2 * a)
            loss = float(a * log_n ** 2 + b * log_n + c0)
        else:  # no minimum inside the widths tried: the best one measured, for the plot; the laws leave it out
            i = int(np.argmin(y))
            log_n, loss = float(x[i]), float(y[i])
        n = math.exp(log_n)
        optima.append({"budget": c, "N": n, "D": c / (6 * n), "loss": loss, "bracketed": bracketed,
                       "parabola": [float(a), float(b), float(c0)]})
    # A budget whose best width is an end of the grid has its optimum somewhere past it: fitted over such points
    # the laws had come out as N* ~ C^0 (or C^1.5 from two widths), silently.
    found = [o for o in optima if o["bracketed"]]
    if len(found) < 2:
        missed = ", ".join(f"{o['budget']:g}" for o in optima if not o["bracketed"])
        raise ValueError(f"the IsoFLOP curves of budgets {missed} have no minimum inside the widths tried, leaving "
                         f"{len(found)} of the two the laws need: add grid.dims past the best width of each")
    log_c = np.log([o["budget"] for o in found])
    a_n, log_a = np.polyfit(log_c, np.log([o["N"] for o in found]), 1)
    a_d, log_b = np.polyfit(log_c, np.log([o["D"] for o in found]), 1)
    return {"optima": optima, "N_exponent": float(a_n), "N_coefficient": float(math.exp(log_a)),
            "D_exponent": float(a_d), "D_coefficient": float(math.exp(log_b)), **_loss_law(found)}


def _loss_law(optima: list[dict]) -> dict:
    """L*(C) = E + K C^-k: a power law over an irreducible loss E (fitted from 4 budgets on; with fewer, E = 0)."""
    c = np.array([o["budget"] for o in optima])
    y = np.array([o["loss"] for o in optima])
    slope, log_k = np.polyfit(np.log(c), np.log(y), 1)
    law = {"loss_floor": 0.0, "loss_coefficient": float(math.exp(log_k)), "loss_exponent": float(-slope)}
    if len(optima) >= 4:
        from scipy.optimize import curve_fit

        c0 = c[0]

        def model(x, e, log_k, k):
            return e + np.exp(log_k) * (x / c0) ** -k

        try:
            (e, lk, k), _ = curve_fit(model, c, y, p0=(0.5 * y.min(), math.log(y[0] / 2), max(-slope, 0.05)),
                                      bounds=([0, -20, 0], [y.min(), 20, 3]), maxfev=20000)
            law = {"loss_floor": float(e), "loss_coefficient": float(math.exp(lk) * c0 ** k), "loss_exponent": float(k)}
        # No convergence, or a start outside the bounds (a law steeper than C^-3): keep the plain power law.
        except (RuntimeError, ValueError):
            pass
    return law


def predict(law: dict, budget: float) -> dict:
    n = law["N_coefficient"] * budget ** law["N_exponent"]
    loss = law["loss_floor"] + law["loss_coefficient"] * budget ** -law["loss_exponent"]
    return {"N": n, "D": budget / (6 * n), "loss": loss}


def run_grid(config: ScalingConfig) -> dict:
    """Train the grid (resuming: finished points are read back), fit, predict, train the target, plot."""
    from herd.train.pretrain import check

    _, shards = check(config)
    vocab = shards.tokenizer.get("vocab_size")
    sizes = _check_family(config, vocab)
    out = Path(config.run.dir)  # check() made it
    done_path = out / "points.jsonl"
    setup = _setup(config)
    done = {(p["budget"], p["dim"], p.get("setup")): p
            for p in read_records(done_path, POINT_FIELDS)} if done_path.exists() else {}
    g = config.grid
    for budget in g.budgets:
        for dim in g.dims:
            if (budget, dim, setup) not in done:
                done[(budget, dim, setup)] = _point(config, budget, dim, vocab, _tag(budget, dim, setup))
                # rewritten whole, not appended to: a point cut short by a kill is left out, not written after
                with atomic_output(done_path) as tmp:
                    tmp.write_text("".join(json.dumps(p) + "\n" for p in done.values()))
    points = [done[(b, d, setup)] for b in g.budgets for d in g.dims]
    law = fit(points)
    predicted = predict(law, g.target)
    # The family member closest (in log N) to the predicted optimum, trained at the target budget.
    dim = min(sizes, key=lambda d: abs(math.log(sizes[d] / predicted["N"])))
    actual = done.get((g.target, dim, setup)) or _point(config, g.target, dim, vocab,
                                                        "target-" + _tag(g.target, dim, setup))
    result = {"points": points, "law": law, "target": {"budget": g.target, "predicted": predicted, "dim": dim,
                                                       "actual": actual,
                                                       "error": (actual["loss"] - predicted["loss"]) / actual["loss"]}}
    with atomic_output(out / "scaling.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "scaling.png")
    return result


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law, target = result["law"], result["target"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for opt in law["optima"]:
        row = sorted((p for p in result["points"] if p["budget"] == opt["budget"]), key=lambda p: p["N"])
        line = ax.plot([p["N"] for p in row], [p["loss"] for p in row], "o", label=f"C = {opt['budget']:g}")[0]
        xs = np.linspace(math.log(row[0]["N"]), math.log(row[-1]["N"]), 50)
        a, b, c = opt["parabola"]
        if a > 0:
            ax.plot(np.exp(xs), a * xs ** 2 + b * xs + c, color=line.get_color(), alpha=0.6)
        ax.plot(opt["N"], opt["loss"], "*", color=line.get_color(), markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (FLOPs/token / 6)")
    ax.set_ylabel("held-out loss")
    ax.set_title("IsoFLOP curves")
    ax.legend()
    cs = np.geomspace(min(o["budget"] for o in law["optima"]), target["budget"], 50)
    ax = axes[1]
    found = [o for o in law["optima"] if o["bracketed"]]  # the optima the laws were fitted over
    ax.loglog([o["budget"] for o in found], [o["N"] for o in found], "o", label="N* (grid)")
    ax.loglog(cs, law["N_coefficient"] * cs ** law["N_exponent"], label=f"N* ∝ C^{law['N_exponent']:.2f}")
    ax.loglog([o["budget"] for o in found], [o["D"] for o in found], "s", label="D* (grid)")
    ax.loglog(cs, law["D_coefficient"] * cs ** law["D_exponent"], label=f"D* ∝ C^{law['D_exponent']:.2f}")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_title("compute-optimal size and tokens")
    ax.legend()
    ax = axes[2]
    ax.loglog([o["budget"] for o in found], [o["loss"] for o in found], "o", label="L* (grid)")
    ax.loglog(cs, [predict(law, c)["loss"] for c in cs], label="fit")
    ax.loglog([target["budget"]], [target["predicted"]["loss"]], "x", markersize=12, label="predicted")
    ax.loglog([target["budget"]], [target["actual"]["loss"]], "*", markersize=12,
              label=f"trained ({100 * target['error']:+.1f}%)")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("held-out loss")
    ax.set_title("predicted vs trained")
    ax.legend()
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
