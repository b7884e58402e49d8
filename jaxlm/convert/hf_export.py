"""Export a jaxlm model to a Hugging Face directory (config.json + model.safetensors).

    export_hf(cfg, params, "out/")    # then transformers' AutoModel*.from_pretrained("out/")

The family (GPT-2, Llama, BERT) follows from the ModelConfig (`match_family`); the architecture
from the params' head: lm_head or a tied decoder -> GPT2LMHeadModel / LlamaForCausalLM;
mlm_head -> BertForMaskedLM; cls_head (with the tanh pooler, 'cls' pooling) ->
BertForSequenceClassification; a body (plus cls_head/pooler alone) -> BertModel (with pooler).
A padded vocabulary is written as is (vocab_size = the padded size); a causal LM exported with
its tokenizer gets a generation_config.json that never picks the padding ids (suppress_tokens),
as `jaxlm generate` never does. The tokenizer is written as `export_tokenizer` frames it. Output
is deterministic: float32 tensors, sorted JSON; every file's mode follows the umask. An out_dir on
a bucket (gs://) is written locally first and uploaded, model.safetensors last.
"""

import json
import os
import shutil
import stat
import tempfile
from typing import Any, Optional, Sequence

import numpy as np
from flax import linen as nn
from safetensors.numpy import save_file

from jaxlm import io
from jaxlm.convert import families as fam
from jaxlm.convert.hf_tokenizer import export_tokenizer
from jaxlm.convert.hf_import import CONFIG, INDEX, TOP_LEVEL, WEIGHTS
from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig

GENERATION_CONFIG = "generation_config.json"


