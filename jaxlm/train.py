"""`train_and_evaluate(config, workdir)`: the one training loop, for every task.

Reads top to bottom in labelled sections: validate → mesh → data → model and optimizer →
restore or initialise → compile → loop (step, log, evaluate, checkpoint) → final report.
Nothing is written into the workdir until every check that can fail on user input has passed.
"""

import json
import math
import os
import signal
import threading
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from jaxlm import pretrained as pretrained_lib
from jaxlm import sharding
from jaxlm.best_checkpoint import BestCheckpoint, write_json_atomically
from jaxlm.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.errors import UserError
from jaxlm.models import Model, ModelConfig, count_params
from jaxlm.optim import make_optimizer
from jaxlm.tasks import get_task
from jaxlm.writers import create_writer, truncate_metrics


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


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
    """model.vocab_size=0 means: the tokenizer's size, rounded up so it shards evenly."""
    if config.model.vocab_size == 0:
        multiple = max(int(config.model.get("vocab_multiple", 1)), 1)
        config.model.vocab_size = int(math.ceil(tokenizer_vocab / multiple) * multiple)
    elif config.model.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer_vocab} tokens; set --config.model.vocab_size=0 to take the tokenizer's")


class Trainer:
    """Holds what the steps need: model, optimizer, shardings, compiled functions."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.task = get_task(config.task)
        self.model_config: ModelConfig = config_lib.model_config(config)
        mc = self.model_config
        self.rules = sharding.logical_rules(mesh, mc.num_heads, mc.kv_heads, mc.d_ff, mc.vocab_size)
        model_kwargs = self.task.model_kwargs(config)
        self.train_model = Model(mc, deterministic=False, **model_kwargs)
        self.eval_model = Model(mc, deterministic=True, **model_kwargs)
        self.tx, self.schedule = make_optimizer(config.optim, config.steps)

        # Shardings: params from their logical axes, optimizer state mirrors the params.
        boxed = jax.eval_shape(self._init_params, jax.random.key(0))
        self.param_shardings = sharding.param_shardings(boxed, mesh, self.rules)
        abstract_params = nn.unbox(boxed)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        self.state_shardings = TrainState(
            step=NamedSharding(mesh, P()), params=self.param_shardings,
            opt_state=sharding.like_params_shardings(abstract_opt, abstract_params, self.param_shardings, mesh))
        self.abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                                         opt_state=abstract_opt)
        self.num_params = count_params(abstract_params)

    # -- initialisation ---------------------------------------------------------------------
    def _init_params(self, rng):
        # No axis rules here: out_shardings place the params, and flax's DenseGeneral would
        # constrain its flattened kernel with the 3-axis names.
        return self.eval_model.init(rng, **self.task.dummy_inputs(self.config))["params"]

    def init_state(self, seed: int, pretrained: Optional[dict] = None) -> TrainState:
        """Initialises params and optimizer state directly into their shardings.

        pretrained: numpy arrays for part of the params (same paths and shapes, e.g. the body of
        an init_from source); they replace the fresh values, the rest (a new head) stays fresh.
        """
        pretrained = pretrained or {}
        shardings = _subtree(self.param_shardings, pretrained)
        # Global arrays in the params' shardings: every host reads its own shards only.
        pretrained = jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index, a=a: a[index]), pretrained, shardings)

        def init(rng, loaded):
            params = _overlay(nn.unbox(self._init_params(rng)), loaded)
            return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=self.tx.init(params))

        with sharding.mesh_context(self.mesh):
            return jax.jit(init, in_shardings=(None, shardings),
                           out_shardings=self.state_shardings)(jax.random.key(seed), pretrained)

    def abstract_sharded_state(self) -> TrainState:
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    # -- steps --------------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: dict):
        """One optimizer step on one global batch, split into grad_accum_steps micro-batches."""
        accum = self.config.grad_accum_steps
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)

        def loss_sums(params, micro, micro_rng):
            with nn.logical_axis_rules(self.rules):
                logits = self.train_model.apply({"params": params}, **self.task.model_inputs(micro),
                                                rngs={"dropout": micro_rng})
            loss_sum, weight = self.task.loss(logits, micro)
            return loss_sum, weight

        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
        if accum == 1:
            (loss_sum, weight), grads = grad_fn(state.params, batch, rng)
        else:
            # Micro-batch i takes rows i, i+A, i+2A…: every device keeps feeding its own rows.
            micro_batches = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)
            micro_batches = jax.lax.with_sharding_constraint(
                micro_batches, jax.tree.map(lambda x: NamedSharding(self.mesh, P(None, sharding.BATCH_AXES)),
                                            micro_batches))

            def accumulate(carry, xs):
                i, micro = xs
                (l, w), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (l, w, g)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, weight, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro_batches))
        # Gradients of the summed loss over all tokens -> gradient of the mean loss.
        grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics_lib.train_metrics(loss_sum, weight, grad_norm, self.schedule(state.step))

    def eval_step(self, params, batch: dict):
        with nn.logical_axis_rules(self.rules):
            logits = self.eval_model.apply({"params": params}, **self.task.model_inputs(batch))
        return self.task.eval_metrics(logits, batch)

    def _batch_abstract(self, batch_example: dict):
        batch_shardings = {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch_example.items()}
        batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
                          for k, v in batch_example.items()}
        return batch_shardings, batch_abstract

    def compile_train(self, batch_example: dict):
        """AOT-compiles the train step for global batches shaped like `batch_example`."""
        batch_shardings, batch_abstract = self._batch_abstract(batch_example)
        train = jax.jit(self.train_step, in_shardings=(self.state_shardings, batch_shardings),
                        out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        with sharding.mesh_context(self.mesh):
            return train.lower(self.abstract_sharded_state(), batch_abstract).compile()

    def compile_eval(self, batch_example: dict):
        batch_shardings, batch_abstract = self._batch_abstract(batch_example)
        evaluate = jax.jit(self.eval_step, in_shardings=(self.param_shardings, batch_shardings))
        with sharding.mesh_context(self.mesh):
            return evaluate.lower(abstract_with_shardings(self.abstract_state.params, self.param_shardings),
                                  batch_abstract).compile()

    def compile(self, batch_example: dict):
        """AOT-compiles the train and eval steps for this mesh (also used by `jaxlm aot`)."""
        return self.compile_train(batch_example), self.compile_eval(batch_example)


def _subtree(tree: Any, like: dict) -> Any:
    """The part of `tree` at the paths of the nested dict `like`."""
    if isinstance(like, dict):
        return {k: _subtree(tree[k], v) for k, v in like.items()}
    return tree


def _overlay(params: Any, loaded: Any) -> Any:
    """params with the leaves that `loaded` (a nested dict over some of its paths) has replaced."""
    if isinstance(loaded, dict):
        return {k: _overlay(v, loaded[k]) if k in loaded else v for k, v in params.items()}
    return loaded


class CompiledSteps:
    """The train and eval steps, compiled once per global batch shape (length-bucketed data has a
    few shapes; a plain run has one)."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer
        self._train: dict = {}
        self._eval: dict = {}

    @staticmethod
    def _key(batch: dict) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def compiled_train(self, batch: dict):
        key = self._key(batch)
        if key not in self._train:
            if self._train:
                logging.info("compiling the train step for another batch shape: %s",
                             {k: tuple(v.shape) for k, v in batch.items()})
            self._train[key] = self._trainer.compile_train(batch)
        return self._train[key]

    def train(self, state: TrainState, batch: dict):
        return self.compiled_train(batch)(state, batch)

    def eval(self, params, batch: dict):
        key = self._key(batch)
        if key not in self._eval:
            self._eval[key] = self._trainer.compile_eval(batch)
        return self._eval[key](params, batch)


