"""Configs: the base ConfigDict every recipe starts from, loading, overrides and validation.

A recipe is a python file under configs/ with `get_config(arg=None)` returning an ml_collections
ConfigDict built from `base_config()`. `--config=configs/x.py:runlocal` passes "runlocal" as
`arg` (big_vision's habit: one switch that shrinks a recipe for a laptop). Every field has a
one-line comment here; `jaxlm train --help_config` prints them.
"""

import ast
import importlib.util
import json
import os
from typing import Any

import ml_collections

from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig

TASKS = ("causal_lm", "masked_lm", "classification")

# field -> one-line help. Keys are dotted paths; printed by `--help_config`.
FIELD_HELP = {
    "task": "causal_lm | masked_lm | classification",
    "seed": "seeds parameter init, data order and dropout",
    "steps": "optimizer steps to train (each one global batch)",
    "global_batch_size": "sequences per optimizer step, over all hosts and devices",
    "seq_len": "tokens per training sequence",
    "grad_accum_steps": "micro-batches per step (global_batch_size is split into them)",
    "log_every": "steps between train metric logs",
    "eval_every": "steps between evaluations (0: only at the end)",
    "eval_batches": "eval batches per evaluation (0: the whole eval split)",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "checkpoint_every_minutes": "also save when this many minutes passed since the last save (0: off)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "async_checkpointing": "write checkpoints in the background",
    "init_from": "a jaxlm run directory or Hugging Face model directory to start from (its model and tokenizer win)",
    "train_time_budget_minutes": "stop training after this many minutes of the loop, then evaluate and save (0: off)",
    "best_metric": "keep the params of the best evaluation by this metric in DIR/best ('' : off), e.g. eval/f1",
    "best_mode": "max | min: whether a higher or lower best_metric is better",
    "model.vocab_size": "0: take it from the tokenizer (rounded up to vocab_multiple)",
    "model.vocab_multiple": "vocab padding multiple, so the vocab axis shards evenly",
    "model.num_layers": "Transformer layers",
    "model.d_model": "hidden size",
    "model.num_heads": "query heads",
    "model.num_kv_heads": "key/value heads (0: = num_heads; 1: MQA; else GQA)",
    "model.head_dim": "0: d_model // num_heads",
    "model.d_ff": "MLP hidden size",
    "model.activation": "gelu | gelu_tanh | relu | silu | swiglu | geglu",
    "model.norm": "layernorm | rmsnorm",
    "model.norm_eps": "epsilon inside the norms",
    "model.norm_position": "pre (GPT-2, Llama) | post (BERT)",
    "model.positions": "learned | rope | none",
    "model.max_len": "longest sequence the model accepts",
    "model.rope_theta": "RoPE base frequency",
    "model.tie_embeddings": "share the token embedding with the output projection",
    "model.use_bias": "biases in dense layers and layernorms",
    "model.type_vocab_size": "token-type (segment) embeddings, 0 for none",
    "model.embed_norm": "a norm right after the embeddings (BERT)",
    "model.causal": "causal (decoder) or bidirectional (encoder) attention",
    "model.dropout": "dropout on embeddings and residual branches",
    "model.dtype": "compute dtype: float32 | bfloat16 | float16",
    "model.param_dtype": "parameter dtype (keep float32)",
    "model.scan_layers": "nn.scan over layers: compile time independent of depth",
    "model.remat_policy": "none | full | dots | dots_no_batch",
    "model.attention_impl": "auto | xla | cudnn (jax.nn.dot_product_attention)",
    "model.init_std": "stddev of the normal initializer",
    "optim.name": "adamw | adafactor | lion | sgd",
    "optim.learning_rate": "peak learning rate",
    "optim.schedule": "cosine | linear | constant (after warmup)",
    "optim.warmup_steps": "linear warmup from 0",
    "optim.end_lr_ratio": "final learning rate as a fraction of the peak",
    "optim.weight_decay": "decoupled weight decay",
    "optim.b1": "first-moment decay (adamw, lion)",
    "optim.b2": "second-moment decay (adamw, lion)",
    "optim.eps": "adamw epsilon",
    "optim.momentum": "sgd momentum",
    "optim.clip_norm": "global gradient norm clip (0: off)",
    "optim.decay_embeddings": "apply weight decay to embeddings too",
    "optim.decay_norms_and_biases": "apply weight decay to norm scales and biases too",
    "data.train_file": "local file(s): path, glob or comma-separated list (text; CSV/TSV/JSONL for classification)",
    "data.eval_file": "held-out file(s); empty: hold out the end of the train files (classification: random rows)",
    "data.eval_fraction": "fraction of documents held out when there is no eval_file",
    "data.doc_split": "blank_line | line | file: what counts as one document",
    "data.tfds_name": "a prepared tfds dataset by name (lm1b, c4/en, ...) instead of files",
    "data.text_key": "feature holding the text in a tfds dataset",
    "data.train_split": "tfds split to train on",
    "data.eval_split": "tfds split to evaluate on",
    "data.data_dir": "tfds data_dir ('' = TFDS_DATA_DIR or ~/tensorflow_datasets)",
    "data.text_column": "classification: column (CSV/TSV), key (JSONL) or tfds feature holding the text",
    "data.text_pair_column": "classification: a second text column for sentence pairs ('' = none)",
    "data.label_column": "classification: column/key/feature holding the label (integer or name)",
    "data.label_names": "classification: label names in index order, comma-separated ('' = from the train data)",
    "data.num_labels": "classification: number of classes (0 = from the data)",
    "data.file_format": "classification files: auto (by extension) | csv | tsv | jsonl",
    "data.length_buckets": "classification: batch sequence lengths seq_len, seq_len/2, ... (1 = always seq_len)",
    "data.tokenizer": "bpe (train one on the corpus) | a tokenizer directory | a hub name",
    "data.bpe_vocab_size": "vocabulary size of the trained BPE",
    "data.prefetch": "batches prepared ahead of the step",
    "classification.pooling": "auto (causal: last; else cls if the tokenizer has [CLS], else mean) | cls | mean | last",
    "classification.pooler": "BERT's tanh dense layer on the pooled vector before the classifier",
    "classification.class_weights": "loss weight per class: '' (equal) | balanced | comma-separated numbers",
    "classification.positive_label": "positive class of binary P/R/F1 ('' = the label 'positive' if any, else 1)",
    "mlm.mask_rate": "fraction of (non-special) tokens selected for prediction",
    "mlm.mask_token_rate": "of those, the fraction replaced by the mask token",
    "mlm.random_token_rate": "of those, the fraction replaced by a random token (the rest stay unchanged)",
    "mesh.data": "data-parallel axis size (-1: the devices left over)",
    "mesh.fsdp": "fully-sharded data-parallel axis size (-1: the devices left over)",
    "mesh.tensor": "tensor-parallel axis size (-1: the devices left over)",
    "mesh.dcn_data": "data-parallel size across slices (multi-slice)",
    "mesh.dcn_fsdp": "fsdp size across slices (multi-slice)",
    "wandb.enabled": "also log to Weights & Biases (needs the wandb extra)",
    "wandb.project": "W&B project",
    "wandb.entity": "W&B entity (team or user)",
    "wandb.name": "W&B run name ('' = the workdir's name)",
}