def match_family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'bert': the Hugging Face family `cfg` is exactly; else a UserError
    naming, for each family, the fields that keep `cfg` out of it."""
    misses = {family: fam.mismatches(cfg, family) for family in fam.FAMILIES}
    for family in ("gpt2", "llama", "bert"):
        if not misses[family]:
            return family
    detail = "; ".join(f"{family} conflicts on {', '.join(m)}" for family, m in misses.items())
    raise UserError(f"model config matches no Hugging Face family (norm={cfg.norm!r}, "
                    f"positions={cfg.positions!r}, norm_position={cfg.norm_position!r}, "
                    f"activation={cfg.activation!r}): {detail}")


def _np(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def _architecture(family: str, params: dict) -> tuple[str, str]:
    """(architecture, head) from the head params present."""
    if family == "bert":
        if "mlm_head" in params:
            return "BertForMaskedLM", "mlm"
        if "cls_head" in params and "classifier" in params["cls_head"]:
            return "BertForSequenceClassification", "classifier"
        return "BertModel", "pooler" if "pooler" in params.get("cls_head", {}) else "none"
    if "mlm_head" in params or "cls_head" in params:
        raise UserError(f"{family} export writes a causal LM; this model has a "
                        f"{'mlm' if 'mlm_head' in params else 'classifier'} head: export a head='lm' model")
    return ("GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM"), "lm"


def export_hf(cfg: ModelConfig, params: dict, out_dir: str, family: Optional[str] = None,
              tokenizer: Any = None, label_names: Sequence[str] = ()) -> str:
    """Write `out_dir` (local or gs://)/config.json + model.safetensors (+ the tokenizer's files).
    Returns out_dir.

    params: Model params ({'body': ..., head params}) or a bare body; boxed or not, any dtype
    (written as float32). family: None to infer it with `match_family`, else checked.
    label_names: a classifier's class names in index order, for config.json's id2label (so
    transformers' pipelines print them); () writes LABEL_0, LABEL_1, ...
    """
    out_dir = os.fspath(out_dir)
    if io.is_remote(out_dir):
        return _export_to_bucket(cfg, params, out_dir, family, tokenizer, label_names)
    if family is None:
        family = match_family(cfg)
    elif family not in fam.FAMILIES:
        raise UserError(f"family={family!r}: choose one of {', '.join(fam.FAMILIES)}")
    else:
        miss = fam.mismatches(cfg, family)
        if miss:
            raise UserError(f"family={family!r} does not fit this model config: it needs {', '.join(miss)}")
    params = _np(nn.unbox(params))
    if "body" not in params:
        if "embed" not in params:
            raise UserError("export_hf: params has neither 'body' nor 'embed': pass Model params "
                            "(e.g. state.params) or the body's params")
        params = {"body": params}
    body = params["body"]
    arch, head = _architecture(family, params)
    layout = fam.layout_for(family, cfg)
    prefix = fam.BASE_PREFIX[family] if arch != "BertModel" else ""

    def name(rel: str) -> str:
        return rel if rel.startswith(TOP_LEVEL) else prefix + rel

    tensors: dict[str, np.ndarray] = {}

    def write(entries, tree: dict, where: str, layer: Optional[int] = None):
        for e in entries:
            values = []
            for path in e.jax:
                node = tree
                for key in path:
                    if not isinstance(node, dict) or key not in node:
                        raise UserError(f"export_hf: params lack {where}/{'/'.join(path)}, which "
                                        f"{arch} needs for this config")
                    node = node[key]
                values.append(node)
            for hf, value in zip(e.hf, e.to_hf(*values)):
                tensors[name(hf.format(i=layer))] = np.ascontiguousarray(value, np.float32)

    embed = body
    if family == "bert" and not cfg.type_vocab_size:  # BertModel always has token types: one zero row
        embed = {**body, "embed": {**body["embed"], "token_type": {
            "embedding": np.zeros((1, cfg.d_model), np.float32)}}}
        layout.embed.insert(2, fam.same("embeddings.token_type_embeddings.weight",
                                        "embed/token_type/embedding"))
    write(layout.embed + layout.final, embed, "body")
    for i in range(cfg.num_layers):
        if "layers" in body:
            layer = _index(body["layers"], i)
        elif f"layers_{i}" in body:
            layer = body[f"layers_{i}"]
        else:
            raise UserError(f"export_hf: params lack body/layers (scanned) and body/layers_{i}; "
                            "pass params of a Model built from this cfg")
        write(layout.layer, layer, f"body/layers[{i}]", layer=i)

    hf_config = fam.CONFIG_TO_HF[family](cfg)
    if head == "lm" and not cfg.tie_embeddings:
        write(layout.heads["lm_head"], params.get("lm_head", {}), "lm_head")
    elif head == "mlm":
        if cfg.activation not in ("gelu", "gelu_tanh"):
            raise UserError(f"activation={cfg.activation!r}: jaxlm's MLM head applies gelu, Hugging Face's "
                            "BERT applies hidden_act; export this model without its MLM head")
        write(layout.heads["mlm_head"], params["mlm_head"], "mlm_head")
    elif head == "pooler":  # a bare encoder with BERT's pooler (as load_hf_model's info['heads'] has it)
        write(layout.heads["pooler"], params["cls_head"]["pooler"], "cls_head/pooler")
    elif head == "classifier":
        cls = params["cls_head"]
        if "pooler" not in cls:
            raise UserError("export_hf: BertForSequenceClassification always applies BERT's tanh pooler "
                            "to the first token; only a classifier trained with pooler=True, pooling='cls' "
                            "exports")
        write(layout.heads["pooler"], cls["pooler"], "cls_head/pooler")
        write(layout.heads["classifier"], cls.get("classifier", {}), "cls_head/classifier")
        labels = int(cls["classifier"]["kernel"].shape[1])
        names = [str(n) for n in label_names]
        if len(names) != labels or len(set(names)) != labels:  # No names (or not one per output).
            names = [f"LABEL_{i}" for i in range(labels)]
        hf_config["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}
    hf_config["architectures"] = [arch]
    hf_config["dtype"] = "float32"
    generation = None
    if tokenizer is not None:
        tokenizer = export_tokenizer(tokenizer, cfg.max_len, causal=head == "lm")
        special_ids = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                special_ids[key] = hf_config[key] = int(value)
        if head == "lm":
            generation = dict(special_ids)
            if len(tokenizer) < cfg.vocab_size:  # vocab padding: no token, so never generated
                generation["suppress_tokens"] = list(range(len(tokenizer), cfg.vocab_size))
    elif family == "bert":
        hf_config["pad_token_id"] = 0

    os.makedirs(out_dir, exist_ok=True)
    stale = os.path.join(out_dir, INDEX)
    if os.path.exists(stale):  # a sharded save from before would shadow nothing, but confuse readers
        raise UserError(f"{stale} exists: export into an empty directory (or remove the old shards)")
    config_path, weights_path = os.path.join(out_dir, CONFIG), os.path.join(out_dir, WEIGHTS)
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if generation is not None:
        with open(os.path.join(out_dir, GENERATION_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), weights_path, metadata={"format": "pt"})
    # safetensors writes a private (0600) file; give it the mode open() gave config.json (the umask's).
    os.chmod(weights_path, stat.S_IMODE(os.stat(config_path).st_mode))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _export_to_bucket(cfg: ModelConfig, params: dict, out_dir: str, family: Optional[str], tokenizer: Any,
                      label_names: Sequence[str]) -> str:
    """export_hf into local scratch (JAXLM_CACHE_DIR/exports/), then uploaded. A bucket has no
    directory rename, so model.safetensors goes last: a directory without it is an upload cut short."""
    if io.exists(io.path(out_dir) / INDEX):
        raise UserError(f"{out_dir}/{INDEX} exists: export into an empty directory (or remove the old shards)")
    parent = os.path.join(io.cache_dir(), "exports")
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="hf-", dir=parent)
    try:
        export_hf(cfg, params, scratch, family=family, tokenizer=tokenizer, label_names=label_names)
        io.copy_tree(scratch, out_dir, last=WEIGHTS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _index(tree: dict, i: int) -> dict:
    return {k: _index(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}