def evaluate(trainer: Trainer, eval_fn, params, data, max_batches: int = 0) -> dict:
    """Metrics over the whole eval split (or its first max_batches batches)."""
    return evaluate_with_report(trainer, eval_fn, params, data, max_batches)[0]


def evaluate_with_report(trainer: Trainer, eval_fn, params, data, max_batches: int = 0) -> tuple[dict, dict]:
    """(scalars for the writers, the task's full eval report: e.g. per-class values, confusion matrix)."""
    totals = None
    for i, batch in enumerate(data.eval_batches()):
        if max_batches and i >= max_batches:
            break
        update = eval_fn(params, sharding.to_global(batch, trainer.mesh))
        totals = update if totals is None else totals.merge(update)
    if totals is None:
        raise UserError("the eval split yielded no batches: check data.eval_file / data.eval_split")
    computed = jax.device_get(totals.compute())
    scalars = trainer.task.eval_summary(computed, data)
    report = trainer.task.eval_report(computed, data) if hasattr(trainer.task, "eval_report") else dict(scalars)
    return scalars, report


EVAL_REPORT = "eval_report.json"


def write_eval_report(workdir: str, step: int, report: dict) -> None:
    """DIR/eval_report.json: the latest evaluation in full (process 0 only)."""
    if jax.process_index() == 0:
        write_json_atomically(os.path.join(workdir, EVAL_REPORT), {"step": step, **report})


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


