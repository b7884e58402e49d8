"""`train_and_evaluate(config, workdir)`: the one training loop, for every task.

Reads top to bottom in labelled sections: resolve (mesh, config, data) → model and optimizer →
restore or initialise → compile → loop (step, log, evaluate, checkpoint) → final report.
Nothing is written into the workdir until every check that can fail on user input has passed
(a fresh run's own tokenizer excepted, and the lease, DIR/lease.json, which goes again however
the run ends). The step itself lives in `jaxlm.trainer`.
"""

import re
import signal
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import bucket_probe, eval_loop, io, lease
from jaxlm import metrics as metrics_lib
from jaxlm import sharding
from jaxlm.best_checkpoint import BestCheckpoint
from jaxlm.checkpoint import Checkpointer
from jaxlm.peft import adalora
from jaxlm.resolve import resolve_run
from jaxlm.trainer import CompiledSteps, Trainer
from jaxlm.writers import METRICS_FILE, create_writer, truncate_metrics


class PreemptionWatch:
    """Notices SIGTERM (a TPU maintenance event, a spot reclaim, `tpu/stop.sh`).

    With one process a Python handler sets a flag. With several, every host must stop at the
    same step: jax's coordination service catches the signal and
    `reached_preemption_sync_point` returns True on all hosts at one agreed step.
    """

    def __init__(self):
        self.requested = False
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


EVAL_REPORT = "eval_report.json"


def write_eval_report(workdir: str, step: int, report: dict) -> None:
    """DIR/eval_report.json: the latest evaluation in full (process 0 only)."""
    if jax.process_index() == 0:
        io.write_json_atomic(io.path(workdir) / EVAL_REPORT, {"step": step, **report})


