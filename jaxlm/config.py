"""Configs: the one table of fields (default + help), loading a recipe, overrides, printing.

A recipe is a python file under configs/ with `get_config(arg=None)` returning an ml_collections
ConfigDict built from `base_config()`. `--config=configs/x.py:runlocal` passes "runlocal" as
`arg` (big_vision's habit: one switch that shrinks a recipe for a laptop). Every field has its
default and a one-line help in `FIELDS`; `jaxlm train --help_config` prints them (a recipe's
values when --config is given). Checks that need more than the table live in `config_checks`.
"""

import ast
import importlib.util
import json
import os
from typing import Any, Optional

import ml_collections

from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig
from jaxlm.scaling.config import SCALING_FIELDS

_M = ModelConfig()

# field -> (default, one-line help). Dotted keys are sections; `base_config` builds from this.
FIELDS: dict[str, tuple[Any, str]] = {
    "task": ("causal_lm", "causal_lm | masked_lm | classification"),
    "seed": (0, "seeds parameter init, data order and dropout"),
    "steps": (1000, "optimizer steps to train (each one global batch)"),
    "global_batch_size": (32, "sequences per optimizer step, over all hosts and devices"),
    "seq_len": (128, "tokens per training sequence"),
    "grad_accum_steps": (1, "micro-batches per step (global_batch_size is split into them)"),
    "loss_chunk_size": (0, "causal_lm, masked_lm: tokens per chunk of the vocabulary projection + cross-entropy "
                        "(train and eval loss; never the full [batch, seq, vocab] logits); 0: off, full logits"),
    "log_every": (50, "steps between train metric logs"),
    "eval_every": (500, "steps between evaluations (0: only at the end)"),
    "eval_batches": (0, "eval batches per evaluation (0: the whole eval split)"),
    "checkpoint_every": (500, "steps between checkpoints (0: only at the end)"),
    "checkpoint_every_minutes": (0.0, "also save when this many minutes passed since the last save (0: off)"),
    "keep_checkpoints": (3, "how many recent checkpoints to keep"),
    "async_checkpointing": (True, "write checkpoints in the background"),
    "lease_timeout_minutes": (5.0, "jaxlm train holds DIR/lease.json; another run takes it over once the holder's "
                              "heartbeat is this old (at once when the holder's pid on this host is gone)"),
    "init_from": ("", "a jaxlm run or Hugging Face model directory to start from (its model and tokenizer win)"),
    "train_time_budget_minutes": (0.0, "stop after this many minutes of the loop, then evaluate and save (0: off)"),
    "best_metric": ("", "keep the params of the best evaluation by this metric in DIR/best ('' : off), e.g. eval/f1"),
    "best_mode": ("max", "max | min: whether a higher or lower best_metric is better"),

    "model.vocab_size": (0, "0: take it from the tokenizer (rounded up to vocab_multiple)"),
    "model.vocab_multiple": (128, "vocab padding multiple, so the vocab axis shards evenly"),
    "model.num_layers": (_M.num_layers, "Transformer layers"),
    "model.d_model": (_M.d_model, "hidden size"),
    "model.num_heads": (_M.num_heads, "query heads"),
    "model.num_kv_heads": (_M.num_kv_heads, "key/value heads (0: = num_heads; 1: MQA; else GQA)"),
    "model.head_dim": (_M.head_dim, "0: d_model // num_heads"),
    "model.d_ff": (_M.d_ff, "MLP hidden size"),
    "model.activation": (_M.activation, "gelu | gelu_tanh | relu | silu | swiglu | geglu"),
    "model.norm": (_M.norm, "layernorm | rmsnorm"),
    "model.norm_eps": (_M.norm_eps, "epsilon inside the norms"),
    "model.norm_position": (_M.norm_position, "pre (GPT-2, Llama) | post (BERT)"),
    "model.positions": (_M.positions, "learned | rope | none"),
    "model.max_len": (_M.max_len, "longest sequence the model accepts"),
    "model.rope_theta": (_M.rope_theta, "RoPE base frequency"),
    "model.tie_embeddings": (_M.tie_embeddings, "share the token embedding with the output projection"),
    "model.use_bias": (_M.use_bias, "biases in dense layers and layernorms"),
    "model.type_vocab_size": (_M.type_vocab_size, "token-type (segment) embeddings, 0 for none"),
    "model.embed_norm": (_M.embed_norm, "a norm right after the embeddings (BERT)"),
    "model.causal": (_M.causal, "causal (decoder) or bidirectional (encoder) attention"),
    "model.dropout": (_M.dropout, "dropout on embeddings and residual branches"),
    "model.attention_dropout": (_M.attention_dropout, "dropout on attention probabilities in training (>0: "
                                "the train step's attention runs on the explicit XLA path, not cuDNN/splash)"),
    "model.dtype": (_M.dtype, "compute dtype: float32 | bfloat16 | float16"),
    "model.param_dtype": (_M.param_dtype, "parameter dtype (keep float32)"),
    "model.matmul_dtype": (_M.matmul_dtype, "dtype of the matmuls' inputs, results in model.dtype "
                                            "('' = model.dtype; bfloat16 with dtype float32: bf16 matmuls only)"),
    "model.scan_layers": (_M.scan_layers, "nn.scan over layers: compile time independent of depth"),
    "model.remat_policy": (_M.remat_policy, "none | full | dots | dots_no_batch"),
    "model.attention_impl": (_M.attention_impl, "auto (TPU: splash, GPU: cudnn, else xla) | xla | cudnn | splash"),
    "model.init_std": (_M.init_std, "stddev of the normal initializer"),

    "optim.name": ("adamw", "adamw | adafactor | lion | sgd"),
    "optim.learning_rate": (3e-4, "peak learning rate"),
    "optim.schedule": ("cosine", "cosine | linear | constant (after warmup)"),
    "optim.warmup_steps": (100, "linear warmup from 0"),
    "optim.end_lr_ratio": (0.1, "final learning rate as a fraction of the peak"),
    "optim.weight_decay": (0.1, "decoupled weight decay"),
    "optim.b1": (0.9, "first-moment decay (adamw, lion)"),
    "optim.b2": (0.95, "second-moment decay (adamw, lion)"),
    "optim.eps": (1e-8, "adamw epsilon"),
    "optim.momentum": (0.9, "sgd momentum"),
    "optim.clip_norm": (1.0, "global gradient norm clip (0: off)"),
    "optim.decay_embeddings": (False, "apply weight decay to embeddings too"),
    "optim.decay_norms_and_biases": (False, "apply weight decay to norm scales and biases too"),

    "data.train_file": ("", "local file(s): path, glob or comma-separated list (classification: CSV/TSV/JSONL/Parquet)"),
    "data.eval_file": ("", "held-out file(s); empty: hold out the end of the train files (or random rows)"),
    "data.eval_fraction": (0.1, "fraction of documents held out when there is no eval_file"),
    "data.doc_split": ("blank_line", "blank_line | line | file | jsonl (a JSON object per line or a Parquet "
                       "row, its 'text') | jsonl:KEY: what counts as one document; .gz/.bz2/.xz/.zst files are "
                       "read compressed"),
    "data.tfds_name": ("", "a prepared tfds dataset by name (lm1b, c4/en, ...) instead of files"),
    "data.text_key": ("text", "feature holding the text in a tfds dataset"),
    "data.train_split": ("train", "tfds split to train on"),
    "data.eval_split": ("validation", "tfds split to evaluate on"),
    "data.data_dir": ("", "tfds data_dir ('' = TFDS_DATA_DIR or ~/tensorflow_datasets)"),
    "data.tokenizer": ("bpe", "bpe (train one on the corpus) | a tokenizer directory | a hub name"),
    "data.bpe_vocab_size": (1024, "vocabulary size of the trained BPE"),
    "data.bpe_sample_mb": (8, "MiB of train text the BPE trains on, sampled evenly over the corpus"),
    "data.mixture": ("", "causal_lm: weighted sources instead of train_file/tfds_name, e.g. "
                     "'tfds:wiki40b/en@0.7, file:/data/code/*.txt@0.3' (weights pick documents)"),
    "data.loader": ("stream", "causal_lm, masked_lm: stream (each host tokenizes its rows' documents while training) | "
                    "token_cache (tokenize the whole split first; a resumed run keeps the loader it started with)"),
    "data.num_workers": (0, "stream loader: grain worker processes tokenizing (0: a thread in the trainer)"),
    "data.prefetch": (2, "batches prepared ahead of the step"),
    "data.packing": ("concat", "causal_lm: concat | segmented (attention and positions stay inside each document)"),
    "data.text_column": ("text", "classification: column (CSV/TSV), key (JSONL) or tfds feature holding the text"),
    "data.text_pair_column": ("", "classification: a second text column for sentence pairs ('' = none)"),
    "data.label_column": ("label", "classification: column/key/feature holding the label (integer or name)"),
    "data.label_names": ("", "classification: label names in index order, comma-separated ('' = from the train data)"),
    "data.num_labels": (0, "classification: number of classes (0 = from the data)"),
    "data.label_kind": ("", "classification: integer (class indices) | name ('': indices if the train labels are "
                        "integers from 0; integers from 1 (1..5 stars) or -1/1 name their classes)"),
    "data.file_format": ("auto", "classification files: auto (by extension) | csv | tsv | jsonl | parquet"),
    "data.header": (True, "classification CSV/TSV: the first row names the columns; false: every row is data and "
                    "columns are numbered from 1 (e.g. data.label_column=1 data.text_column=3)"),
    "data.length_buckets": (1, "classification: batch sequence lengths seq_len, seq_len/2, ... (1 = always seq_len)"),

    "classification.pooling": ("auto", "auto (causal: last; [CLS] if there is one; else mean) | cls | mean | last"),
    "classification.pooler": (False, "BERT's tanh dense layer on the pooled vector before the classifier"),
    "classification.class_weights": ("", "loss weight per class: '' (equal) | balanced | comma-separated numbers"),
    "classification.positive_label": ("", "positive class of binary P/R/F1 ('' = the label 'positive' if any, else 1)"),
    "mlm.mask_rate": (0.15, "fraction of (non-special) tokens selected for prediction"),
    "mlm.mask_token_rate": (0.8, "of those, the fraction replaced by the mask token"),
    "mlm.random_token_rate": (0.1, "of those, the fraction replaced by a random token (the rest stay unchanged)"),

    # Fine-tuning defaults (jaxlm/peft/finetuning.py): a run with init_from takes these instead of the
    # recipe's from-scratch values, except for the fields named in finetune.keep.
    "finetune.defaults": (True, "with init_from: optim.learning_rate, optim.warmup_steps, optim.weight_decay "
                          "(never on norms, biases, embeddings), model.dropout and model.attention_dropout take "
                          "the finetune.* values, and a classifier uses the source's pretrained pooler if it has one "
                          "(false: the recipe's, and the source's dropout)"),
    "finetune.learning_rate": (5e-5, "peak learning rate of full fine-tuning"),
    "finetune.peft_learning_rate": (5e-4, "peak learning rate with peft.method=lora or adalora (adapters want a higher rate)"),
    "finetune.warmup_fraction": (0.1, "warmup as a fraction of steps"),
    "finetune.weight_decay": (0.01, "decoupled weight decay of the matrices"),
    "finetune.dropout": (-1.0, "model.dropout and model.attention_dropout (-1: the source model's, e.g. a BERT's "
                         "hidden_dropout_prob and attention_probs_dropout_prob)"),
    "finetune.keep": ("", "comma-separated fields the fine-tuning defaults leave as they are (a recipe's own "
                      "fine-tuning values); jaxlm train adds every --config.* field of its command line"),

    # Parameter-efficient fine-tuning (jaxlm/peft/): adapters on a frozen init_from base.
    "peft.method": ("none", "none | lora (low-rank adapters on a frozen init_from model) | adalora (SVD-form "
                    "adapters whose ranks are pruned to a budget during training)"),
    "peft.rank": (8, "LoRA rank r of every adapter"),
    "peft.alpha": (8.0, "LoRA alpha: adapters add (alpha / rank) * A.B to their kernel"),
    "peft.dropout": (0.0, "dropout on the adapters' input in training, as peft's lora_dropout, in [0, 1): 0 merges the "
                     "adapters into their kernels in the step; > 0 runs each beside its layer (attention and MLP "
                     "kernels of the Transformer layers only); eval and export always merge"),
    "peft.targets": ("attn/(query|key|value|out)/kernel$", "regex (re.search) over '/'-joined param paths: the "
                     "kernels that get adapters, e.g. 'attn/(query|value)/kernel$' or add 'mlp/(wi|wo)/kernel$'"),
    "peft.trainable": ("^cls_head/", "regex over param paths: what trains in full besides the adapters (default: "
                       "the classification head); everything else is frozen"),
    # AdaLoRA (jaxlm/peft/adalora.py; names as Hugging Face peft's AdaLoraConfig, total_step = steps).
    "peft.init_r": (12, "AdaLoRA: initial rank of every adapted matrix (peft.alpha / init_r scales the update)"),
    "peft.target_r": (8, "AdaLoRA: average rank at the end (total budget = target_r x adapted matrices)"),
    "peft.tinit": (0, "AdaLoRA: steps of warmup before any pruning"),
    "peft.tfinal": (0, "AdaLoRA: last steps with the final rank mask frozen"),
    "peft.delta_t": (1, "AdaLoRA: steps between two rank allocations (peft's deltaT)"),
    "peft.beta1": (0.85, "AdaLoRA: EMA factor of the sensitivity |w * grad|"),
    "peft.beta2": (0.85, "AdaLoRA: EMA factor of the sensitivity's uncertainty"),
    "peft.orth_reg_weight": (0.5, "AdaLoRA: weight of the orthogonality regulariser |P'P - I| + |QQ' - I| in the loss"),

    "mesh.data": (-1, "data-parallel axis size (-1: the devices left over)"),
    "mesh.fsdp": (1, "fully-sharded data-parallel axis size (-1: the devices left over)"),
    "mesh.tensor": (1, "tensor-parallel axis size (-1: the devices left over)"),
    "mesh.dcn_data": (1, "data-parallel size across slices (multi-slice)"),
    "mesh.dcn_fsdp": (1, "fsdp size across slices (multi-slice)"),
    "wandb.enabled": (False, "also log to Weights & Biases (needs the wandb extra)"),
    "wandb.project": ("jaxlm", "W&B project"),
    "wandb.entity": ("", "W&B entity (team or user)"),
    "wandb.name": ("", "W&B run name ('' = the workdir's name)"),
}
FIELDS.update(SCALING_FIELDS)  # `jaxlm scaling`: the size rule and the fit (kept with that code).


