"""LoRA and AdaLoRA adapters in the Hugging Face PEFT directory layout, both ways.

    write_adapters(out_dir, cfg, family, adapted, trained, base_model, task_type, total_step)  # export
    params = apply_adapters(params, abstract, base_dir, adapter_dir)                          # import (merged)

The directory holds adapter_config.json (peft's LoraConfig: r, lora_alpha, lora_dropout (the run's
peft.dropout), target_modules, modules_to_save, ...; or its AdaLoraConfig: init_r, target_r, tinit,
tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step, rank_pattern, ...) and
adapter_model.safetensors, named as peft saves them: LoRA `base_model.model.<module>.lora_A.weight`
[r, in], `...lora_B.weight` [out, r]; AdaLoRA `base_model.model.<module>.lora_A` [k, in] (P),
`.lora_E` [k, 1] (λ), `.lora_B` [out, k] (Q) with the k triplets its rank_pattern keeps; and each
module trained in full under its own tensor names (`base_model.model.classifier.weight`,
`base_model.model.bert.pooler.dense.bias`), which peft loads as modules_to_save. Module names come
from the family tables of jaxlm/convert (the same ones model export uses); only layer kernels that
the family maps to a plain Linear can carry an adapter in this layout (not GPT-2's fused c_attn).
Importing merges the adapters into the base and sets no peft.* field, so the directory's
lora_dropout (a training setting) is not used.
"""

import json
import math
import os
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.convert import families as fam
from jaxlm.convert.hf_import import HEAD_OF_PART, TOP_LEVEL, read_config
from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig
from jaxlm.peft.targets import Path, flatten, path_str, unflatten

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"classifier": "SEQ_CLS", "lm": "CAUSAL_LM"}


def _full_name(family: str, rel: str) -> str:
    return rel if rel.startswith(TOP_LEVEL) else fam.BASE_PREFIX[family] + rel


def _entries(cfg: ModelConfig, family: str) -> list[tuple[tuple[Path, ...], tuple[str, ...], fam.Tensor]]:
    """Every tensor of the family as (full jaxlm paths, full HF names, entry), layers unscanned."""
    layout = fam.layout_for(family, cfg)
    out = []
    for e in layout.embed + layout.final:
        out.append((tuple(("body",) + p for p in e.jax), tuple(_full_name(family, h) for h in e.hf), e))
    for i in range(cfg.num_layers):
        for e in layout.layer:
            out.append((tuple(("body", f"layers_{i}") + p for p in e.jax),
                        tuple(_full_name(family, h.format(i=i)) for h in e.hf), e))
    for part, entries in layout.heads.items():
        prefix = HEAD_OF_PART[part][1]
        for e in entries:
            out.append((tuple(prefix + p for p in e.jax), tuple(_full_name(family, h) for h in e.hf), e))
    return out


def _layer_of(path: Path) -> tuple[Path, int]:
    """(the layer-relative path, layer index or -1 for a stacked array) of a body layer param."""
    if len(path) > 2 and path[0] == "body" and path[1] == "layers":
        return path[2:], -1
    if len(path) > 2 and path[0] == "body" and path[1].startswith("layers_") and path[1][7:].isdigit():
        return path[2:], int(path[1][7:])
    raise UserError(f"{path_str(path)}: only Transformer-layer kernels carry adapters in the PEFT layout; "
                    "narrow peft.targets to body layer kernels")


def _kernel_module(cfg: ModelConfig, family: str, rel: Path, in_shape, out_shape) -> str:
    """The HF module name template ('{i}' for the layer) of a layer kernel that is a plain Linear."""
    for e in fam.layout_for(family, cfg).layer:
        if e.jax == (rel,) and len(e.hf) == 1 and e.hf[0].endswith(".weight"):
            kernel = np.random.default_rng(0).normal(size=tuple(in_shape) + tuple(out_shape))
            linear = kernel.reshape(math.prod(in_shape), math.prod(out_shape)).T
            got = e.to_hf(kernel)
            if len(got) == 1 and got[0].shape == linear.shape and np.array_equal(got[0], linear):
                return _full_name(family, e.hf[0][:-len(".weight")])
            break
    raise UserError(f"{'/'.join(rel)}: the {family} layout has no plain Linear for this kernel (e.g. GPT-2's fused "
                    "c_attn), so its adapter has no Hugging Face PEFT form; export the merged model instead")


