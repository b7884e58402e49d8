"""Hugging Face <-> jaxlm conversion (BERT, GPT-2, Llama), by safetensors only; no torch needed.

    cfg, params, info = load_hf_model("hf_dir")          # params for Model(cfg, **info["model_kwargs"])
    export_hf(cfg, params, "out_dir", tokenizer=tok)     # config.json + model.safetensors
"""

from jaxlm.convert.hf_export import export_hf, match_family
from jaxlm.convert.hf_import import load_hf_model, to_model_params

__all__ = ["export_hf", "load_hf_model", "match_family", "to_model_params"]
