"""The IsoFLOP fit recovers the compute-optimal exponents of a known loss surface (Chinchilla's functional form)."""
import math

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