def _unstack(flat: dict[Path, np.ndarray]) -> dict[Path, np.ndarray]:
    out = {}
    for path, value in flat.items():
        if len(path) > 2 and path[:2] == ("body", "layers"):
            for i in range(value.shape[0]):
                out[("body", f"layers_{i}") + path[2:]] = value[i]
        else:
            out[path] = value
    return out


def _adapter_tensors(cfg: ModelConfig, family: str, adapted: Any, adapters: dict[Path, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], set[str], dict[str, list[bool]]]:
    """Every adapted matrix's tensors under peft's names, the module names, and (AdaLoRA) the
    rank_pattern: LoRA `<m>.lora_A.weight` [r, in], `<m>.lora_B.weight` [out, r]; AdaLoRA
    `<m>.lora_A` [k, in], `<m>.lora_E` [k, 1], `<m>.lora_B` [out, k] with only the k kept
    triplets (λ != 0) and rank_pattern[`<m>.lora_E`] = which of the init_r ones were kept, as
    peft's own save_pretrained of an AdaLoRA model writes them."""
    method = adapted.method
    svd = method.name == "adalora"
    rank = method.init_r if svd else method.rank
    tensors: dict[str, np.ndarray] = {}
    modules, rank_pattern = set(), {}
    for t in adapted.targets:
        rel, layer = _layer_of(t.path)
        module = _kernel_module(cfg, family, rel, t.in_shape, t.out_shape)
        arrays = {n: adapters[t.path + (n,)] for n in method.arrays(t)}
        for i in range(cfg.num_layers) if layer == -1 else (layer,):
            one = {n: v[i] if layer == -1 else v for n, v in arrays.items()}
            name = module.format(i=i)
            modules.add(name)
            a, b = one["lora_A"].reshape(-1, rank).T, one["lora_B"].reshape(rank, -1).T
            if not svd:
                tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
                continue
            # A pruned triplet's λ is exactly 0 (the step sets it so), so λ != 0 is the mask of a
            # finished run and, for any checkpoint, exactly the triplets that change the model.
            lam = np.asarray(one["lora_E"]).reshape(rank)
            kept = lam != 0
            rank_pattern[f"{name}.lora_E"] = [bool(k) for k in kept]
            tensors[f"{PREFIX}{name}.lora_A"] = a[kept]
            tensors[f"{PREFIX}{name}.lora_E"] = lam[kept].reshape(-1, 1)
            tensors[f"{PREFIX}{name}.lora_B"] = b[:, kept]
    return tensors, modules, rank_pattern


def _full_tensors(cfg: ModelConfig, family: str, trained: dict) -> tuple[dict[str, np.ndarray], set[str]]:
    """The params trained in full under their HF tensor names, and the modules they make up
    (peft's modules_to_save: it saves and loads whole modules)."""
    tensors: dict[str, np.ndarray] = {}
    full = _unstack(flatten(trained.get("params", {})))
    saved_modules, covered = set(), set()
    entries = _entries(cfg, family)
    for paths, names, e in entries:
        present = [p in full for p in paths]
        if not any(present):
            continue
        if not all(present):
            raise UserError(f"peft.trainable covers {path_str(paths[present.index(True)])} but not "
                            f"{path_str(paths[present.index(False)])}, which share the tensor {names[0]}: "
                            "train both or neither")
        for name, value in zip(names, e.to_hf(*(full[p] for p in paths))):
            tensors[PREFIX + name] = value
            saved_modules.add(name.rsplit(".", 1)[0])
        covered.update(paths)
    missing = sorted(set(full) - covered)
    if missing:
        raise UserError(f"{path_str(missing[0])} trains in full but has no {family} tensor name, so the PEFT "
                        "layout cannot hold it; narrow peft.trainable or export the merged model")
    for module in sorted(saved_modules):
        for paths, names, _ in entries:
            for name in names:
                if name.rsplit(".", 1)[0] == module and PREFIX + name not in tensors:
                    raise UserError(f"peft.trainable covers part of the module {module} but not {name}: peft "
                                    "saves whole modules, so train all of its parameters or none")
    return tensors, saved_modules