def time_budget_spent(loop_start: float, step: int, config: ml_collections.ConfigDict) -> bool:
    """train_time_budget_minutes is used up (hosts agree at log steps, as for time-based saves)."""
    if not config.train_time_budget_minutes:
        return False
    if jax.process_count() > 1 and step % config.log_every:
        return False
    spent = time.monotonic() - loop_start >= 60 * config.train_time_budget_minutes
    if jax.process_count() > 1:
        spent = bool(multihost_utils.broadcast_one_to_all(jnp.array(spent)))
    return spent


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final metrics. A bucket workdir is
    probed first; the run holds the workdir's lease (DIR/lease.json) throughout."""
    bucket_probe.check_reachable(workdir)
    with lease.hold(workdir, config.lease_timeout_minutes):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    start_time = time.time()
    is_primary = jax.process_index() == 0

    # == 1. Resolve: mesh, config, data (nothing is written before these pass) ================
    mesh = sharding.make_mesh(config.mesh)
    run = resolve_run(config, workdir, mesh)
    config, data = run.config, run.data

    # == 2. Model, optimizer, shardings =======================================================
    trainer = Trainer(config, mesh, init_source=run.init_source)  # peft: its frozen base, on every start
    logging.info("model: %s parameters; mesh %s", f"{trainer.num_params:,}", dict(mesh.shape))
    if is_primary:
        io.make_dirs(workdir)
        io.write_text_atomic(io.path(workdir) / "config.json", config_lib.to_json(config))

    # == 3. Restore the latest checkpoint, or initialise ========================================
    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every,
                                every_minutes=config.checkpoint_every_minutes,
                                keep=config.keep_checkpoints, asynchronous=config.async_checkpointing)
    resumed = checkpointer.restore_latest(trainer.abstract_sharded_state(), data.train_iter)
    if resumed is not None:
        latest, state = resumed
        if is_primary:
            truncate_metrics(workdir, latest)
    else:
        loaded = run.init_source.load(trainer.abstract_params) if run.init_source else None
        state = trainer.init_state(config.seed, pretrained=loaded)
        del loaded
    start_step = int(jax.device_get(state.step))
    if start_step >= config.steps:  # Nothing left to train: report the finished run.
        data.train_iter.close()
        checkpointer.close()
        return finished_run_report(trainer, state.params, data, workdir, start_step)
    best = BestCheckpoint(workdir, config.best_metric, config.best_mode) if config.best_metric else None

    # == 4. Writers, progress, compiled steps =================================================
    writer = create_writer(workdir, is_primary, config.wandb, config.to_dict())
    progress = periodic_actions.ReportProgress(num_train_steps=config.steps, every_steps=config.log_every,
                                               writer=metric_writers.LoggingWriter())
    first_batch = next(data.train_iter)
    first_batch_seconds = time.time() - start_time
    steps = CompiledSteps(trainer)
    steps.compiled_train(sharding.to_global(first_batch, mesh))  # Compiled before the loop's clock starts.
    peak, peak_source = metrics_lib.device_peak_flops()
    metrics_lib.log_mfu_source(peak_source)

    # == 5. Loop ==============================================================================
    final: dict = {}
    pending = None  # Train metrics since the last log, still on device.
    interval_start, interval_steps = time.perf_counter(), 0
    interval_tokens, interval_flops = 0, 0.0  # From each batch's real shape (bucketing varies it).
    interval_data_wait = 0.0  # Host seconds spent waiting for the input pipeline.
    batch: Optional[dict] = first_batch
    preemption = PreemptionWatch()
    loop_start = time.monotonic()
    try:
        for step in range(start_step + 1, config.steps + 1):
            if batch is None:
                wait_start = time.perf_counter()
                batch = next(data.train_iter)
                interval_data_wait += time.perf_counter() - wait_start
            state, step_metrics = steps.train(state, sharding.to_global(batch, mesh))
            length = metrics_lib.batch_length(batch, config.seq_len)
            interval_tokens += config.global_batch_size * length
            interval_flops += config.global_batch_size * length * metrics_lib.train_flops_per_token(
                trainer.model_config, length, trainer.task.vocab_head)
            batch = None
            pending = step_metrics if pending is None else pending.merge(step_metrics)
            interval_steps += 1
            progress(step)
            if step == start_step + 1:  # Time to first step: what a bigger corpus must not grow.
                jax.block_until_ready(state.step)
                final["seconds_to_first_step"] = time.time() - start_time
                logging.info("first train step done %.1f s after the start (data ready after %.1f s)",
                             final["seconds_to_first_step"], first_batch_seconds)
            out_of_time = time_budget_spent(loop_start, step, config)
            last = step == config.steps or out_of_time  # Evaluate and save as at the end.

            scalars = {}
            if step % config.log_every == 0 or last:
                computed = jax.device_get(pending.compute())
                pending = None
                if computed["nonfinite_steps"] > 0:
                    raise TrainingDiverged(f"loss or gradient norm became NaN/inf between steps "
                                           f"{step - interval_steps + 1} and {step}")
                elapsed = time.perf_counter() - interval_start
                step_time = elapsed / interval_steps
                scalars.update({
                    "train/loss": computed["loss"], "train/grad_norm": computed["grad_norm"],
                    "train/learning_rate": computed["learning_rate"],
                    "train/tokens_per_sec": interval_tokens / elapsed,
                    "train/examples_per_sec": config.global_batch_size / step_time,
                    "train/step_time": step_time,
                    "train/mfu": interval_flops / elapsed / (peak * jax.device_count()),
                    # The input pipeline's share of step time: how long the loop waited for data.
                    "train/data_wait_fraction": interval_data_wait / elapsed,
                })
                scalars.update(source_token_scalars(data.train_iter.tokens_by_source()))
            if (config.eval_every and step % config.eval_every == 0) or last:
                eval_scalars, report = eval_loop.evaluate(trainer, state.params, data, config.eval_batches)
                scalars.update(eval_scalars)
                write_eval_report(workdir, step, report)
                if best is not None:
                    best.update(step, eval_scalars, state.params, report)
            if scalars:
                writer.write_scalars(step, scalars)
                writer.flush()
                final.update(scalars)
                final["step"] = step
                interval_start, interval_steps = time.perf_counter(), 0
                interval_tokens, interval_flops, interval_data_wait = 0, 0.0, 0.0
            preempted = preemption.should_stop(step)
            if preempted or last or checkpoint_due(checkpointer, step, config):
                # Never save a state that went bad since the last log.
                if pending is not None and jax.device_get(pending.nonfinite_steps.compute()) > 0:
                    raise TrainingDiverged(f"loss or gradient norm became NaN/inf before step {step}")
                checkpointer.save(step, state, data.train_iter, force=preempted or last)
            if preempted:
                logging.warning("preempted: saved step %d; rerun the same command to resume", step)
                final.update(step=step, preempted=True)
                break
            if out_of_time:
                logging.info("train_time_budget_minutes=%g spent at step %d: evaluated and saved; rerunning "
                             "the same command trains on for another budget", config.train_time_budget_minutes, step)
                final.update(step=step, time_budget_spent=True, train_loop_seconds=time.monotonic() - loop_start)
                break
    except TrainingDiverged as e:
        data.train_iter.close()
        checkpointer.close()
        last = checkpointer.latest_step()
        raise TrainingDiverged(f"{e}; stopped without saving. The last good checkpoint is step {last} "
                               f"in {checkpointer.directory}: lower optim.learning_rate or raise "
                               f"optim.warmup_steps, then rerun to resume from it") from None
    data.train_iter.close()
    checkpointer.close()
    if best is not None:
        best.close()
    writer.close()
    if final.get("step") == config.steps:  # AdaLoRA: the final rank of every matrix
        adalora.write_ranks(workdir, trainer.adapted, state.opt_state, is_primary)
    final["wall_seconds"] = time.time() - start_time
    return final


