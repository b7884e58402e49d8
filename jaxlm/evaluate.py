"""`jaxlm eval`: a checkpoint's metrics on one split, on whatever devices this machine has.

    result = evaluate_checkpoint("runs/x", overrides={}, step=None, best=False, split="")

The run's config.json (plus --config.* overrides, e.g. another data.eval_file) rebuilds the task,
data and model; only the params are restored, straight into this machine's shardings; the
metrics come from the training loop's own eval step (`jaxlm.train.evaluate_with_report`), so they
are the numbers training logs. Results go to DIR/eval/<split>_step<N>.json and TensorBoard
(DIR/eval/<split>/).
"""

import dataclasses
import os
import re
from typing import Optional

import jax
import ml_collections
from absl import logging
from clu import metric_writers

from jaxlm import config as config_lib
from jaxlm import restore, sharding
from jaxlm import train as train_lib
from jaxlm.best_checkpoint import write_json_atomically
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
    config = restore.load_run_config(workdir, overrides)
    split_name = select_split(config, split)
    config_lib.validate(config)
    source = restore.find_checkpoint(workdir, step, best)
    mesh = sharding.make_mesh(config.mesh)
    train_lib.check_batch_layout(config, mesh)

    # == 2. Data and model, as training built them ===============================================
    task = get_task(config.task)
    build = getattr(task, "build_eval_data", task.build_data)  # Eval-only data where the task has it.
    data = build(config, workdir, jax.process_index(), jax.process_count())
    train_lib.resolve_vocab(config, data.vocab_size)
    trainer = train_lib.Trainer(config, mesh)
    logging.info("eval: %s at step %d (%s split), %s parameters, mesh %s", workdir, source.step, split_name,
                 f"{trainer.num_params:,}", dict(mesh.shape))

    # == 3. Params only, straight into this mesh's shardings; then the training eval loop ======
    params = restore.restore_params(source, trainer.abstract_state.params, trainer.param_shardings)
    steps = train_lib.CompiledSteps(trainer)
    scalars, report = train_lib.evaluate_with_report(trainer, steps.eval, params, data, config.eval_batches)
    scalars = {k: float(v) for k, v in scalars.items()}

    # == 4. Results: JSON, TensorBoard (process 0 writes) =========================================
    json_path = os.path.join(workdir, EVAL_DIRNAME, f"{split_name}_step{source.step}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        write_json_atomically(json_path, {
            "step": source.step, "split": split_name, "checkpoint": os.fspath(source.path),
            "devices": jax.device_count(), **scalars, **({"report": report} if report != scalars else {})})
        writer = metric_writers.SummaryWriter(os.path.join(workdir, EVAL_DIRNAME, split_name))
        writer.write_scalars(source.step, scalars)
        writer.close()
    return EvalResult(source.step, split_name, scalars, report, json_path)


def format_table(result: EvalResult) -> str:
    width = max(len(k) for k in result.scalars)
    rows = [f"  {k.ljust(width)}  {v:.6g}" for k, v in sorted(result.scalars.items())]
    return "\n".join([f"eval at step {result.step} ({result.split} split):", *rows, f"wrote {result.json_path}"])
