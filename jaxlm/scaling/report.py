"""DIR/scaling_report.json: the points, the fitted law with intervals, the frontier, predictions.

The frontier and the predictions use C = 6ND (the convention of the law's closed form); each
run also records its counted C (LM head and attention included), which its FLOPs check compares
with the compiled step.
"""

import json
import math
import os
from typing import Callable, Optional

import numpy as np

from jaxlm import io
from jaxlm.errors import UserError
from jaxlm.scaling import fit as fit_lib
from jaxlm.scaling import points as points_lib
from jaxlm.scaling.law import PARAM_NAMES, Law

REPORT_FILE = "scaling_report.json"


def _value(value: float, interval: Optional[tuple]) -> dict:
    out = {"value": float(value)}
    if interval is not None:
        out["interval"] = [float(interval[0]), float(interval[1])]
    return out


def prediction_flops(points: list, setting: str) -> list[float]:
    from jaxlm.scaling.config import parse_numbers  # pylint: disable=import-outside-toplevel
    if setting:
        return parse_numbers(setting, "scaling.predict_flops")
    lowest = min(6 * p.N * p.D for p in points)
    return [10.0 ** k for k in range(int(math.floor(math.log10(lowest))), 25)]


def law_predictions(law: Law, samples: list[Law], flops: list[float], confidence: float,
                    largest: Optional[float] = None) -> list[dict]:
    """Rows of N*, D*, L* per budget; over_largest_run: C / the largest run's 6ND (extrapolation)."""
    tail = 100 * (1 - confidence) / 2

    def interval(fn):
        if not samples:
            return None
        values = [fn(s) for s in samples]
        return tuple(np.percentile(values, [tail, 100 - tail]))

    rows = []
    for c in flops:
        rows.append({"C": float(c), "over_largest_run": float(c / largest) if largest else None,
                     "N_opt": _value(law.optimal_params(c), interval(lambda s, c=c: s.optimal_params(c))),
                     "D_opt": _value(law.optimal_tokens(c), interval(lambda s, c=c: s.optimal_tokens(c))),
                     "loss": _value(law.optimal_loss(c), interval(lambda s, c=c: s.optimal_loss(c)))})
    return rows


def fit_warnings(report: dict, points: list) -> list[str]:
    """What the fitted constants say about how well the points pin the law down."""
    out = []
    lowest = min(p.loss for p in points)
    if report["E"]["value"] < 0.05 * lowest:
        out.append(f"E = {report['E']['value']:.3g} is near 0 (the runs' lowest loss is {lowest:.3g}): the runs are "
                   f"far from the loss floor, so the fit cannot place it; widen the token range or train longer")
    for name in ("alpha", "beta"):
        entry = report[name]
        lo, hi = entry.get("interval", (entry["value"], entry["value"]))
        if min(entry["value"], lo) <= 1.001 * fit_lib.EXPONENT_BOUNDS[0] or \
                max(entry["value"], hi) >= 0.999 * fit_lib.EXPONENT_BOUNDS[1]:
            out.append(f"{name}'s fit or interval reaches the bound {fit_lib.EXPONENT_BOUNDS}: the points do not "
                       f"determine it")
        elif hi - lo > 0.5:
            out.append(f"{name}'s interval [{lo:.3g}, {hi:.3g}] is wide: the points hardly determine it")
    return out


def approach3_section(result: fit_lib.Approach3) -> dict:
    intervals = result.intervals()
    out = {name: _value(getattr(result.law, name), intervals.get(name)) for name in PARAM_NAMES}
    samples = result.bootstrap_laws()
    derived = {"G": lambda l: l.G, "a": lambda l: l.a, "b": lambda l: l.b}
    out["frontier"] = {
        "formula": "N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G, a = beta/(alpha+beta), b = alpha/(alpha+beta), "
                   "G = (alpha A / (beta B))^(1/(alpha+beta)), C = 6ND",
        **{k: _value(fn(result.law), result.interval(np.array([fn(s) for s in samples])) if samples else None)
           for k, fn in derived.items()}}
    out["fit"] = {"method": "Chinchilla approach 3: Huber loss on log L, L-BFGS-B from a grid of starts",
                  "huber_delta": result.huber_delta, "objective_mean_huber_over_delta": result.objective,
                  "num_points": result.num_points, "bootstrap_resamples": len(result.bootstrap),
                  "confidence": result.confidence, "bootstrap_samples": result.bootstrap.tolist()}
    return out