def source_token_scalars(counts: dict[str, int]) -> dict[str, float]:
    """A mixture's input tokens per source so far: the count on this host (process 0 logs its
    rows') and the share, which estimates the global one."""
    total = sum(counts.values())
    if len(counts) < 2 or not total:
        return {}
    out = {}
    for name, count in counts.items():
        tag = re.sub(r"[^A-Za-z0-9_./-]+", "_", name)
        out[f"data/tokens/{tag}"] = count
        out[f"data/share/{tag}"] = count / total
    return out


def finished_run_report(trainer: Trainer, params, data, workdir: str, step: int) -> dict:
    """A rerun of a finished run: its last logged train metrics and a fresh final evaluation."""
    logging.info("the run in %s already finished at step %d: evaluating its final checkpoint again", workdir, step)
    records = io.read_jsonl(io.path(workdir) / METRICS_FILE)
    last_train = next((r for r in reversed(records) if "train/loss" in r), {})
    final = {k: v for k, v in last_train.items() if k.startswith("train/")}
    final.update(eval_loop.evaluate(trainer, params, data, trainer.config.eval_batches)[0])
    final.update(step=step, already_finished=True)
    return final


def checkpoint_due(checkpointer: Checkpointer, step: int, config: ml_collections.ConfigDict) -> bool:
    if config.checkpoint_every and step % config.checkpoint_every == 0:
        return True
    if not config.checkpoint_every_minutes or step % config.log_every:
        return False
    due = checkpointer.due(step)
    if jax.process_count() > 1:  # Every host must take part in the same saves.
        due = bool(multihost_utils.broadcast_one_to_all(jnp.array(due)))
    return due


def format_final(final: dict) -> str:
    keys = [k for k in ("train/loss", "eval/loss", "eval/accuracy", "eval/f1", "eval/perplexity",
                        "eval/bits_per_byte", "train/tokens_per_sec", "train/examples_per_sec", "train/mfu")
            if k in final]
    parts = [f"{k}={final[k]:.4g}" for k in keys]
    when = "already finished" if final.get("already_finished") else f"{final.get('wall_seconds', 0):.0f}s"
    return f"final (step {final.get('step')}, {when}): " + "  ".join(parts)

