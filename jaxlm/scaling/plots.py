"""The report's figures (matplotlib, Agg: no display needed). Compute is C = 6ND throughout, the
convention the frontier is written in."""

import os

import numpy as np

from jaxlm.scaling.law import PARAM_NAMES, Law
from jaxlm.scaling.sizes import short_count

LOSS_VS_COMPUTE = "loss_vs_compute.png"
LOSS_VS_PARAMS = "loss_vs_params.png"
ISOFLOP = "isoflop.png"


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def _loss_axis(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter  # pylint: disable=import-outside-toplevel
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_ylabel("eval loss (nats / token)")
    ax.grid(True, which="both", alpha=0.3)


def _limit_loss_axis(ax, losses: np.ndarray) -> None:
    """The fitted curves run far above the data at small N or C: keep the runs' range in view."""
    ax.set_ylim(losses.min() / 1.08, losses.max() * 1.25)


def _law(report: dict) -> Law:
    return Law(**{k: report[k]["value"] for k in PARAM_NAMES})


def _groups(values: np.ndarray) -> list[float]:
    """Distinct values, merging those within 2% (a budget's tokens differ by rounding to whole steps)."""
    out: list[float] = []
    for v in np.sort(values):
        if not out or v > out[-1] * 1.02:
            out.append(float(v))
    return out


def loss_vs_compute(path: str, report: dict) -> None:
    plt = _pyplot()
    law = _law(report)
    runs = report["runs"]
    n, d, loss = (np.array([r[k] for r in runs], np.float64) for k in ("N", "D", "loss"))
    c = 6 * n * d
    fig, ax = plt.subplots(figsize=(8, 5.5))
    grid = np.logspace(np.log10(c.min() / 3), np.log10(c.max() * 3), 200)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(_groups(n))))
    for colour, size in zip(colours, _groups(n)):
        ax.plot(grid, law.loss(size, grid / (6 * size)), color=colour, lw=1, alpha=0.8)
        mine = np.abs(n / size - 1) <= 0.02
        ax.scatter(c[mine], loss[mine], color=colour, s=36, zorder=3, edgecolor="black", linewidth=0.5,
                   label=f"N = {short_count(size)}")
    ax.plot(grid, law.optimal_loss(grid), "k--", lw=2, label="compute-optimal frontier L(N*(C), D*(C))")
    _finish(plt, fig, ax, path, np.concatenate([loss, law.optimal_loss(grid[-1:])]),
            "training compute C = 6ND (FLOPs)",
            f"Runs and fitted L(N, D): alpha = {law.alpha:.3f}, beta = {law.beta:.3f}, E = {law.E:.3g}")


def _finish(plt, fig, ax, path: str, losses: np.ndarray, xlabel: str, title: str) -> None:
    """Log-scaled x, the loss axis fitted to `losses`, labels, legend; saved and closed."""
    ax.set_xscale("log")
    _loss_axis(ax)
    _limit_loss_axis(ax, losses)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_vs_params(path: str, report: dict) -> None:
    plt = _pyplot()
    law = _law(report)
    runs = report["runs"]
    n, d, loss = (np.array([r[k] for r in runs], np.float64) for k in ("N", "D", "loss"))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    grid = np.logspace(np.log10(n.min() / 2), np.log10(n.max() * 2), 200)
    budgets = _groups(d)
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))
    for colour, tokens in zip(colours, budgets):
        mine = np.abs(d / tokens - 1) <= 0.02
        ax.scatter(n[mine], loss[mine], color=colour, s=36, zorder=3, edgecolor="black", linewidth=0.5,
                   label=f"D = {short_count(tokens)} tokens")
        if len(budgets) <= 12:  # One fitted curve per token budget (an IsoFLOP sweep has one D a run).
            ax.plot(grid, law.loss(grid, tokens), color=colour, lw=1, alpha=0.8)
    ax.plot(grid, law.E + law.A / grid ** law.alpha, "k:", lw=1.5, label="D → ∞: E + A/N^alpha")
    _finish(plt, fig, ax, path, loss, "non-embedding parameters N",
            "Loss against model size, per token budget (curves: the fitted law)")


def isoflop(path: str, report: dict) -> None:
    plt = _pyplot()
    law = _law(report)
    iso = report["isoflop"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    budgets = iso["budgets"]
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for colour, b in zip(colours, budgets):
        n = np.array(b["params"])
        left.scatter(n, b["losses"], color=colour, s=36, zorder=3, edgecolor="black", linewidth=0.5,
                     label=f"C = {b['flops']:.3g}")
        if b["parabola_n"] is not None:
            grid = np.logspace(np.log10(n.min() / 1.5), np.log10(n.max() * 1.5), 100)
            left.plot(grid, np.polyval(b["parabola_n"], np.log(grid)), color=colour, lw=1)
        if b["optimal_params"] is not None:
            left.scatter([b["optimal_params"]], [b["optimal_loss"]], marker="*", s=160, color=colour,
                         edgecolor="black", zorder=4)
    left.set_xscale("log")
    _loss_axis(left)
    _limit_loss_axis(left, np.concatenate([b["losses"] for b in budgets]))
    left.set_xlabel("non-embedding parameters N")
    left.set_title("IsoFLOP profiles (parabola in log N; star: its minimum N*)")
    left.legend(fontsize=8)

    found = [b for b in budgets if b["optimal_params"] is not None]
    c_all = np.array([b["flops"] for b in budgets])
    grid = np.logspace(np.log10(c_all.min() / 3), np.log10(c_all.max() * 30), 100)
    if found:
        right.scatter([b["flops"] for b in found], [b["optimal_params"] for b in found], color="C0", s=50,
                      zorder=3, edgecolor="black", label="N* per budget (approach 2)")
    if iso.get("N_opt"):
        k, a = iso["N_opt"]["k"], iso["N_opt"]["exponent"]
        right.plot(grid, k * grid ** a, "C0-", label=f"approach 2: N* ∝ C^{a:.3f}")
    right.plot(grid, law.optimal_params(grid), "k--", label=f"approach 3: N* = G (C/6)^{law.a:.3f}")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training compute C (FLOPs)")
    right.set_ylabel("compute-optimal non-embedding parameters N*")
    right.set_title("Compute-optimal model size")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(workdir: str, report: dict) -> list[str]:
    """Writes the figures into workdir; returns their file names."""
    os.makedirs(workdir, exist_ok=True)
    written = []
    for name, draw in ((LOSS_VS_COMPUTE, loss_vs_compute), (LOSS_VS_PARAMS, loss_vs_params)):
        draw(os.path.join(workdir, name), report)
        written.append(name)
    if report.get("isoflop"):
        isoflop(os.path.join(workdir, ISOFLOP), report)
        written.append(ISOFLOP)
    return written
