"""Fine-tuning defaults and the peft.* checks, applied where init_from is resolved.

    source = resolve_init_from(config, saved)   # in resolve.resolve_run; saved: DIR/config.json or {}

A run that starts from a pretrained model (init_from: a Hugging Face directory or a jaxlm run)
takes fine-tuning values instead of the recipe's from-scratch ones: the peak learning rate
(finetune.learning_rate, or finetune.peft_learning_rate with LoRA), warmup as a fraction of the
steps, weight decay on matrices only, the source model's dropouts (model.dropout and
model.attention_dropout; finetune.dropout=-1) and, for a classifier, the source's pretrained
pooler where it has one (classification.pooler). A field named in finetune.keep keeps its value:
`jaxlm train` adds every field of its command line there, and a recipe lists its own fine-tuning
values. One log line says what was chosen and kept.

Runs that started before these defaults existed (a DIR/config.json without a finetune section)
resume with their recipe's values, as they were trained.
"""

from typing import Optional

import ml_collections
from absl import logging

from jaxlm import config as config_lib
from jaxlm import pretrained
from jaxlm.errors import UserError
from jaxlm.peft import adapted, targets

# peft fields a resumed run must keep: its checkpoints hold adapters of that shape and meaning.
PEFT_RESUME_FIELDS = ("method", "rank", "alpha", "targets", "trainable", "init_r")  # init_r: AdaLoRA's shapes
# The model's dropouts that finetune.dropout sets (-1: the source's, as transformers trains it).
DROPOUT_FIELDS = ("dropout", "attention_dropout")


def resolve_init_from(config: ml_collections.ConfigDict, saved: dict) -> Optional[pretrained.PretrainedSource]:
    """pretrained.resolve_init_from (config.model and data.tokenizer become the source's), then
    the peft checks and the fine-tuning defaults. `saved`: the workdir's config.json ({}: fresh)."""
    recipe_dropout = {field: config.model[field] for field in DROPOUT_FIELDS}  # init_from sets the source's
    source = pretrained.resolve_init_from(config)
    check_peft(config, source, saved)
    if source is not None:
        apply_defaults(config, saved, recipe_dropout, source)
    return source


def check_peft(config: ml_collections.ConfigDict, source, saved: dict) -> None:
    peft = config.peft
    if adapted.enabled(config):
        adapted.make_method(peft)  # method, rank, alpha, dropout
        for field in ("targets", "trainable"):
            targets.compile_regex(f"peft.{field}", peft[field])
        if source is None:
            raise UserError(f"peft.method={peft.method} adapts a pretrained model: set init_from to a Hugging Face "
                            "model directory or a jaxlm run")
    if not saved:
        return
    before = {"method": "none", **saved.get("peft", {})}
    now = peft.to_dict()
    fields = PEFT_RESUME_FIELDS if before["method"] != "none" or now["method"] != "none" else ()
    for field in fields:
        if field in before and before[field] != now[field]:
            raise UserError(f"the workdir holds a run with peft.{field}={before[field]!r} but the config says "
                            f"{now[field]!r}; its checkpoints hold other adapters: use a fresh --workdir or "
                            f"--config.peft.{field}={before[field]}")


def _validate(ft: ml_collections.ConfigDict) -> list[str]:
    for field in ("learning_rate", "peft_learning_rate"):
        if ft[field] <= 0:
            raise UserError(f"finetune.{field}={ft[field]}: must be positive")
    if not 0 <= ft.warmup_fraction < 1:
        raise UserError(f"finetune.warmup_fraction={ft.warmup_fraction}: must be in [0, 1)")
    if ft.weight_decay < 0:
        raise UserError(f"finetune.weight_decay={ft.weight_decay}: must be >= 0")
    if ft.dropout != -1 and not 0 <= ft.dropout < 1:
        raise UserError(f"finetune.dropout={ft.dropout}: -1 (the source model's) or in [0, 1)")
    keep = [k.strip() for k in str(ft.keep).split(",") if k.strip()]
    for key in keep:
        if key not in config_lib.FIELDS:
            raise UserError(f"finetune.keep names {key!r}, which is not a config field; run with --help_config")
    return keep


def apply_defaults(config: ml_collections.ConfigDict, saved: dict, recipe_dropout: dict,
                   source: pretrained.PretrainedSource) -> None:
    """recipe_dropout: the recipe's model.dropout and model.attention_dropout (DROPOUT_FIELDS),
    before init_from replaced them with the source's."""
    ft = config.finetune
    keep = _validate(ft)
    # A run that started before jaxlm had attention dropout resumes without it, as it trained.
    resumed_without = bool(saved) and "attention_dropout" not in saved.get("model", {})
    if resumed_without and "model.attention_dropout" not in keep:
        with config.model.ignore_type():
            config.model.attention_dropout = 0.0
        logging.info("model.attention_dropout=0.0: the run started before jaxlm had attention dropout")
    if not ft.defaults:
        return
    if saved and "finetune" not in saved:
        logging.info("fine-tuning defaults: off for this run, which started before they existed "
                     "(it resumes with its recipe's values)")
        return
    chosen, kept = [], []

    def choose(field: str, value, why: str = "") -> None:
        section, leaf = field.split(".")
        if field in keep:
            kept.append(f"{field}={config[section][leaf]!r}")
            return
        with config[section].ignore_type():
            config[section][leaf] = value
        chosen.append(f"{field}={value!r}{why}")

    lora = adapted.enabled(config)
    choose("optim.learning_rate", float(ft.peft_learning_rate if lora else ft.learning_rate),
           f" ({config.peft.method})" if lora else "")
    choose("optim.warmup_steps", int(round(ft.warmup_fraction * config.steps)),
           f" ({ft.warmup_fraction:g} of {config.steps} steps)")
    choose("optim.weight_decay", float(ft.weight_decay))
    choose("optim.decay_norms_and_biases", False)
    choose("optim.decay_embeddings", False)
    for leaf in DROPOUT_FIELDS:
        field = f"model.{leaf}"
        if leaf == "attention_dropout" and resumed_without and field not in keep:
            chosen.append(f"{field}=0.0 (as the run started)")
        elif field in keep:
            with config.model.ignore_type():
                config.model[leaf] = recipe_dropout[leaf]
            kept.append(f"{field}={recipe_dropout[leaf]!r}")
        elif ft.dropout >= 0:
            choose(field, float(ft.dropout))
        else:
            chosen.append(f"{field}={config.model[leaf]!r} (the source's)")
    if source.pooler and config.task == "classification":
        # As transformers' BertForSequenceClassification does: the pretrained pooler, kept
        # (6-class set, benchmarks/README.md: test accuracy 0.5024 -> 0.5220 with it). A resume
        # keeps what its run started with: runs from before this default have no pooler.
        if saved:
            choose("classification.pooler", bool(saved.get("classification", {}).get("pooler", False)),
                   " (as the run started)")
        else:
            choose("classification.pooler", True, " (the source's pretrained pooler)")
    logging.info("fine-tuning defaults (init_from=%s is a pretrained model): %s%s", source.path, ", ".join(chosen),
                 f"; kept: {', '.join(kept)}" if kept else "")