def check_batch_layout(config: ml_collections.ConfigDict, mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    micro = config.global_batch_size // config.grad_accum_steps
    if micro % dp:
        raise UserError(
            f"global_batch_size={config.global_batch_size} (micro-batch {micro} with grad_accum_steps="
            f"{config.grad_accum_steps}) is not divisible by the data-parallel size mesh.data x mesh.fsdp = {dp}")
    if config.global_batch_size % jax.process_count():
        raise UserError(f"global_batch_size={config.global_batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final metrics."""
    start_time = time.time()
    is_primary = jax.process_index() == 0

    # == 1. Validate: config, workdir, mesh (nothing is written before these pass) ============
    init_source = pretrained_lib.resolve_init_from(config)  # Its model and tokenizer replace the config's.
    config_lib.validate(config)
    config_lib.check_resumable(workdir, config)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_layout(config, mesh)

    # == 2. Data: tokenizer, resumable train iterator, exact eval batches =======================
    data = get_task(config.task).build_data(config, workdir, jax.process_index(), jax.process_count())
    resolve_vocab(config, data.vocab_size)
    config_lib.check_resumable(workdir, config)  # Again, now that vocab_size is known.

    # == 3. Model, optimizer, shardings =======================================================
    trainer = Trainer(config, mesh)
    logging.info("model: %s parameters; mesh %s", f"{trainer.num_params:,}", dict(mesh.shape))
    if is_primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    # == 4. Restore the latest checkpoint, or initialise ========================================
    checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every,
                                every_minutes=config.checkpoint_every_minutes,
                                keep=config.keep_checkpoints, asynchronous=config.async_checkpointing)
    latest = checkpointer.latest_step()
    if latest is not None:
        logging.info("resuming from step %d", latest)
        state = checkpointer.restore(latest, trainer.abstract_sharded_state(), data.train_iter)
        if is_primary:
            truncate_metrics(workdir, latest)
    else:
        loaded = init_source.load(trainer.abstract_state.params) if init_source else None
        state = trainer.init_state(config.seed, pretrained=loaded)
        del loaded
    start_step = int(jax.device_get(state.step))
    best = BestCheckpoint(workdir, config.best_metric, config.best_mode) if config.best_metric else None

    # == 5. Writers, progress, compiled steps =================================================
    writer = create_writer(workdir, is_primary, config.wandb, config.to_dict())
    progress = periodic_actions.ReportProgress(num_train_steps=config.steps, every_steps=config.log_every,
                                               writer=metric_writers.LoggingWriter())
    first_batch = next(data.train_iter)
    steps = CompiledSteps(trainer)
    steps.compiled_train(sharding.to_global(first_batch, mesh))  # Compiled before the loop's clock starts.
    train_fn, eval_fn = steps.train, steps.eval
    vocab_projection = trainer.task.head in ("lm", "mlm")  # A classifier's head is tiny.
    peak, peak_source = metrics_lib.device_peak_flops()
    metrics_lib.log_mfu_source(peak_source)

    # == 6. Loop ==============================================================================
    final: dict = {}
    pending = None  # Train metrics since the last log, still on device.
    interval_start, interval_steps = time.perf_counter(), 0
    interval_tokens, interval_flops = 0, 0.0  # From each batch's real shape (bucketing varies it).
    batch: Optional[dict] = first_batch
    preemption = PreemptionWatch()
    loop_start = time.monotonic()
    try:
        for step in range(start_step + 1, config.steps + 1):
            if batch is None:
                batch = next(data.train_iter)
            state, step_metrics = train_fn(state, sharding.to_global(batch, mesh))
            length = metrics_lib.batch_length(batch, config.seq_len)
            interval_tokens += config.global_batch_size * length
            interval_flops += config.global_batch_size * length * metrics_lib.train_flops_per_token(
                trainer.model_config, length, vocab_projection)
            batch = None
            pending = step_metrics if pending is None else pending.merge(step_metrics)
            interval_steps += 1
            progress(step)
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
                })
            if (config.eval_every and step % config.eval_every == 0) or last:
                eval_scalars, report = evaluate_with_report(trainer, eval_fn, state.params, data,
                                                            config.eval_batches)
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
                interval_tokens, interval_flops = 0, 0.0
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
        if start_step >= config.steps:  # Already finished: report the final evaluation again.
            final.update(evaluate(trainer, eval_fn, state.params, data, config.eval_batches))
            final["step"] = start_step
    except TrainingDiverged as e:
        checkpointer.close()
        last = checkpointer.latest_step()
        raise TrainingDiverged(f"{e}; stopped without saving. The last good checkpoint is step {last} "
                               f"in {checkpointer.directory}: lower optim.learning_rate or raise "
                               f"optim.warmup_steps, then rerun to resume from it") from None
    checkpointer.close()
    if best is not None:
        best.close()
    writer.close()
    final["wall_seconds"] = time.time() - start_time
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
    return f"final (step {final.get('step')}, {final.get('wall_seconds', 0):.0f}s): " + "  ".join(parts)


def summary_json(final: dict) -> str:
    return json.dumps({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in final.items()})