def base_config() -> ml_collections.ConfigDict:
    """Every field any recipe may set, with its default from FIELDS."""
    root = ml_collections.ConfigDict()
    for key, (default, _) in FIELDS.items():
        *sections, leaf = key.split(".")
        node = root
        for section in sections:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        node[leaf] = default
    return root


def field_help(key: str) -> str:
    return FIELDS[key][1] if key in FIELDS else ""


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
    return module.get_config(arg) if arg else module.get_config()


def load_recipe(spec: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """A recipe with its `--config.*` overrides applied; unknown fields are UserErrors."""
    config = load_config(spec)
    check_known_fields(config)
    apply_overrides(config, overrides)
    keep_command_line(config, overrides)
    return config


def keep_command_line(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Adds the command line's fields to finetune.keep: the fine-tuning defaults never replace
    what the user set (jaxlm/peft/finetuning.py)."""
    if "finetune" not in config or not overrides:
        return
    kept = [k.strip() for k in str(config.finetune.keep).split(",") if k.strip()]
    config.finetune.keep = ",".join(kept + sorted(k for k in overrides if k not in kept))


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


def merge_saved(config: ml_collections.ConfigDict, saved: dict) -> None:
    """Copies a saved config.json's values onto `config`; fields this version lacks are skipped."""
    for key, value in saved.items():
        if key not in config:
            continue
        if isinstance(config[key], ml_collections.ConfigDict):
            if isinstance(value, dict):
                merge_saved(config[key], value)
            continue
        with config.ignore_type():
            config[key] = value


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def describe_fields(config: Optional[ml_collections.ConfigDict] = None) -> str:
    """The text printed by --help_config: every field, its value (the recipe's when `config` is
    given, else the default) and its meaning."""
    flat = flatten(config if config is not None else base_config())
    keys = [k for k in FIELDS if k in flat] + sorted(k for k in flat if k not in FIELDS)  # the table's order
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k.ljust(width)}  {flat[k]!r:<14} {field_help(k)}" for k in keys)


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{dotted field: value} of a ConfigDict."""
    return flatten_dict(config.to_dict(), prefix)


def flatten_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of nested dicts (e.g. a saved config.json)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
