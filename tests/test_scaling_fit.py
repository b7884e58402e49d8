"""Fitting scaling laws: approach 3 recovers known laws from noisy synthetic losses, approach 2
recovers the IsoFLOP exponent, and `jaxlm scaling fit --points` / `predict` report them.

The synthetic grid: 10 x 8 points, N log-spaced over 1e7..1e11 and D over 1e9..1e13 (from
Chinchilla's smallest models to today's largest token counts), loss = L(N, D) x (1 + 0.01 z)
with z standard normal (seed 0). With 1% noise the fit's own statistical error is the limit:
over 40 seeds this grid recovers alpha, beta within 0.02, E within 0.05 and N*(1e21) within 10%
for 38 (Chinchilla) and 36 (Besiroglu) of them; the smallest 5 x 4 grid over 1e7..1e10 x
1e9..1e12 does so for only 9 of 30, its alpha having a standard error near 0.015.
"""

import argparse
import json
import os

import numpy as np
import pytest

from jaxlm.commands import scaling as scaling_command
from jaxlm.errors import UserError
from jaxlm.scaling import fit, points
from jaxlm.scaling.law import BESIROGLU, CHINCHILLA, Law


def synthetic(law: Law, noise: float = 0.01, seed: int = 0, shape=(10, 8), n_range=(7, 11), d_range=(9, 13)):
    n, d = np.meshgrid(np.logspace(*n_range, shape[0]), np.logspace(*d_range, shape[1]))
    n, d = n.ravel(), d.ravel()
    loss = law.loss(n, d) * (1 + noise * np.random.default_rng(seed).standard_normal(n.shape))
    return n, d, loss


@pytest.mark.parametrize("law", [CHINCHILLA, BESIROGLU], ids=["chinchilla", "besiroglu"])
def test_approach3_recovers_a_known_law_from_noisy_points(law):
    result = fit.fit_approach3(*synthetic(law), bootstrap=30, seed=0)
    got = result.law
    assert abs(got.alpha - law.alpha) < 0.02, got
    assert abs(got.beta - law.beta) < 0.02, got
    assert abs(got.E - law.E) < 0.05, got
    assert got.optimal_params(1e21) == pytest.approx(law.optimal_params(1e21), rel=0.10)
    assert got.optimal_tokens(1e21) == pytest.approx(law.optimal_tokens(1e21), rel=0.10)
    # The bootstrap intervals bracket the fit and, here, the truth.
    intervals = result.intervals()
    for name in ("E", "alpha", "beta"):
        lo, hi = intervals[name]
        assert lo <= getattr(got, name) <= hi and lo <= getattr(law, name) <= hi, (name, lo, hi)


def test_approach3_is_exact_without_noise_on_the_smallest_grid():
    """5 x 4 points, no noise: the optimiser runs to the true minimum (the published Chinchilla
    fit had stopped early, Besiroglu et al. found)."""
    result = fit.fit_approach3(*synthetic(CHINCHILLA, noise=0.0, shape=(5, 4), n_range=(7, 10), d_range=(9, 12)),
                               bootstrap=0)
    np.testing.assert_allclose(result.law.vector(), CHINCHILLA.vector(), rtol=2e-3)


def test_frontier_is_the_minimum_loss_at_fixed_compute():
    law = CHINCHILLA
    for c in (1e19, 1e21, 1e23):
        n_opt, d_opt = law.optimal_params(c), law.optimal_tokens(c)
        assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-12)
        n = np.logspace(np.log10(n_opt) - 1, np.log10(n_opt) + 1, 20001)
        brute = n[np.argmin(law.loss(n, c / (6 * n)))]
        assert brute == pytest.approx(n_opt, rel=1e-3)
    # Hoffmann et al.'s own reading of their fit: a = 0.46, b = 0.54 (approach 3).
    assert law.a == pytest.approx(0.4516, abs=1e-4) and law.b == pytest.approx(0.5484, abs=1e-4)


def isoflop_points(law: Law, budgets, sizes_per_budget: int = 9, spread: float = 16.0):
    rows = []
    for c in budgets:
        centre = law.optimal_params(c)
        for n in centre * spread ** np.linspace(-0.5, 0.5, sizes_per_budget):
            d = c / (6 * n)
            rows.append((c, n, d, float(law.loss(n, d))))
    return rows


def test_approach2_recovers_the_isoflop_exponents():
    rows = isoflop_points(CHINCHILLA, [1e18, 1e19, 1e20, 1e21])
    groups = {c: tuple(np.array([r[k] for r in rows if r[0] == c]) for k in (1, 2, 3)) for c in {r[0] for r in rows}}
    result = fit.fit_approach2(groups)
    assert all(b.inside for b in result.budgets)
    assert result.params_law.exponent == pytest.approx(CHINCHILLA.a, abs=0.02)
    assert result.tokens_law.exponent == pytest.approx(CHINCHILLA.b, abs=0.02)
    for b in result.budgets:
        assert b.optimal_params == pytest.approx(CHINCHILLA.optimal_params(b.flops), rel=0.10)


