"""`init_from`: start a run from a Hugging Face model directory or from another jaxlm run.

    source = resolve_init_from(config)   # before validation: config.model and data.tokenizer
                                         # now describe the source's model
    params = source.load(abstract_params)  # later, for a fresh run: the matching parameters

A Hugging Face directory (config.json + model.safetensors + tokenizer files; BERT, GPT-2 or Llama
families) is read by jaxlm/convert (safetensors only, never remote code, offline). A jaxlm run
directory gives its config.json model section, its tokenizer and the params of its latest
checkpoint (the optimizer state is not read). Either may be on a bucket (gs://): the model
directory is copied into this host's cache to be read, and data.tokenizer keeps the gs:// path.
Either way the body is loaded and every head part whose shape fits is kept; the rest of the head
(e.g. a classifier for new labels) starts fresh.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxlm import io
from jaxlm.errors import UserError
from jaxlm.restore import checkpoint_steps

# Fields that describe how to run the model rather than what it is: the run's config keeps them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")


@dataclasses.dataclass
class PretrainedSource:
    kind: str  # "huggingface" | "jaxlm"
    path: str
    load_params: Callable[[Any], dict]  # abstract params of the new model -> nested numpy arrays
    pooler: bool = False  # it has a trained pooler (BERT's tanh dense layer on [CLS])

    def load(self, abstract_params: Any) -> dict:
        """The source's parameters that fit the new model (same path and shape), as numpy."""
        loaded = self.load_params(abstract_params)
        kept, fresh = select_matching(abstract_params, loaded)
        logging.info("init_from %s: %d arrays loaded; starting fresh: %s", self.path, count_leaves(kept),
                     ", ".join(fresh) or "nothing")
        return kept


def count_leaves(tree: Any) -> int:
    return len(jax.tree.leaves(tree))


def select_matching(abstract: Any, loaded: Any, path: tuple = ()) -> tuple[dict, list[str]]:
    """(the loaded arrays at the abstract tree's paths with the same shapes, names of the others).

    A body array that does not fit is a UserError (the model config was taken from the source,
    so it means the source is inconsistent); head arrays that do not fit start fresh.
    """
    if isinstance(abstract, dict):
        kept, fresh = {}, []
        for key, sub in abstract.items():
            value = loaded.get(key) if isinstance(loaded, dict) else None
            if value is None:
                name = "/".join(path + (key,))
                if (path + (key,))[0] == "body":  # The body must come whole from the source.
                    raise UserError(f"init_from: the source has no parameter {name}; it does not match the "
                                    "model it describes")
                fresh.append(name)
                continue
            sub_kept, sub_fresh = select_matching(sub, value, path + (key,))
            if sub_kept is not None and not (isinstance(sub_kept, dict) and not sub_kept):
                kept[key] = sub_kept
            fresh += sub_fresh
        return kept, fresh
    if isinstance(loaded, (np.ndarray, jax.Array)) and tuple(loaded.shape) == tuple(abstract.shape):
        return np.asarray(loaded, dtype=abstract.dtype), []
    name = "/".join(path)
    if path and path[0] == "body":
        got = getattr(loaded, "shape", None)
        raise UserError(f"init_from: parameter {name} has shape {got} in the source but the model needs "
                        f"{tuple(abstract.shape)}; the source directory is inconsistent")
    return None, [name]


def _read_json(path: str) -> dict:
    value = io.read_json(path)  # A UserError naming the file when it is not JSON.
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _set_model(config: ml_collections.ConfigDict, model: dict, keep: tuple[str, ...] = RUNTIME_FIELDS) -> None:
    """config.model takes the source's fields, except those in `keep`."""
    from jaxlm.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    with config.model.ignore_type():
        for key, value in model.items():
            if key in names and key not in keep:
                config.model[key] = value


# -- Hugging Face ---------------------------------------------------------------------------------
def _resolve_huggingface(config: ml_collections.ConfigDict, path: str) -> PretrainedSource:
    from jaxlm.convert import load_hf_model, to_model_params  # pylint: disable=import-outside-toplevel
    from jaxlm.tasks import get_task  # pylint: disable=import-outside-toplevel
    # Everything is read and checked now, before the run writes anything.
    cfg, params, info = load_hf_model(path, scan_layers=bool(config.model.scan_layers))
    if not any(io.is_file(io.path(path) / name) for name in TOKENIZER_FILES):
        raise UserError(f"{io.path(path) / 'tokenizer.json'} not found (nor {', '.join(TOKENIZER_FILES[1:])}): "
                        "init_from needs the model's tokenizer files; add them with tokenizer.save_pretrained")
    _set_model(config, cfg.to_dict())
    config.data.tokenizer = path
    head = get_task(config.task).head
    logging.info("init_from %s: Hugging Face %s (%s), %d layers, d_model %d; head %r", path, info["model_type"],
                 ", ".join(info["architectures"]) or "no architecture", cfg.num_layers, cfg.d_model, head)

    def load(abstract_params):
        return to_model_params(cfg, params, info, head, init_params=abstract_params)

    return PretrainedSource("huggingface", path, load, pooler="pooler" in info["heads"])


