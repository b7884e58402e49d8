"""Checks on a config that need more than the field table: values, combinations, and whether a
workdir's saved run can be resumed with it. Every failure is a UserError naming the field.
"""

from typing import Any

import ml_collections
from absl import logging

from jaxlm import io
from jaxlm.config import check_known_fields
from jaxlm.data import table_files
from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig
from jaxlm.tasks import task_names

POOLINGS = ("auto", "cls", "mean", "last")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no devices or data. Raises UserError naming the field."""
    check_known_fields(config)
    if config.task not in task_names():
        raise UserError(f"task={config.task!r}: choose one of {', '.join(task_names())}")
    for field in ("steps", "global_batch_size", "seq_len", "grad_accum_steps", "log_every",
                  "keep_checkpoints"):
        if config[field] <= 0:
            raise UserError(f"{field}={config[field]}: must be positive")
    for field in ("eval_every", "checkpoint_every", "eval_batches", "loss_chunk_size"):
        if config[field] < 0:
            raise UserError(f"{field}={config[field]}: must be 0 or positive")
    if config.global_batch_size % config.grad_accum_steps:
        raise UserError(f"global_batch_size={config.global_batch_size} is not divisible by "
                        f"grad_accum_steps={config.grad_accum_steps}")
    if config.seq_len > config.model.max_len:
        raise UserError(f"seq_len={config.seq_len} is longer than model.max_len={config.model.max_len}: "
                        f"lower seq_len or raise model.max_len")
    model = {**config.model.to_dict(), "vocab_size": max(config.model.vocab_size, 1)}
    problems = ModelConfig.from_dict(model).problems()
    if problems:
        raise UserError(problems[0])
    from jaxlm.optim import validate_optim  # pylint: disable=import-outside-toplevel  (optax stays lazy)
    validate_optim(config.optim)
    _validate_task_fields(config)


def _validate_task_fields(config: ml_collections.ConfigDict) -> None:
    """The fields of the classification and masked-LM tasks, the time budget and best checkpoint."""
    if config.train_time_budget_minutes < 0:
        raise UserError(f"train_time_budget_minutes={config.train_time_budget_minutes}: must be 0 (off) or positive")
    if config.best_mode not in ("max", "min"):
        raise UserError(f"best_mode={config.best_mode!r}: choose max or min")
    if config.best_metric and not config.best_metric.startswith("eval/"):
        raise UserError(f"best_metric={config.best_metric!r}: name an eval metric, e.g. eval/accuracy or eval/f1")
    if config.classification.pooling not in POOLINGS:
        raise UserError(f"classification.pooling={config.classification.pooling!r}: "
                        f"choose one of {', '.join(POOLINGS)}")
    if config.data.length_buckets < 1:
        raise UserError(f"data.length_buckets={config.data.length_buckets}: must be 1 (off) or more")
    if config.data.num_labels < 0:
        raise UserError(f"data.num_labels={config.data.num_labels}: must be 0 (from the data) or positive")
    if config.data.packing not in ("concat", "segmented"):
        raise UserError(f"data.packing={config.data.packing!r}: choose concat or segmented")
    if config.data.packing == "segmented" and config.task != "causal_lm":
        raise UserError(f"data.packing=segmented packs causal-LM documents; task={config.task} does not "
                        f"pack, so leave data.packing=concat")
    if config.data.num_workers < 0:
        raise UserError(f"data.num_workers={config.data.num_workers}: must be 0 (a thread) or positive")
    if config.data.mixture.strip() and config.task != "causal_lm":
        raise UserError(f"data.mixture mixes causal-LM sources; task={config.task} reads data.train_file or "
                        f"data.tfds_name, so clear data.mixture")
    if config.data.file_format not in table_files.FORMATS:  # Checked before anything is written.
        raise UserError(f"data.file_format={config.data.file_format!r}: choose {', '.join(table_files.FORMATS)}")
    mlm = config.mlm
    if not 0.0 < mlm.mask_rate < 1.0:
        raise UserError(f"mlm.mask_rate={mlm.mask_rate}: must be in (0, 1)")
    if mlm.mask_token_rate < 0 or mlm.random_token_rate < 0 or mlm.mask_token_rate + mlm.random_token_rate > 1:
        raise UserError(f"mlm.mask_token_rate={mlm.mask_token_rate} and mlm.random_token_rate="
                        f"{mlm.random_token_rate}: must be >= 0 and add up to at most 1")


# Model fields that decide parameter shapes: a workdir written with other values can't resume.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "d_ff", "activation", "norm", "positions", "max_len", "tie_embeddings",
                "use_bias", "type_vocab_size", "embed_norm", "norm_position", "scan_layers")


def saved_run_config(workdir: str) -> dict:
    """DIR/config.json as a dict ({} when the workdir holds no run yet)."""
    path = io.path(workdir) / "config.json"
    if not io.exists(path):
        return {}
    saved = io.read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) or "task" not in saved:
        raise UserError(f"{path}: not a jaxlm run config (no task or model section); use a fresh --workdir")
    return saved


def keep_saved_loader(workdir: str, saved: dict, config: ml_collections.ConfigDict) -> None:
    """A resumed LM run keeps the data.loader it started with (its checkpoints hold that loader's
    position); runs from before data.loader existed used token_cache. `saved`: DIR/config.json."""
    if not saved or config.task not in ("causal_lm", "masked_lm"):
        return
    loader = saved.get("data", {}).get("loader", "token_cache")
    if loader != config.data.loader:
        logging.warning("--workdir=%s started with data.loader=%s; resuming with it (not %s)", workdir, loader,
                        config.data.loader)
        config.data.loader = loader


def keep_saved_labels(workdir: str, saved: dict, config: ml_collections.ConfigDict) -> None:
    """A resumed classifier keeps the classes it started with (DIR/config.json's data.label_names
    and data.label_kind) unless the command line sets them: how the train labels map to classes
    may have changed since (integer labels from 1 became names), its checkpoints have not."""
    if not saved or config.task != "classification":
        return
    saved_data = saved.get("data", {})
    chosen = any(config.data.get(field) for field in ("label_names", "label_kind", "num_labels"))
    if chosen or not saved_data.get("label_names"):
        return
    with config.data.ignore_type():
        config.data.label_names = list(saved_data["label_names"])
        config.data.label_kind = saved_data.get("label_kind", "") or ""
    logging.info("--workdir=%s: resuming with its classes %s (data.label_kind=%s)", workdir,
                 ", ".join(config.data.label_names), config.data.label_kind or "from the labels")


def check_resumable(workdir: str, saved: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir holding a run (`saved`: its config.json) whose task, classes or model
    shapes differ from the resolved `config` (every value here is final: vocab size and labels
    come from the data)."""
    if not saved:
        return
    if saved.get("task") != config.task:
        raise UserError(f"--workdir={workdir} holds a {saved.get('task')} run but task={config.task}; "
                        f"use a fresh --workdir")
    saved_data = saved.get("data", {})
    for field in ("num_labels", "label_names", "label_kind"):  # The classifier's classes.
        value = config.data.get(field)
        if saved_data.get(field) and value and _as_list(saved_data[field]) != _as_list(value):
            raise UserError(f"--workdir={workdir} holds a run with data.{field}={saved_data[field]!r} but the data "
                            f"now gives {value!r}; use a fresh --workdir or the original data")
    saved_model, model = saved.get("model", {}), config.model.to_dict()
    for field in SHAPE_FIELDS:
        if field in saved_model and saved_model[field] != model[field]:
            raise UserError(
                f"--workdir={workdir} holds a run with model.{field}={saved_model[field]!r} but the config "
                f"says {model[field]!r}; use a fresh --workdir or set --config.model.{field}={saved_model[field]}")


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else value