def _method_config(method: Any, total_step: int, rank_pattern: dict) -> dict:
    """The adapter_config.json fields of the method: peft's LoraConfig or AdaLoraConfig names."""
    alpha = int(method.alpha) if float(method.alpha).is_integer() else method.alpha
    if method.name != "adalora":
        return {"peft_type": "LORA", "r": method.rank, "lora_alpha": alpha, "rank_pattern": {}}
    # peft scales by lora_alpha / (ranknum + 1e-5) with ranknum = init_r (also for a matrix
    # pruned below it), jaxlm by alpha / init_r: a relative 1e-5 / init_r on the adapter's delta.
    return {"peft_type": "ADALORA", "init_r": method.init_r, "target_r": method.target_r, "lora_alpha": alpha,
            "tinit": method.tinit, "tfinal": method.tfinal, "deltaT": method.delta_t, "beta1": method.beta1,
            "beta2": method.beta2, "orth_reg_weight": method.orth_reg_weight, "total_step": int(total_step),
            "rank_pattern": rank_pattern}


def write_adapters(out_dir: str, cfg: ModelConfig, family: str, adapted: Any, trained: dict, base_model: str,
                   task_type: Any, total_step: int = 0) -> list[str]:
    """out_dir (local, new or empty)/adapter_config.json + adapter_model.safetensors; returns the files.
    trained: the run's trainable tree as numpy (adapters + params trained in full); total_step:
    the run's steps (AdaLoRA's total_step)."""
    tensors, modules, rank_pattern = _adapter_tensors(cfg, family, adapted, flatten(trained["adapters"]))
    full, saved_modules = _full_tensors(cfg, family, trained)
    tensors.update(full)
    config = {
        "task_type": task_type, "base_model_name_or_path": base_model or None,
        "lora_dropout": adapted.dropout,  # peft.dropout: what training with it used
        "target_modules": sorted(modules), "modules_to_save": sorted(saved_modules) or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
        **_method_config(adapted.method, total_step, rank_pattern),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())},
              os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return sorted(os.listdir(out_dir))


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); re-save the adapter with save_pretrained") from None
    if not isinstance(config, dict) or config.get("peft_type") not in ("LORA", "ADALORA"):
        raise UserError(f"{path}: peft_type={config.get('peft_type') if isinstance(config, dict) else None!r}; "
                        "jaxlm imports LORA and ADALORA adapters only")
    for key, fine in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("alpha_pattern", {})):
        if config.get(key, fine) not in (fine, None):
            raise UserError(f"{path}: {key}={config[key]!r} is not supported (only {key}={fine!r} imports exactly)")
    return config


def adapter_base(adapter_dir: str) -> str:
    """The base model directory an adapter directory names (base_model_name_or_path)."""
    config = read_adapter_config(adapter_dir)
    base = config.get("base_model_name_or_path") or ""
    if not os.path.isdir(base):
        raise UserError(f"{os.path.join(adapter_dir, ADAPTER_CONFIG)}: base_model_name_or_path={base!r} is not a local "
                        "directory; set it to the base model's Hugging Face directory")
    return base