# -- another jaxlm run ------------------------------------------------------------------------------
def restore_params(state_dir: str) -> dict:
    """The `params` of a saved TrainState, as numpy (a partial restore: no optimizer state)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    metadata = ocp.PyTreeCheckpointHandler().metadata(io.path(state_dir)).tree
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return restored["params"]


def _resolve_peft_adapters(config: ml_collections.ConfigDict, path: str) -> PretrainedSource:
    """A PEFT adapter directory (LoRA or AdaLoRA): its base model (base_model_name_or_path) with the adapters merged in
    and its saved modules (e.g. the classifier) in place; the run then starts from that model."""
    from jaxlm.peft import hf_format  # pylint: disable=import-outside-toplevel
    base = hf_format.adapter_base(path)
    source = _resolve_huggingface(config, base)
    logging.info("init_from %s: a Hugging Face PEFT adapter on %s, merged into it", path, base)

    def load(abstract_params):
        return hf_format.apply_adapters(source.load_params(abstract_params), abstract_params, base, path)

    return PretrainedSource("peft", path, load, pooler=source.pooler)


def _resolve_run(config: ml_collections.ConfigDict, path: str, saved: dict) -> PretrainedSource:
    if (saved.get("peft") or {}).get("method", "none") != "none":
        raise UserError(f"init_from={path} is a peft.method={saved['peft']['method']} run: its checkpoints hold "
                        f"adapters, not a whole model; export it merged (jaxlm export --workdir={path} --out=DIR) "
                        "and start from DIR")
    steps = checkpoint_steps(path)
    if not steps:
        raise UserError(f"{io.path(path) / 'checkpoints'}: no checkpoint to start from; train that run first "
                        "(or point init_from at another run)")
    # The checkpoint's layout decides scan_layers (HF weights are laid out to order instead).
    _set_model(config, saved["model"], keep=tuple(f for f in RUNTIME_FIELDS if f != "scan_layers"))
    spec = (saved.get("data", {}).get("tokenizer") or "bpe").strip()
    if spec == "bpe":
        spec = os.fspath(io.path(path) / "tokenizer")
        if not io.is_dir(spec):
            raise UserError(f"{spec}: missing; the run in init_from={path} trained its own tokenizer there")
    config.data.tokenizer = spec
    step = steps[-1]  # The latest.
    state_dir = os.fspath(io.path(path) / "checkpoints" / str(step) / "state")
    logging.info("init_from %s: a jaxlm %s run, step %d", path, saved.get("task"), step)
    return PretrainedSource("jaxlm", path, lambda _abstract: restore_params(state_dir))


def resolve_init_from(config: ml_collections.ConfigDict) -> Optional[PretrainedSource]:
    """Points config.model and data.tokenizer at `init_from` (if set) and returns the source."""
    spec = (config.get("init_from", "") or "").strip()
    if not spec:
        return None
    path = os.fspath(io.path(spec))  # A str: config.data.tokenizer may be set to it.
    if not io.is_dir(path):
        raise UserError(f"init_from={spec}: no such directory; give a jaxlm run directory or a Hugging Face "
                        "model directory (config.json, model.safetensors, tokenizer files)")
    if io.is_file(io.path(path) / "adapter_config.json"):  # a Hugging Face PEFT adapter directory
        return _resolve_peft_adapters(config, path)
    config_path = os.fspath(io.path(path) / "config.json")
    if not io.is_file(config_path):
        raise UserError(f"{config_path} not found: init_from must be a jaxlm run directory or a Hugging Face "
                        "model directory saved with save_pretrained")
    saved = _read_json(config_path)
    if "model_type" in saved or "architectures" in saved:
        return _resolve_huggingface(config, path)
    if isinstance(saved.get("model"), dict) and "task" in saved:
        return _resolve_run(config, path, saved)
    raise UserError(f"{config_path}: neither a jaxlm run's config nor a Hugging Face config (no model_type); "
                    "check init_from")
