"""`jaxlm eval`: a checkpoint's metrics on one split, on whatever devices this machine has.

    result = evaluate_checkpoint("runs/x", overrides={}, step=None, best=False, split="")

The run is opened as every command opens one (`jaxlm.run.find_run(…).open()`): config.json plus
--config.* overrides (e.g. another data.eval_file), then the task's eval data; only the params
are restored, straight into this machine's shardings; the metrics come from the training loop's
own evaluation (`jaxlm.eval_loop.evaluate`), so they are the numbers training logs. Results go to
DIR/eval/<split>_step<N>.json and TensorBoard (DIR/eval/<split>/), on local disk or a bucket (gs://).
"""

import dataclasses
import re
from typing import Optional

import jax
import ml_collections

from jaxlm import config_checks, eval_loop, io, writers
from jaxlm import run as run_lib
from jaxlm.resolve import check_batch_layout
from jaxlm.errors import UserError
from jaxlm.tasks import get_task

EVAL_DIRNAME = "eval"
DEFAULT_SPLIT = "eval"


@dataclasses.dataclass
class EvalResult:
    step: int
    split: str
    scalars: dict  # {"eval/loss": …}, as in metrics.jsonl
    report: dict  # the task's full report (per-class values, confusion matrix, …)
    json_path: str


def select_split(config: ml_collections.ConfigDict, split: str) -> str:
    """Points the data's eval split at `split`; returns the name results are filed under.

    '' or 'eval': the run's own eval split (data.eval_file, the held-out part of data.train_file,
    or data.eval_split). Another name: that split of the run's tfds dataset (e.g. 'test', 'train').
    """
    split = (split or "").strip()
    if split in ("", DEFAULT_SPLIT):
        return DEFAULT_SPLIT
    data = config.data
    if (data.get("train_file", "") or "").strip() or not (data.get("tfds_name", "") or "").strip():
        raise UserError(f"--split={split}: this run reads local files, whose one eval split is 'eval'; "
                        "evaluate another file with --config.data.eval_file=PATH")
    data.eval_split = split
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", split)


def evaluate_checkpoint(workdir: str, overrides: dict[str, str], step: Optional[int] = None,
                        best: bool = False, split: str = "") -> EvalResult:
    # == 1. Checks before any data is read: config, split, checkpoint, mesh =================
    found = run_lib.find_run(workdir, step=step, best=best, overrides=overrides, all_devices=True)
    config = found.config
    split_name = select_split(config, split)
    config_checks.validate(config)
    check_batch_layout(config, found.mesh)

    # == 2. Data as training built it (a bad eval file fails before the params are read) ========
    task = get_task(config.task)
    data = task.build_eval_data(config, workdir, jax.process_index(), jax.process_count())

    # == 3. Model and params (no optimizer), then the training loop's own evaluation ============
    run = found.open()
    scalars, report = eval_loop.evaluate(run.model, run.params, data, config.eval_batches)
    scalars = {k: float(v) for k, v in scalars.items()}

    # == 4. Results: JSON, TensorBoard (process 0 writes) =========================================
    json_path = io.path(workdir) / EVAL_DIRNAME / f"{split_name}_step{run.step}.json"
    if jax.process_index() == 0:
        io.make_dirs(json_path.parent)
        io.write_json_atomic(json_path, {
            "step": run.step, "split": split_name, "checkpoint": str(found.source.path),
            "devices": jax.device_count(), **scalars, **({"report": report} if report != scalars else {})})
        events_dir = io.path(workdir) / EVAL_DIRNAME / split_name
        # On a bucket the events are written locally and uploaded (an object cannot be appended to).
        writer = (writers.BucketSummaryWriter(events_dir) if io.is_remote(events_dir)
                  else writers.TensorBoardWriter(str(events_dir)))
        writer.write_scalars(run.step, scalars)
        writer.close()
    return EvalResult(run.step, split_name, scalars, report, str(json_path))


def format_table(result: EvalResult) -> str:
    width = max(len(k) for k in result.scalars)
    rows = [f"  {k.ljust(width)}  {v:.6g}" for k, v in sorted(result.scalars.items())]
    return "\n".join([f"eval at step {result.step} ({result.split} split):", *rows, f"wrote {result.json_path}"])