def apply_adapters(params: dict, abstract: Any, base_dir: str, adapter_dir: str) -> dict:
    """jaxlm params (numpy, from base_dir) with a PEFT LoRA or AdaLoRA directory merged in: each
    adapted kernel W + (lora_alpha / r) * B.A (AdaLoRA: W + lora_alpha / (init_r + 1e-5) * B.(A*E),
    peft's own scale, whatever its rank_pattern kept), each saved module's tensors in place (when
    their shape fits the model, e.g. a classifier for the same labels). `abstract`: the model's
    params (shapes)."""
    config = read_adapter_config(adapter_dir)
    svd = config["peft_type"] == "ADALORA"
    suffix_a, suffix_b = (".lora_A", ".lora_B") if svd else (".lora_A.weight", ".lora_B.weight")
    hf = read_config(base_dir)
    family = fam.MODEL_TYPES.get(hf.get("model_type"))
    if family is None:
        raise UserError(f"{base_dir}: model_type {hf.get('model_type')!r} has no jaxlm converter")
    cfg = fam.config_from_hf(family, hf, os.path.join(base_dir, "config.json"), hf.get("model_type"))
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise UserError(f"{weights} not found: jaxlm reads adapters saved as safetensors only")
    with safe_open(weights, framework="numpy") as f:
        tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: np.asarray(f.get_tensor(k), np.float32)
                   for k in f.keys()}
    shapes = {p: tuple(s.shape) for p, s in flatten(abstract).items()}
    scanned = any(p[:2] == ("body", "layers") for p in shapes)
    flat = _unstack(flatten(params))
    kernels = {}  # HF module -> unscanned jaxlm kernel path
    for i in range(cfg.num_layers):
        for e in fam.layout_for(family, cfg).layer:
            if len(e.jax) == 1 and e.jax[0][-1] == "kernel" and len(e.hf) == 1:
                kernels[_full_name(family, e.hf[0].format(i=i))[:-len(".weight")]] = ("body", f"layers_{i}") + e.jax[0]
    used = set()
    for name in sorted(k for k in tensors if k.endswith(suffix_a)):
        module = name[:-len(suffix_a)]
        names = [name, module + suffix_b] + ([module + ".lora_E"] if svd else [])
        if module not in kernels or any(n not in tensors for n in names):
            raise UserError(f"{weights}: {PREFIX}{name} adapts {module}, which is no layer kernel of this {family} "
                            f"model (or its {' or '.join(n[len(module) + 1:] for n in names[1:])} is missing)")
        path = kernels[module]
        a, b = tensors[name], tensors[module + suffix_b]
        if svd:  # peft: scaling / (ranknum + 1e-5), ranknum = init_r (kept through a rank_pattern resize)
            a = a * tensors[module + ".lora_E"]
            alpha = config.get("lora_alpha", 8)
            scale = (alpha if alpha > 0 else a.shape[0]) / (config.get("init_r", 12) + 1e-5)
        else:
            scale = config["lora_alpha"] / (math.sqrt(a.shape[0]) if config.get("use_rslora") else a.shape[0])
        kernel = flat[path]
        n_in = _in_axes(kernel.shape, b.shape[0], a.shape[1])
        _kernel_module(cfg, family, path[2:], kernel.shape[:n_in], kernel.shape[n_in:])  # a plain Linear
        delta = (b.astype(np.float64) @ a.astype(np.float64)).T.reshape(kernel.shape) * scale
        flat[path] = (kernel + delta).astype(kernel.dtype)
        used.update(names)
    for paths, names, e in _entries(cfg, family):  # the modules saved whole (modules_to_save)
        if not all(n in tensors for n in names):
            continue
        for path, value in zip(paths, e.to_jax(*(tensors[n] for n in names))):
            stacked = _stacked(path)
            want = shapes.get(stacked if scanned else path)
            if want is not None and scanned and stacked != path:
                want = want[1:]  # one layer of the stacked array
            if want is not None and tuple(value.shape) == want:  # else (other labels) the model's own stays
                flat[path] = value
        used.update(names)
    unused = sorted(set(tensors) - used)
    if unused:
        raise UserError(f"{weights}: tensor {PREFIX}{unused[0]} maps to no parameter of this {family} model")
    return _restack(flat) if scanned else unflatten(flat)


def _in_axes(shape: tuple, out_features: int, in_features: int) -> int:
    """How many leading axes of an (unscanned) kernel are its inputs."""
    for n in range(1, len(shape)):
        if math.prod(shape[:n]) == in_features and math.prod(shape[n:]) == out_features:
            return n
    raise UserError(f"an adapter of in_features {in_features} and out_features {out_features} does not fit a "
                    f"kernel of shape {shape}")


def _stacked(path: Path) -> Path:
    if len(path) > 2 and path[0] == "body" and path[1].startswith("layers_"):
        return ("body", "layers") + path[2:]
    return path


def _restack(flat: dict[Path, np.ndarray]) -> dict:
    out, layers = {}, {}
    for path, value in flat.items():
        stacked = _stacked(path)
        if stacked != path:
            layers.setdefault(stacked, {})[int(path[1][7:])] = value
        else:
            out[path] = value
    for path, by_layer in layers.items():
        out[path] = np.stack([by_layer[i] for i in sorted(by_layer)])
    return unflatten(out)
