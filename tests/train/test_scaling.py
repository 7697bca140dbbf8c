"""The IsoFLOP fit recovers the compute-optimal exponents of a known loss surface (Chinchilla's functional form)."""
import math
import re

import pytest

from herd.train.scaling import fit, predict

E, A, B, ALPHA, BETA = 1.7, 400.0, 410.0, 0.34, 0.28


def loss(n: float, d: float) -> float:
    return E + A / n ** ALPHA + B / d ** BETA


def test_isoflop_fit_finds_the_compute_optimal_exponents():
    points = []
    for c in (1e15, 1e16, 1e17, 1e18):
        # Sizes around the analytic optimum, on a log grid, as a real grid would be laid out.
        n_opt = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (c / 6) ** (BETA / (ALPHA + BETA))
        for f in (1 / 8, 1 / 3, 1, 3, 8):
            n = n_opt * f
            points.append({"budget": c, "N": n, "loss": loss(n, c / (6 * n))})
    law = fit(points)
    assert law["N_exponent"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)
    assert law["D_exponent"] == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.02)
    assert law["N_exponent"] + law["D_exponent"] == pytest.approx(1.0, abs=1e-6)
    for opt in law["optima"]:
        n_opt = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (opt["budget"] / 6) ** (BETA / (ALPHA + BETA))
        assert math.log(opt["N"] / n_opt) == pytest.approx(0, abs=0.15)
    # One budget further out, the optimal loss is predicted within a few percent.
    c = 1e19
    n_best = min((c / 6) ** 0.5 * 10 ** (k / 50) for k in range(-150, 150))
    best = min(loss(n, c / (6 * n)) for n in ((c / 6) ** 0.5 * 10 ** (k / 50) for k in range(-150, 150)))
    assert n_best > 0
    assert predict(law, c)["loss"] == pytest.approx(best, rel=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_grid_run_is_refused_naming_it(bad):
    points = [{"budget": c, "dim": d, "N": n, "loss": 3.0 - 0.1 * j + 0.05 * (i - 1) ** 2}
              for j, c in enumerate((1e10, 2e10)) for i, (d, n) in enumerate(((32, 1e5), (64, 2e5), (128, 4e5)))]
    points[1]["loss"] = bad  # np.argmin had taken a NaN for the optimum, and the laws came out NaN
    with pytest.raises(ValueError, match=f"the grid run C1e\\+10-d64 ended with a held-out loss of {bad}: "):
        fit(points)


def test_the_laws_are_fitted_over_budgets_whose_minimum_the_grid_brackets():
    """A budget whose best width is an end of the grid has its optimum past it: fitted over its best measured point,
    the laws had come out N* ~ C^0 without a word. Such a budget is left out of the laws, and a grid that brackets
    the optimum of fewer than two budgets is refused."""
    def bowl(c, n):  # the optimum N*(C) = 2e5 (C / 1e10)^0.5
        return 3 - 0.1 * math.log10(c) + 0.1 * math.log(n / (2e5 * (c / 1e10) ** 0.5)) ** 2

    widths = (1e5, 2e5, 4e5, 8e5)
    points = [{"budget": c, "N": n, "loss": bowl(c, n)} for c in (1e10, 4e10, 1.6e11) for n in widths]
    points += [{"budget": 1e13, "N": n, "loss": bowl(1e13, n)} for n in widths]  # optimum 6.3e6, past 8e5
    law = fit(points)
    assert [o["bracketed"] for o in law["optima"]] == [True, True, True, False]
    assert law["N_exponent"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="budgets 1e\\+12, 1e\\+13 have no minimum inside the widths tried"):
        fit([p for p in points if p["budget"] == 1e10] + [{**p, "budget": 1e12, "loss": bowl(1e12, p["N"])}
                                                          for p in points if p["budget"] == 1e13] +
            [p for p in points if p["budget"] == 1e13])


def test_a_loss_law_too_steep_for_the_fit_bounds_is_the_plain_power_law():
    # L* = 100 (C / 1e10)^-4 over 4 budgets: the fit's start (k = 4) is outside its bounds (k <= 3), a ValueError.
    points = [{"budget": c, "N": n, "loss": 100 * (c / 1e10) ** -4 + 0.01 * (math.log(n) - 12) ** 2}
              for c in (1e10, 2e10, 4e10, 8e10) for n in (1e5, 2e5, 4e5)]
    law = fit(points)
    assert law["loss_floor"] == 0.0 and law["loss_exponent"] == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("args, words", [
    (["--grid.head_dim", "0"], "grid: head_dim must be at least 1, got 0"),  # had been a ZeroDivisionError
    (["--grid.dims_per_layer", "0"], "grid: dims_per_layer must be at least 1, got 0"),
    (["--grid.budgets", "[-1.0, 0.0]"], "grid: budgets[0] must be above 0, got -1.0"),  # LAPACK's complaints
    (["--grid.budgets", "[]"], "grid: budgets []: the power laws are fitted over at least two different budgets"),
    (["--grid.budgets", "[1e10, 1e10]"], "at least two different budgets"),
    (["--grid.target", "-5"], "grid: target must be above 0, got -5.0"),  # had failed after the whole grid trained
    (["--grid.target", "nan"], "grid: target must be above 0, got nan"),
    (["--grid.dims", "[0]"], "grid: dims[0] must be at least 1, got 0"),
    (["--grid.dims", "[]"], "grid: dims is empty"),
    (["--grid.dims", "[32, 64, 64]"], "a budget's parabola is fitted over at least three different widths"),
])
def test_grid_values_out_of_range_are_one_line_errors_naming_the_field(args, words):
    from herd.train.config import ConfigError, load_config
    from herd.train.scaling import ScalingConfig

    with pytest.raises(ConfigError) as e:
        load_config(ScalingConfig, None, args)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, words", [
    (["--grid.dims", "[32, 33, 64]"], "grid.dims: 33 makes no model of the family (model: dim 33 is not a multiple"),
    (["--grid.head_dim", "3"], "grid.dims: 16 makes no model of the family"),
])
def test_a_grid_width_that_makes_no_model_is_refused_before_the_grid_trains(byte_shards, tmp_path, args, words):
    from herd.train.config import ConfigError, load_config
    from herd.train.scaling import ScalingConfig, run_grid

    config = load_config(ScalingConfig, None, ["--data.shards", str(byte_shards), "--run.dir", str(tmp_path / "sc"),
                                               "--grid.dims", "[16, 32, 48]", *args])
    with pytest.raises(ConfigError, match=re.escape(words)):
        run_grid(config)
    assert list((tmp_path / "sc").iterdir()) == []  # nothing trained