def approach2_section(result: fit_lib.Approach2) -> dict:
    def law(p):
        return None if p is None else {"k": p.k, "exponent": p.exponent}
    return {"method": "Chinchilla approach 2: per budget a parabola of loss in log N (and log D); "
                      "N* = k C^a, D* = k C^b by least squares in log-log",
            "budgets": [vars(b) for b in result.budgets],
            "N_opt": law(result.params_law), "D_opt": law(result.tokens_law)}


def run_flops_checks(points: list, mode: str, say: Callable[[str], None]) -> dict:
    from jaxlm.scaling.flops_check import TOLERANCE, cached_check, check_run  # pylint: disable=import-outside-toplevel
    runs = [p for p in points if p.run_dir]
    if mode == "none" or not runs:
        return {}
    if mode == "one":
        runs = [max(runs, key=lambda p: p.N)]
    checks = {}
    for p in runs:
        if cached_check(p.run_dir) is None:
            say(f"FLOPs check: compiling the train step of {p.name}")
        checks[p.name] = check_run(p.run_dir)
    ratios = [c["ratio"] for c in checks.values()]
    return {"tolerance": TOLERANCE, "runs_checked": len(checks), "min_ratio": min(ratios), "max_ratio": max(ratios),
            "all_within": all(abs(r - 1) <= TOLERANCE for r in ratios),
            "method": "compiled = XLA cost analysis of the compiled train step (one CPU device, real batch), while "
                      "loops weighted by trip count; analytic = 6 x matmul params (LM head included) + attention, "
                      "per token, x tokens per step; ratio = compiled / analytic",
            "per_run": checks}


def build(workdir: str, s, points_file: Optional[str] = None, say: Callable[[str], None] = print) -> dict:
    """Collects the points, runs the checks and both fits, writes the report and the plots."""
    if points_file:
        points, skipped = points_lib.csv_points(points_file), {}
    else:
        points, skipped = points_lib.run_points(workdir, s.loss)
    for name, why in skipped.items():
        say(f"left out {name}: {why}")
    if not points:
        raise UserError(f"--workdir={workdir}: no finished run to fit; finish the sweep with `jaxlm scaling run` "
                        f"or collect runs trained elsewhere into {os.path.join(workdir, 'runs')}/")
    checks = {} if points_file else run_flops_checks(points, s.flops_check, say)
    result = fit_lib.fit_approach3([p.N for p in points], [p.D for p in points], [p.loss for p in points],
                                   delta=s.huber_delta, bootstrap=int(s.bootstrap), confidence=s.confidence)
    report = {"source": points_file or os.path.join(workdir, "runs"), "loss": s.loss,
              "runs": [{**p.as_dict(), **({"flops_check_ratio": checks["per_run"][p.name]["ratio"]}
                                          if checks and p.name in checks["per_run"] else {})} for p in points],
              "left_out": skipped}
    report.update(approach3_section(result))
    report["warnings"] = fit_warnings(report, points)
    report["predictions"] = law_predictions(result.law, result.bootstrap_laws(),
                                            prediction_flops(points, s.predict_flops), s.confidence,
                                            largest=max(6 * p.N * p.D for p in points))
    groups = points_lib.isoflop_groups(points)
    if groups:
        report["isoflop"] = approach2_section(fit_lib.fit_approach2(
            {c: ([p.N for p in g], [p.D for p in g], [p.loss for p in g]) for c, g in groups.items()}))
    if checks:
        report["flops_check"] = checks
    from jaxlm.scaling import plots  # pylint: disable=import-outside-toplevel  (matplotlib is heavy)
    report["plots"] = plots.write_all(workdir, report)
    io.make_dirs(workdir)
    io.write_json_atomic(os.path.join(workdir, REPORT_FILE), report)
    return report