def _args(**values) -> argparse.Namespace:
    return argparse.Namespace(**values)


def test_fit_and_predict_commands_on_a_csv(tmp_path, capsys):
    """`jaxlm scaling fit --points=FILE.csv`: the report's constants, frontier, predictions and
    plots; `predict --flops=1e21` prints N* as the law has it."""
    csv_path = tmp_path / "points.csv"
    n, d, loss = synthetic(CHINCHILLA, shape=(10, 8))
    with open(csv_path, "w") as f:
        f.write("name,N,D,loss\n" + "".join(f"p{i},{a:.6g},{b:.6g},{c:.6f}\n" for i, (a, b, c) in enumerate(zip(n, d, loss))))
    workdir = str(tmp_path / "fit")
    code = scaling_command.run(_args(scaling_command="fit", workdir=workdir, points=str(csv_path), config=""),
                               {"scaling.bootstrap": "20"})
    assert code == 0
    out = capsys.readouterr().out
    report = json.load(open(os.path.join(workdir, "scaling_report.json")))
    for key in ("E", "A", "B", "alpha", "beta"):
        lo, hi = report[key]["interval"]
        assert lo <= report[key]["value"] <= hi
    assert abs(report["alpha"]["value"] - 0.34) < 0.02 and abs(report["beta"]["value"] - 0.28) < 0.02
    assert len(report["runs"]) == 80 and report["fit"]["bootstrap_resamples"] == 20
    assert f"alpha = {report['alpha']['value']:.3f}" in out
    row = next(r for r in report["predictions"] if r["C"] == 1e21)
    assert row["N_opt"]["value"] == pytest.approx(CHINCHILLA.optimal_params(1e21), rel=0.10)
    for name in report["plots"]:
        with open(os.path.join(workdir, name), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(workdir, name)) > 20_000
    assert report["plots"] == ["loss_vs_compute.png", "loss_vs_params.png"]  # No budgets: no IsoFLOP plot.

    code = scaling_command.run(_args(scaling_command="predict", workdir=workdir, flops="1e21", params="1e9",
                                     tokens="2e10"), {})
    assert code == 0
    out = capsys.readouterr().out
    assert f"N* = {row['N_opt']['value']:.3g}" in out and f"D* = {row['D_opt']['value']:.3g}" in out
    fitted = Law(**{k: report[k]["value"] for k in ("E", "A", "B", "alpha", "beta")})
    assert f"expected loss {float(fitted.loss(1e9, 2e10)):.4f}" in out


def test_csv_with_budgets_gets_the_isoflop_fit(tmp_path):
    rows = isoflop_points(CHINCHILLA, [1e18, 1e19, 1e20], sizes_per_budget=5, spread=8.0)
    csv_path = tmp_path / "iso.csv"
    with open(csv_path, "w") as f:
        f.write("N,D,loss,C\n" + "".join(f"{n:.8g},{d:.8g},{l:.6f},{c:.6g}\n" for c, n, d, l in rows))
    got = points.csv_points(str(csv_path))
    assert sorted(points.isoflop_groups(got)) == pytest.approx([1e18, 1e19, 1e20])
    workdir = str(tmp_path / "iso")
    scaling_command.run(_args(scaling_command="fit", workdir=workdir, points=str(csv_path), config=""),
                        {"scaling.bootstrap": "0"})
    report = json.load(open(os.path.join(workdir, "scaling_report.json")))
    assert report["isoflop"]["N_opt"]["exponent"] == pytest.approx(CHINCHILLA.a, abs=0.03)
    assert "isoflop.png" in report["plots"] and "interval" not in report["alpha"]


def test_user_errors_name_the_flag_or_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("N,tokens,loss\n1,2,3\n")
    with pytest.raises(UserError, match=r"--points=.*no column 'D'"):
        points.csv_points(str(bad))
    with pytest.raises(UserError, match="only 3 points"):
        fit.fit_approach3([1e7, 1e8, 1e9], [1e9] * 3, [3.0, 2.8, 2.7])
    with pytest.raises(UserError, match="--flops"):
        scaling_command.run(_args(scaling_command="predict", workdir=str(tmp_path), flops="", params="", tokens=""), {})
    with pytest.raises(UserError, match="no scaling_report.json"):
        scaling_command.run(_args(scaling_command="predict", workdir=str(tmp_path), flops="1e21", params="",
                                  tokens=""), {})
    with pytest.raises(UserError, match="scaling.loss"):
        scaling_command.run(_args(scaling_command="fit", workdir=str(tmp_path), points=str(bad), config=""),
                            {"scaling.loss": "median"})
