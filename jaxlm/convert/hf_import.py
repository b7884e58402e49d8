"""Import a Hugging Face checkpoint directory (BERT, GPT-2, Llama/Mistral/Qwen2) into jaxlm.

    cfg, params, info = load_hf_model("path/to/model")   # offline; safetensors only; or gs://…
    logits = Model(cfg, **info["model_kwargs"]).apply({"params": params}, tokens)

Weights are read with `safetensors` only (one `model.safetensors` or the shards listed in
`model.safetensors.index.json`): never pickle, never remote code. `params` holds `body` plus the
head the checkpoint's architecture implies (`info["head"]`: 'lm', 'mlm', 'classifier' or None for
a bare encoder); `info["heads"]` has every head part found, in jaxlm layout, and
`to_model_params` re-arranges them for another head.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from safetensors import safe_open

from jaxlm import io
from jaxlm.convert import families as fam
from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig
from jaxlm.models.model import Model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Names of head tensors that sit outside the base model's prefix (`bert.`, `model.`, ...).
TOP_LEVEL = ("cls.", "classifier.", "lm_head.", "score.")
# Buffers some checkpoints carry that are not parameters.
BUFFERS = ("position_ids", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def local_model_dir(model_dir: str) -> str:
    """`model_dir` itself when local; a bucket's (gs://) copied whole into this host's cache first:
    the weights are memory-mapped, which needs a local file."""
    if not io.is_remote(model_dir):
        return model_dir
    if not io.is_file(io.path(model_dir) / CONFIG):
        raise UserError(f"{model_dir}/{CONFIG} not found: pass a Hugging Face model directory (with {CONFIG} "
                        f"and {WEIGHTS})")
    return io.local_copy(model_dir)


def read_config(model_dir: str) -> dict:
    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such directory; pass a local Hugging Face model directory "
                        f"(with {CONFIG} and {WEIGHTS})")
    path = os.path.join(model_dir, CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: pass a Hugging Face model directory saved with "
                        f"save_pretrained (it holds {CONFIG} and {WEIGHTS})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); re-save it with save_pretrained") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; re-save it with save_pretrained")
    return config


class Weights:
    """Tensors by name from model.safetensors or its shards, read lazily, as float32 numpy."""

    def __init__(self, model_dir: str):
        single, index = os.path.join(model_dir, WEIGHTS), os.path.join(model_dir, INDEX)
        if os.path.isfile(single):
            self.files = [single]
            with safe_open(single, framework="numpy") as f:
                self.where = {k: single for k in f.keys()}
        elif os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a safetensors index ({e!r}); re-save the model with "
                                "save_pretrained(safe_serialization=True)") from None
            self.where = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
            self.files = sorted(set(self.where.values()))
            for shard in self.files:
                if not os.path.isfile(shard):
                    raise UserError(f"{shard} (listed in {index}) not found: copy every shard of the "
                                    "checkpoint into the directory")
        else:
            pickled = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                       if os.path.exists(os.path.join(model_dir, n))]
            hint = (f" ({pickled[0]} is there, but jaxlm reads safetensors only: re-save with "
                    "save_pretrained(safe_serialization=True))") if pickled else ""
            raise UserError(f"{single} not found (nor {INDEX}){hint}; pass a directory saved with "
                            "save_pretrained(safe_serialization=True)")
        self._open: dict[str, Any] = {}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file_of(self, name: Optional[str] = None) -> str:
        return self.where.get(name, self.files[0]) if name else self.files[0]

    def get(self, name: str) -> np.ndarray:
        path = self.where[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy")
        self.used.add(name)
        return np.asarray(self._open[path].get_tensor(name), dtype=np.float32)

    def unused(self) -> list[str]:
        return sorted(k for k in self.where if k not in self.used and not any(b in k for b in BUFFERS))


class _Reader:
    """Resolves family-relative names against a checkpoint (prefix, old LayerNorm names)."""

    def __init__(self, weights: Weights, prefix: str, desc: str):
        self.w, self.desc = weights, desc
        self.prefix = prefix if any(k.startswith(prefix) for k in weights.where) else ""

    def full_name(self, rel: str) -> str:
        return rel if rel.startswith(TOP_LEVEL) else self.prefix + rel

    def candidates(self, rel: str) -> list[str]:
        names = [self.full_name(rel), rel]
        if "LayerNorm.weight" in rel or "LayerNorm.bias" in rel:  # TF-era BERT checkpoints
            old = rel.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            names += [self.full_name(old), old]
        if rel == "cls.predictions.bias":
            names.append("cls.predictions.decoder.bias")
        return names

    def find(self, rel: str) -> Optional[str]:
        return next((n for n in self.candidates(rel) if n in self.w), None)

    def missing(self, rel: str) -> UserError:
        name = self.full_name(rel)
        return UserError(f"{self.w.file_of()}: tensor {name!r} is missing (a {self.desc} needs it); "
                         "the weights do not match config.json: re-save the model with save_pretrained")

    def read(self, entries: list[fam.Tensor], layer: Optional[int] = None, required: bool = True):
        """{jax path: array} and {jax path: hf name} for `entries`; None if nothing is there and
        not `required`."""
        out, source, absent = {}, {}, []
        for e in entries:
            rels = [h.format(i=layer) for h in e.hf]
            names = [self.find(r) for r in rels]
            if any(n is None for n in names):
                if e.zeros_shape is not None:
                    arrays = (np.zeros(e.zeros_shape, np.float32),)
                    names = [f"{self.full_name(rels[0])} (absent: zeros)"]
                else:
                    absent.append(rels[names.index(None)])
                    continue
            else:
                arrays = tuple(self.w.get(n) for n in names)
            try:
                values = e.to_jax(*arrays)
            except ValueError as err:
                raise UserError(f"{self.w.file_of(names[0])}: tensor {names[0]!r} has shape "
                                f"{arrays[0].shape}, which does not fit config.json ({err})") from None
            for path, value in zip(e.jax, values):
                out[path], source[path] = np.ascontiguousarray(value, np.float32), names[0]
        if absent:
            if not required and not out:
                return None, None
            raise self.missing(absent[0])
        return out, source


def nest_paths(flat: dict) -> dict:
    """{path tuple: leaf} -> the nested dict those paths describe (also jaxlm.peft's unflatten)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flat(tree: Any, prefix: tuple = ()) -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, prefix + (k,)))
        return out
    return {prefix: tree}


def _natural_head(family: str, architectures: list[str], cfg: ModelConfig) -> Optional[str]:
    arch = " ".join(architectures)
    if family == "bert":
        if "ForMaskedLM" in arch or "ForPreTraining" in arch:
            return "mlm"
        if "ForSequenceClassification" in arch:
            return "classifier"
        return None
    if "ForCausalLM" in arch or "LMHeadModel" in arch or cfg.tie_embeddings:
        return "lm"
    return None


def load_hf_model(model_dir: str, *, scan_layers: bool = True) -> tuple[ModelConfig, dict, dict]:
    """Read a Hugging Face directory into (ModelConfig, params, info).

    params: {'body': ..., <head params>} for `info['head']`, ready for
    `Model(cfg, **info['model_kwargs'])`; plain nested dicts of float32 numpy arrays, layers
    stacked under body/layers when `scan_layers`, else body/layers_0 ...
    info: family, model_type, architectures, head, model_kwargs, heads (every head part found:
    'lm_head', 'mlm_head', 'pooler', 'classifier', in jaxlm layout), unused_tensors, files,
    hf_config.
    """
    model_dir = local_model_dir(os.fspath(model_dir))
    hf_config = read_config(model_dir)
    where = os.path.join(model_dir, CONFIG)
    model_type = hf_config.get("model_type")
    architectures = list(hf_config.get("architectures") or [])
    if model_type not in fam.MODEL_TYPES:
        named = f"model_type {model_type!r}" + (f" ({', '.join(architectures)})" if architectures else "")
        raise UserError(f"{where}: {named} is not supported; supported model types: "
                        f"{', '.join(sorted(fam.MODEL_TYPES))}")
    family = fam.MODEL_TYPES[model_type]
    cfg = dataclasses.replace(fam.config_from_hf(family, hf_config, where, model_type),
                              scan_layers=scan_layers)
    problems = cfg.problems()
    if problems:
        raise UserError(f"{where}: this config does not make a valid jaxlm model: {'; '.join(problems)}")

    weights = Weights(model_dir)
    head = _natural_head(family, architectures, cfg)
    desc = f"{architectures[0] if architectures else model_type} with this config.json"
    reader = _Reader(weights, fam.BASE_PREFIX[family], desc)
    layout = fam.layout_for(family, cfg, hf_config, model_type)

    # The body, unscanned first (so shapes check per layer against the model's own layout).
    flat, source = reader.read(layout.embed + layout.final)
    for i in range(cfg.num_layers):
        layer, layer_source = reader.read(layout.layer, layer=i)
        flat.update({(f"layers_{i}",) + p: v for p, v in layer.items()})
        source.update({(f"layers_{i}",) + p: v for p, v in layer_source.items()})
    body = nest_paths(flat)

    heads, head_sources = {}, {}
    required = {"mlm": ("mlm_head",), "classifier": ("pooler", "classifier"),
                "lm": () if cfg.tie_embeddings else ("lm_head",)}.get(head, ())
    for part, entries in layout.heads.items():
        if part == "lm_head" and cfg.tie_embeddings:
            continue
        found, part_source = reader.read(entries, required=part in required)
        if found is not None:
            heads[part], head_sources[part] = nest_paths(found), part_source
    if "mlm_head" in heads:
        _check_tied_decoder(reader, weights, body)

    _check_shapes(cfg, body, source, heads, head_sources, weights)
    if scan_layers:
        layers = [body.pop(f"layers_{i}") for i in range(cfg.num_layers)]
        body["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)

    num_labels = heads["classifier"]["kernel"].shape[1] if "classifier" in heads else None
    info = {
        "family": family, "model_type": model_type, "architectures": architectures,
        "head": head, "heads": heads, "unused_tensors": weights.unused(),
        "files": [os.path.join(model_dir, CONFIG)] + weights.files, "hf_config": hf_config,
        "num_labels": num_labels,
        "model_kwargs": _model_kwargs(head, heads, num_labels) if head else None,
    }
    params = {"body": body} if head is None else to_model_params(cfg, {"body": body}, info, head)
    return cfg, params, info


def _model_kwargs(head: str, heads: dict, num_labels: Optional[int]) -> dict:
    if head == "classifier":
        return {"head": "classifier", "num_labels": num_labels or 2, "pooling": "cls",
                "pooler": "pooler" in heads}
    return {"head": head}


def _check_tied_decoder(reader: _Reader, weights: Weights, body: dict) -> None:
    name = "cls.predictions.decoder.weight"
    if name in weights and not np.array_equal(weights.get(name), body["embed"]["token"]["embedding"]):
        raise UserError(f"{weights.file_of(name)}: {name!r} differs from the word embeddings; jaxlm's MLM "
                        "head always ties its decoder to them (untied MLM decoders are not supported)")


@functools.lru_cache(maxsize=32)
def _expected_shapes(cfg: ModelConfig, head: str, num_labels: int = 2) -> dict:
    """{param path: shape} of Model(cfg, head) with unscanned layers (abstract: no compute)."""
    model = Model(dataclasses.replace(cfg, scan_layers=False), head=head, num_labels=num_labels,
                  pooler=True)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
    return {path: tuple(s.shape) for path, s in _flat(shapes).items()}


HEAD_OF_PART = {"pooler": ("classifier", ("cls_head", "pooler")),
                "classifier": ("classifier", ("cls_head", "classifier")),
                "mlm_head": ("mlm", ("mlm_head",)), "lm_head": ("lm", ("lm_head",))}


def _check_shapes(cfg, body, source, heads, head_sources, weights: Weights) -> None:
    """Every array must have the shape jaxlm's own model gives it, and no body part may be missing."""
    num_labels = heads["classifier"]["kernel"].shape[1] if "classifier" in heads else 2
    want = {p: s for p, s in _expected_shapes(cfg, "lm").items() if p[0] == "body"}
    got = {("body",) + p: (v.shape, source[p]) for p, v in _flat(body).items()}
    for part, tree in heads.items():
        head, prefix = HEAD_OF_PART[part]
        want.update({p: s for p, s in _expected_shapes(cfg, head, num_labels).items()
                     if p[:len(prefix)] == prefix})
        got.update({prefix + p: (v.shape, head_sources[part][p]) for p, v in _flat(tree).items()})
    for path, (shape, name) in got.items():
        if path not in want:
            raise AssertionError(f"converter bug: {'/'.join(path)} is not a jaxlm parameter")
        if tuple(shape) != want[path]:
            raise UserError(f"{weights.file_of(name.split(' ')[0])}: tensor {name!r} gives "
                            f"{'/'.join(path)} shape {tuple(shape)}, but config.json implies {want[path]}; "
                            "the weights do not match config.json")
    for path in want:
        if path not in got:
            raise AssertionError(f"converter bug: no tensor maps to {'/'.join(path)}")


def to_model_params(cfg: ModelConfig, params: dict, info: dict, head: Optional[str] = None, *,
                    init_params: Optional[dict] = None) -> dict:
    """Arrange imported weights for `Model(cfg, head=head, ...)`.

    params: the body (or a dict with 'body'); info: from `load_hf_model`. Head parts the
    checkpoint lacks come from `init_params` (e.g. `Model(...).init(...)['params']`, to start a new
    classifier); without it, a 'classifier' head is returned with the pooler only (the caller adds
    cls_head/classifier) and a missing LM/MLM head is an error.
    """
    head = head or info.get("head") or "lm"
    body = params.get("body", params) if isinstance(params, dict) else params
    heads = info.get("heads", {})
    init = nn.unbox(init_params) if init_params is not None else {}
    out = {"body": body}
    if head == "lm":
        if not cfg.tie_embeddings:
            out["lm_head"] = _part(heads, "lm_head", init, ("lm_head",), info, "lm")
    elif head == "mlm":
        if cfg.activation not in ("gelu", "gelu_tanh"):
            raise UserError(f"activation={cfg.activation!r}: jaxlm's MLM head always applies gelu, so a "
                            f"checkpoint whose MLM transform uses {cfg.activation} cannot convert exactly")
        out["mlm_head"] = _part(heads, "mlm_head", init, ("mlm_head",), info, "mlm")
    elif head == "classifier":
        cls = {}
        for part in ("pooler", "classifier"):
            value = heads.get(part)
            init_value = init.get("cls_head", {}).get(part)
            if value is not None and init_value is not None and (
                    jax.tree.map(np.shape, value) != jax.tree.map(np.shape, init_value)):
                value = None  # a new label set: the caller's fresh classifier wins
            if value is None:
                value = init_value
            if value is not None:
                cls[part] = value
        out["cls_head"] = cls
    else:
        raise UserError(f"head={head!r}: choose one of lm, mlm, classifier")
    return out


def _part(heads: dict, part: str, init: dict, path: tuple, info: dict, head: str):
    if part in heads:
        return heads[part]
    node = init
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None:
        files = info.get("files") or ["the checkpoint"]
        raise UserError(f"{files[-1]}: has no {part} weights for head={head!r}; pass init_params "
                        "to start that head fresh, or pick a head the checkpoint has")
    return node