def load(workdir: str) -> dict:
    path = os.path.join(workdir, REPORT_FILE)
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir} has no {REPORT_FILE}: run `jaxlm scaling fit --workdir={workdir}` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def law_of(report: dict) -> tuple[Law, list[Law], float]:
    law = Law(**{k: report[k]["value"] for k in PARAM_NAMES})
    samples = [Law.from_vector(v) for v in report.get("fit", {}).get("bootstrap_samples", [])]
    return law, samples, report.get("fit", {}).get("confidence", 0.95)


# == Text ===========================================================================================

def _interval_text(entry: dict, fmt: str) -> str:
    if "interval" not in entry:
        return format(entry["value"], fmt)
    lo, hi = entry["interval"]
    return f"{format(entry['value'], fmt)}  [{format(lo, fmt)}, {format(hi, fmt)}]"


def summary(report: dict) -> str:
    fit = report["fit"]
    level = f"{100 * fit['confidence']:.0f}%"
    intervals = (f"{level} intervals from {fit['bootstrap_resamples']} bootstrap resamples"
                 if fit["bootstrap_resamples"] else "no intervals: scaling.bootstrap=0")
    lines = [f"fitted L(N, D) = E + A/N^alpha + B/D^beta to {fit['num_points']} points "
             f"(Huber delta={fit['huber_delta']:g} on log L; {intervals}):"]
    for name, fmt in (("E", ".4g"), ("A", ".4g"), ("B", ".4g"), ("alpha", ".3f"), ("beta", ".3f")):
        lines.append(f"  {name:<6}= {_interval_text(report[name], fmt)}")
    frontier = report["frontier"]
    lines.append(f"compute-optimal (C = 6ND): N* = G (C/6)^a, D* = (C/6)^b / G with a = "
                 f"{_interval_text(frontier['a'], '.3f')}, b = {_interval_text(frontier['b'], '.3f')}, "
                 f"G = {_interval_text(frontier['G'], '.3g')}")
    iso = report.get("isoflop")
    if iso and iso.get("N_opt"):
        lines.append(f"IsoFLOP (approach 2, {sum(b['optimal_params'] is not None for b in iso['budgets'])} budgets): "
                     f"N* ∝ C^{iso['N_opt']['exponent']:.3f}, D* ∝ C^{iso['D_opt']['exponent']:.3f}")
    lines.extend(f"warning: {w}" for w in report.get("warnings", ()))
    check = report.get("flops_check")
    if check:
        lines.append(f"FLOPs check: {check['runs_checked']} runs, compiled / counted = {check['min_ratio']:.3f} .. "
                     f"{check['max_ratio']:.3f} ({'all' if check['all_within'] else 'NOT all'} within "
                     f"{100 * check['tolerance']:.0f}%)")
    return "\n".join(lines)


def largest_run_flops(report: dict) -> Optional[float]:
    return max((r["C_6ND"] for r in report.get("runs", ())), default=None)


def prediction_text(law: Law, samples: list[Law], confidence: float, flops: float,
                    largest: Optional[float] = None) -> str:
    row = law_predictions(law, samples, [flops], confidence)[0]
    level = f"{100 * confidence:.0f}%"
    text = (f"C = {flops:.3g} FLOPs (= 6ND): train N* = {_interval_text(row['N_opt'], '.3g')} non-embedding "
            f"parameters on D* = {_interval_text(row['D_opt'], '.3g')} tokens "
            f"({row['D_opt']['value'] / row['N_opt']['value']:.3g} tokens a parameter); expected loss "
            f"{_interval_text(row['loss'], '.4f')}" + (f"  ({level} intervals)" if samples else ""))
    if largest and flops > 100 * largest:
        text += f"\n  note: {flops / largest:.3g}x the compute of the largest run: an extrapolation"
    return text