def test_each_budget_and_each_setup_trains_points_of_its_own(byte_shards, tmp_path):
    """Budgets 1.5e9 and 2e9 had shared one run directory ("C2e+09"), the smaller budget reading back the larger's
    model; and a grid run again with another training.lr had fitted the points trained under the first."""
    import json

    from herd.train.config import load_config
    from herd.train.scaling import ScalingConfig, run_grid

    def grid(*args):
        config = load_config(ScalingConfig, None, [
            "--data.shards", str(byte_shards), "--run.dir", str(tmp_path / "sc"), "--grid.budgets", "[2e9, 1.5e9]",
            "--grid.dims", "[16, 24, 32]", "--training.seq_len", "64", "--training.batch_size", "4",
            "--run.eval_batches", "2", "--run.peak_flops", "1e11", *args])
        with pytest.raises(ValueError, match="no minimum inside the widths tried"):  # too small a grid to bracket
            run_grid(config)
        return [json.loads(line) for line in (tmp_path / "sc" / "points.jsonl").read_text().splitlines()]

    points = grid()
    assert len(points) == 6 and len({p["loss"] for p in points}) == 6
    assert {p["budget"]: p["tokens"] for p in points if p["dim"] == 16} == {2e9: 22528, 1.5e9: 16896}
    again = grid("--training.lr", "1e-2")
    assert len(again) == 12 and len({p["setup"] for p in again}) == 2 and again[:6] == points
    assert {p["loss"] for p in again[6:]}.isdisjoint(p["loss"] for p in points)
