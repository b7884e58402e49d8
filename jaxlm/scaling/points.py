"""The (N, D, C, loss) points of a fit: from the runs under DIR/runs/, or from a CSV file."""

import csv
import dataclasses
import json
import math
import os
from typing import Optional

from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig
from jaxlm.scaling import sweep as sweep_lib
from jaxlm.scaling.sizes import embedding_params, non_embedding_params, run_flops_per_token


@dataclasses.dataclass
class Point:
    name: str
    N: float  # pylint: disable=invalid-name
    D: float  # pylint: disable=invalid-name
    C: float  # pylint: disable=invalid-name
    loss: float
    budget: Optional[float] = None  # The IsoFLOP budget it belongs to.
    source: str = "run"  # run | csv
    total_params: Optional[int] = None
    steps: Optional[int] = None
    loss_step: Optional[int] = None
    model: Optional[dict] = None
    run_dir: Optional[str] = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["C_6ND"] = 6.0 * self.N * self.D
        return out


def _eval_losses(directory: str) -> list[tuple[int, float]]:
    out = []
    for record in sweep_lib.read_records(os.path.join(directory, sweep_lib.METRICS_FILE)):
        loss = record.get("eval/loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            out.append((int(record["step"]), float(loss)))
    return out


def run_point(directory: str, which: str = "final", budget: Optional[float] = None) -> tuple[Optional[Point], str]:
    """(the run's point, '') or (None, why it has none)."""
    name = os.path.basename(os.path.normpath(directory))
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return None, "not started (no config.json)"
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("task", "causal_lm") != "causal_lm":
        return None, f"a {saved.get('task')} run: the law is fitted to causal-LM losses"
    cfg = ModelConfig.from_dict(saved["model"])
    steps, batch, seq_len = int(saved["steps"]), int(saved["global_batch_size"]), int(saved["seq_len"])
    losses = _eval_losses(directory)
    final = [loss for step, loss in losses if step == steps]
    if not final:
        done = sweep_lib.last_step(directory)
        return None, f"unfinished (step {done} of {steps})"
    if which == "best":
        loss_step, loss = min(losses, key=lambda sl: sl[1])
    else:
        loss_step, loss = steps, final[-1]
    tokens = steps * batch * seq_len
    model = {k: saved["model"][k] for k in ("num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff",
                                            "vocab_size") if k in saved["model"]}
    return Point(name=name, N=float(non_embedding_params(cfg)), D=float(tokens),
                 C=tokens * run_flops_per_token(cfg, seq_len), loss=loss, budget=budget,
                 total_params=non_embedding_params(cfg) + embedding_params(cfg), steps=steps,
                 loss_step=loss_step, model=model, run_dir=directory), ""


def run_points(workdir: str, which: str = "final") -> tuple[list[Point], dict[str, str]]:
    """Points of every finished run under DIR/runs/ and, for the others, why they were left out."""
    root = os.path.join(workdir, sweep_lib.RUNS_DIR)
    if not os.path.isdir(root):
        raise UserError(f"--workdir={workdir} has no runs/ directory: run `jaxlm scaling run` first, "
                        f"or pass --points=FILE.csv")
    planned = sweep_lib.load_sweep(workdir).get("runs", {})
    points, skipped = [], {}
    for name in sorted(os.listdir(root)):
        directory = os.path.join(root, name)
        if not os.path.isdir(directory):
            continue
        point, why = run_point(directory, which, planned.get(name, {}).get("budget"))
        if point is None:
            skipped[name] = why
        else:
            points.append(point)
    return points, skipped


def csv_points(path: str) -> list[Point]:
    """Rows with columns N, D, loss and optionally C (default 6ND) and name."""
    if not os.path.isfile(path):
        raise UserError(f"--points={path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        missing = [c for c in ("N", "D", "loss") if c not in columns]
        if missing:
            raise UserError(f"--points={path}: no column {missing[0]!r}; the header needs N, D, loss "
                            f"(and optionally C), got {sorted(columns)}")
        points = []
        for line, row in enumerate(reader, 2):
            try:
                n, d, loss = float(row["N"]), float(row["D"]), float(row["loss"])
                c = float(row["C"]) if row.get("C") not in (None, "") else 6.0 * n * d
            except ValueError:
                raise UserError(f"--points={path}, line {line}: N, D, loss and C must be numbers") from None
            if min(n, d, loss, c) <= 0:
                raise UserError(f"--points={path}, line {line}: N, D, loss and C must be positive")
            points.append(Point(name=row.get("name") or f"row{line}", N=n, D=d, C=c, loss=loss, source="csv",
                                budget=c if row.get("C") not in (None, "") else None))
    if not points:
        raise UserError(f"--points={path}: no rows")
    return points


def isoflop_groups(points: list[Point], tolerance: float = 0.05) -> dict[float, list[Point]]:
    """Budget -> its points, for budgets with at least 3 model sizes. Points of one budget differ a
    little in C (steps are whole); a given C column groups when within `tolerance` of each other."""
    tagged = sorted((p for p in points if p.budget), key=lambda p: p.budget)
    groups: list[list[Point]] = []
    for p in tagged:
        if groups and p.budget <= groups[-1][0].budget * (1 + tolerance):
            groups[-1].append(p)
        else:
            groups.append([p])
    out = {}
    for group in groups:
        if len({p.N for p in group}) >= 3:
            out[math.exp(sum(math.log(p.budget) for p in group) / len(group))] = group
    return out