def base_config() -> ml_collections.ConfigDict:
    """Every field any recipe may set, with defaults (see FIELD_HELP for what each means)."""
    c = ml_collections.ConfigDict()
    c.task = "causal_lm"
    c.seed = 0
    c.steps = 1000
    c.global_batch_size = 32
    c.seq_len = 128
    c.grad_accum_steps = 1
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 0
    c.checkpoint_every = 500
    c.checkpoint_every_minutes = 0.0
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.init_from = ""
    c.train_time_budget_minutes = 0.0
    c.best_metric = ""
    c.best_mode = "max"

    model = ModelConfig().to_dict()
    model["vocab_size"] = 0
    model["vocab_multiple"] = 128
    c.model = ml_collections.ConfigDict(model)

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=3e-4, schedule="cosine", warmup_steps=100, end_lr_ratio=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, momentum=0.9, clip_norm=1.0,
        decay_embeddings=False, decay_norms_and_biases=False))

    c.data = ml_collections.ConfigDict(dict(
        train_file="", eval_file="", eval_fraction=0.1, doc_split="blank_line", tfds_name="",
        text_key="text", train_split="train", eval_split="validation", data_dir="",
        tokenizer="bpe", bpe_vocab_size=1024, prefetch=2,
        text_column="text", text_pair_column="", label_column="label", label_names="", num_labels=0,
        file_format="auto", length_buckets=1))

    c.classification = ml_collections.ConfigDict(dict(
        pooling="auto", pooler=False, class_weights="", positive_label=""))
    c.mlm = ml_collections.ConfigDict(dict(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="jaxlm", entity="", name=""))
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py` or `path.py:arg` by calling its get_config([arg])."""
    path, _, arg = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path!r}; pass a recipe such as configs/tiny_shakespeare.py")
    module_spec = importlib.util.spec_from_file_location("jaxlm_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A broken recipe is the user's file: name it.
        raise UserError(f"--config: {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"--config: {path} has no get_config() function")
    config = module.get_config(arg) if arg else module.get_config()
    return config


def parse_value(text: str, current: Any, field: str) -> Any:
    """Parses an override's text into the type of the field it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UserError(f"--config.{field}={text}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--config.{field}={text}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--config.{field}={text}: expected a number") from None
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Applies `--config.a.b=value` overrides; an unknown field is a UserError."""
    for field, text in overrides.items():
        node = config
        parts = field.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserError(f"--config.{field}: unknown config field {'.'.join(parts[:i + 1])!r}; "
                                f"run with --help_config to list the fields")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise UserError(f"--config.{field}: unknown config field {field!r}; "
                            f"run with --help_config to list the fields")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise UserError(f"--config.{field}: is a section, set one of its fields instead")
        with node.ignore_type():
            node[leaf] = parse_value(text, node[leaf], field)


def check_known_fields(config: ml_collections.ConfigDict) -> None:
    """A recipe may only set fields the base config knows (catches typos in recipes)."""
    known = base_config()

    def walk(node, ref, prefix):
        for key in node.keys():
            name = f"{prefix}{key}"
            if key not in ref:
                raise UserError(f"config field {name!r} is unknown; run with --help_config to list the fields")
            if isinstance(node[key], ml_collections.ConfigDict):
                walk(node[key], ref[key], name + ".")

    walk(config, known, "")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no devices or data. Raises UserError naming the field."""
    check_known_fields(config)
    if config.task not in TASKS:
        raise UserError(f"task={config.task!r}: choose one of {', '.join(TASKS)}")
    for field in ("steps", "global_batch_size", "seq_len", "grad_accum_steps", "log_every",
                  "keep_checkpoints"):
        if config[field] <= 0:
            raise UserError(f"{field}={config[field]}: must be positive")
    for field in ("eval_every", "checkpoint_every", "eval_batches"):
        if config[field] < 0:
            raise UserError(f"{field}={config[field]}: must be 0 or positive")
    if config.global_batch_size % config.grad_accum_steps:
        raise UserError(f"global_batch_size={config.global_batch_size} is not divisible by "
                        f"grad_accum_steps={config.grad_accum_steps}")
    if config.seq_len > config.model.max_len:
        raise UserError(f"seq_len={config.seq_len} is longer than model.max_len={config.model.max_len}: "
                        f"lower seq_len or raise model.max_len")
    problems = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": max(config.model.vocab_size, 1)}).problems()
    if problems:
        raise UserError(problems[0])
    from jaxlm.optim import validate_optim  # Local: optim imports optax, config stays light.
    validate_optim(config.optim)
    validate_task_fields(config)


POOLINGS = ("auto", "cls", "mean", "last")


def validate_task_fields(config: ml_collections.ConfigDict) -> None:
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
    if config.data.file_format not in ("auto", "csv", "tsv", "jsonl"):
        raise UserError(f"data.file_format={config.data.file_format!r}: choose auto, csv, tsv or jsonl")
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


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir holding a run whose model shapes differ from `config`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); use a fresh --workdir") from e
    if saved.get("task") != config.task:
        raise UserError(f"--workdir={workdir} holds a {saved.get('task')} run but task={config.task}; "
                        f"use a fresh --workdir")
    saved_data = saved.get("data", {})
    for field in ("num_labels", "label_names"):  # The classifier's classes, once resolved.
        value = config.data.get(field)
        if saved_data.get(field) and value and _as_list(saved_data[field]) != _as_list(value):
            raise UserError(f"--workdir={workdir} holds a run with data.{field}={saved_data[field]!r} but the data "
                            f"now gives {value!r}; use a fresh --workdir or the original data")
    saved_model, model = saved.get("model", {}), config.model.to_dict()
    for field in SHAPE_FIELDS:
        if field == "vocab_size" and model[field] == 0:
            continue  # Resolved from the run's own tokenizer later, checked then.
        if field in saved_model and saved_model[field] != model[field]:
            raise UserError(
                f"--workdir={workdir} holds a run with model.{field}={saved_model[field]!r} but the config "
                f"says {model[field]!r}; use a fresh --workdir or set --config.model.{field}={saved_model[field]}")


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else value


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def describe_fields() -> str:
    """The text printed by --help_config: every field, its default and its meaning."""
    flat = flatten(base_config())
    width = max(len(k) for k in flat)
    return "\n".join(f"  {k.ljust(width)}  {flat[k]!r:<14} {FIELD_HELP.get(k, '')}" for k in flat)


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
