"""The three Hugging Face families jaxlm converts (BERT, GPT-2, Llama), in both directions.

Each family is described once: how its config.json maps onto a `ModelConfig`
(`config_from_hf`, `config_to_hf`), which `ModelConfig` fields it needs (`REQUIREMENTS`), and
a table of `Tensor` entries pairing Hugging Face tensor names with jaxlm parameter paths plus the
reshapes between them. Import and export both walk the same table, so they cannot drift apart.

Hugging Face names here are relative to the family's base-model prefix (`bert.`,
`transformer.`, `model.`), which the importer strips and the exporter adds back; per-layer names
contain `{i}`. jaxlm paths are relative to the body's `embed`/`final_norm`, to one layer, or to
the head module.
"""

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig

FAMILIES = ("bert", "gpt2", "llama")
# model_type in config.json -> family. Mistral and Qwen2 are Llama with other defaults.
MODEL_TYPES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}

# Hugging Face hidden_act / activation_function -> jaxlm activation (non-gated MLPs).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
# ... and the gate activation of a Llama MLP -> jaxlm's gated activation.
HF_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu",
            "gelu_fast": "geglu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
EXPORT_GATED = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Hugging Face tensors `hf` <-> jaxlm arrays at `jax` (usually one each)."""

    hf: tuple[str, ...]
    jax: tuple[Path, ...]
    to_jax: Callable[..., tuple]
    to_hf: Callable[..., tuple]
    # For a bias a checkpoint may lack although jaxlm has one (Qwen2's o_proj, a Llama with
    # attention_bias but not mlp_bias): its Hugging Face shape; absent means zeros.
    zeros_shape: Optional[tuple[int, ...]] = None


def _p(path: str) -> Path:
    return tuple(part for part in path.split("/") if part)


def same(hf: str, jax: str, zeros_shape=None) -> Tensor:
    return Tensor((hf,), (_p(jax),), lambda a: (a,), lambda a: (a,), zeros_shape)


def linear(hf: str, jax: str, bias: bool, out_features: int = 0, bias_optional: bool = False) -> list[Tensor]:
    """torch.nn.Linear weight [out, in] <-> flax Dense kernel [in, out] (+ bias)."""
    out = [Tensor((f"{hf}.weight",), (_p(f"{jax}/kernel"),), lambda w: (w.T,), lambda k: (k.T,))]
    if bias:
        out.append(same(f"{hf}.bias", f"{jax}/bias", (out_features,) if bias_optional else None))
    return out


def heads_in(hf: str, jax: str, heads: int, head_dim: int, bias: bool, bias_optional=False) -> list[Tensor]:
    """q/k/v Linear weight [heads*head_dim, d] <-> Projection kernel [d, heads, head_dim]."""
    out = [Tensor((f"{hf}.weight",), (_p(f"{jax}/kernel"),),
                  lambda w: (w.T.reshape(w.shape[1], heads, head_dim),),
                  lambda k: (k.reshape(k.shape[0], heads * head_dim).T,))]
    if bias:
        out.append(Tensor((f"{hf}.bias",), (_p(f"{jax}/bias"),),
                          lambda b: (b.reshape(heads, head_dim),), lambda b: (b.reshape(-1),),
                          (heads * head_dim,) if bias_optional else None))
    return out


def heads_out(hf: str, jax: str, heads: int, head_dim: int, d_model: int, bias: bool,
              bias_optional=False) -> list[Tensor]:
    """Output Linear weight [d, heads*head_dim] <-> Projection kernel [heads, head_dim, d]."""
    out = [Tensor((f"{hf}.weight",), (_p(f"{jax}/kernel"),),
                  lambda w: (w.T.reshape(heads, head_dim, w.shape[0]),),
                  lambda k: (k.reshape(heads * head_dim, k.shape[-1]).T,))]
    if bias:
        out.append(same(f"{hf}.bias", f"{jax}/bias", (d_model,) if bias_optional else None))
    return out


def norm(hf: str, jax: str, bias: bool) -> list[Tensor]:
    out = [same(f"{hf}.weight", f"{jax}/scale")]
    if bias:
        out.append(same(f"{hf}.bias", f"{jax}/bias"))
    return out


@dataclasses.dataclass
class Layout:
    """Every tensor of one family for one config: body parts and the optional heads."""

    embed: list[Tensor]  # jax paths relative to body/
    layer: list[Tensor]  # hf names contain {i}; jax paths relative to one layer
    final: list[Tensor]  # relative to body/
    heads: dict[str, list[Tensor]]  # head part -> entries, jax paths relative to that part


# -- BERT ------------------------------------------------------------------------------------------
def bert_layout(cfg: ModelConfig) -> Layout:
    h, hd, d = cfg.num_heads, cfg.dim_per_head, cfg.d_model
    embed = [same("embeddings.word_embeddings.weight", "embed/token/embedding"),
             same("embeddings.position_embeddings.weight", "embed/position/embedding")]
    if cfg.type_vocab_size:
        embed.append(same("embeddings.token_type_embeddings.weight", "embed/token_type/embedding"))
    embed += norm("embeddings.LayerNorm", "embed/norm", True)
    pre = "encoder.layer.{i}."
    layer = []
    for name in ("query", "key", "value"):
        layer += heads_in(f"{pre}attention.self.{name}", f"attn/{name}", h, hd, True)
    layer += heads_out(f"{pre}attention.output.dense", "attn/out", h, hd, d, True)
    layer += norm(f"{pre}attention.output.LayerNorm", "attn_norm", True)
    layer += linear(f"{pre}intermediate.dense", "mlp/wi", True)
    layer += linear(f"{pre}output.dense", "mlp/wo", True)
    layer += norm(f"{pre}output.LayerNorm", "mlp_norm", True)
    mlm = (linear("cls.predictions.transform.dense", "transform", True)
           + norm("cls.predictions.transform.LayerNorm", "norm", True)
           + [same("cls.predictions.bias", "bias")])
    heads = {"pooler": linear("pooler.dense", "", True), "mlm_head": mlm,
             "classifier": linear("classifier", "", True)}
    return Layout(embed, layer, [], heads)


def bert_config_from_hf(c: dict, where: str) -> ModelConfig:
    pos = c.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise UserError(f"{where}: position_embedding_type={pos!r} is not supported (jaxlm has learned "
                        "absolute positions only); use a BERT with 'absolute' positions")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        raise UserError(f"{where}: is_decoder/add_cross_attention BERTs are not supported; "
                        "use an encoder-only BERT")
    return ModelConfig(
        vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], d_model=c["hidden_size"],
        num_heads=c["num_attention_heads"], d_ff=c["intermediate_size"],
        activation=_activation(c.get("hidden_act", "gelu"), HF_ACTIVATIONS, "hidden_act", where),
        norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12), norm_position="post",
        positions="learned", max_len=c.get("max_position_embeddings", 512), tie_embeddings=True,
        use_bias=True, type_vocab_size=c.get("type_vocab_size", 2), embed_norm=True, causal=False,
        dropout=float(c.get("hidden_dropout_prob", 0.0) or 0.0),
        attention_dropout=float(c.get("attention_probs_dropout_prob", 0.0) or 0.0),
        init_std=c.get("initializer_range", 0.02))


def bert_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": EXPORT_ACTIVATIONS[cfg.activation],
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_len, "type_vocab_size": max(cfg.type_vocab_size, 1),
        "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute",
        "initializer_range": cfg.init_std, "tie_word_embeddings": True, "is_decoder": False,
    }


# -- GPT-2 -----------------------------------------------------------------------------------------
def gpt2_layout(cfg: ModelConfig) -> Layout:
    h, hd, d = cfg.num_heads, cfg.dim_per_head, cfg.d_model

    def split_qkv_kernel(w):  # Conv1D [d, 3d] (columns q | k | v) -> three [d, h, hd]
        return tuple(w.reshape(w.shape[0], 3, h, hd)[:, j] for j in range(3))

    def join_qkv_kernel(q, k, v):
        return (np.stack([q, k, v], 1).reshape(q.shape[0], 3 * h * hd),)

    pre = "h.{i}."
    qkv = tuple(_p(f"attn/{n}/kernel") for n in ("query", "key", "value"))
    qkv_bias = tuple(_p(f"attn/{n}/bias") for n in ("query", "key", "value"))
    layer = norm(f"{pre}ln_1", "attn_norm", True) + [
        Tensor((f"{pre}attn.c_attn.weight",), qkv, split_qkv_kernel, join_qkv_kernel),
        Tensor((f"{pre}attn.c_attn.bias",), qkv_bias, lambda b: tuple(b.reshape(3, h, hd)),
               lambda q, k, v: (np.stack([q, k, v]).reshape(-1),)),
        # Conv1D weights are [in, out] already.
        Tensor((f"{pre}attn.c_proj.weight",), (_p("attn/out/kernel"),),
               lambda w: (w.reshape(h, hd, d),), lambda k: (k.reshape(h * hd, d),)),
        same(f"{pre}attn.c_proj.bias", "attn/out/bias"),
    ] + norm(f"{pre}ln_2", "mlp_norm", True) + [
        same(f"{pre}mlp.c_fc.weight", "mlp/wi/kernel"), same(f"{pre}mlp.c_fc.bias", "mlp/wi/bias"),
        same(f"{pre}mlp.c_proj.weight", "mlp/wo/kernel"), same(f"{pre}mlp.c_proj.bias", "mlp/wo/bias"),
    ]
    embed = [same("wte.weight", "embed/token/embedding"), same("wpe.weight", "embed/position/embedding")]
    heads = {"lm_head": linear("lm_head", "", False)}
    return Layout(embed, layer, norm("ln_f", "final_norm", True), heads)


def gpt2_config_from_hf(c: dict, where: str) -> ModelConfig:
    for key, ok, why in (
            ("scale_attn_weights", True, "jaxlm always scales attention logits by 1/sqrt(head_dim)"),
            ("scale_attn_by_inverse_layer_idx", False, "jaxlm has no per-layer attention scaling"),
            ("add_cross_attention", False, "jaxlm has no cross-attention")):
        if bool(c.get(key, ok)) != ok:
            raise UserError(f"{where}: {key}={c.get(key)!r} is not supported ({why}); "
                            f"only {key}={ok} converts exactly")
    d = c.get("n_embd", 768)
    return ModelConfig(
        vocab_size=c["vocab_size"], num_layers=c.get("n_layer", 12), d_model=d,
        num_heads=c.get("n_head", 12), d_ff=c.get("n_inner") or 4 * d,
        activation=_activation(c.get("activation_function", "gelu_new"), HF_ACTIVATIONS,
                               "activation_function", where),
        norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), norm_position="pre",
        positions="learned", max_len=c.get("n_positions", 1024),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), use_bias=True, causal=True,
        dropout=float(c.get("resid_pdrop", 0.0) or 0.0), attention_dropout=float(c.get("attn_pdrop", 0.0) or 0.0),
        init_std=c.get("initializer_range", 0.02))


def gpt2_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len,
        "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
        "activation_function": EXPORT_ACTIVATIONS[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attention_dropout,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


# -- Llama (and Mistral / Qwen2) -------------------------------------------------------------------
def llama_layout(cfg: ModelConfig, qkv_bias: bool = None, o_bias: bool = None,
                 mlp_bias: bool = None) -> Layout:
    """Biases: with cfg.use_bias jaxlm has all of them; a checkpoint that lacks some (Qwen2 has
    q/k/v biases only) imports them as zeros, which is exact."""
    h, kv, hd, d, ff = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model, cfg.d_ff
    b = cfg.use_bias
    pre = "layers.{i}."
    layer = [same(f"{pre}input_layernorm.weight", "attn_norm/scale")]
    for name, n, present in (("q", h, qkv_bias), ("k", kv, qkv_bias), ("v", kv, qkv_bias)):
        layer += heads_in(f"{pre}self_attn.{name}_proj", f"attn/{_QKV[name]}", n, hd, b, present is False)
    layer += heads_out(f"{pre}self_attn.o_proj", "attn/out", h, hd, d, b, o_bias is False)
    layer.append(same(f"{pre}post_attention_layernorm.weight", "mlp_norm/scale"))
    layer += linear(f"{pre}mlp.gate_proj", "mlp/wi_gate", b, ff, mlp_bias is False)
    layer += linear(f"{pre}mlp.up_proj", "mlp/wi_up", b, ff, mlp_bias is False)
    layer += linear(f"{pre}mlp.down_proj", "mlp/wo", b, d, mlp_bias is False)
    embed = [same("embed_tokens.weight", "embed/token/embedding")]
    heads = {"lm_head": linear("lm_head", "", False)}
    return Layout(embed, layer, [same("norm.weight", "final_norm/scale")], heads)


_QKV = {"q": "query", "k": "key", "v": "value"}


def llama_biases(c: dict, model_type: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, mlp bias) present in this checkpoint."""
    if model_type == "qwen2":
        return True, False, False
    attn = bool(c.get("attention_bias", False))
    return attn, attn, bool(c.get("mlp_bias", False))


def llama_config_from_hf(c: dict, where: str, model_type: str) -> ModelConfig:
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise UserError(f"{where}: rope scaling {rope_type!r} is not supported (jaxlm's RoPE has no "
                        "linear/dynamic/yarn/llama3 scaling); only plain RoPE (rope_type 'default') converts")
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{where}: partial_rotary_factor={partial} is not supported (jaxlm rotates the "
                        "whole head dimension)")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    window = c.get("sliding_window")
    uses_window = c.get("use_sliding_window", model_type != "qwen2")
    max_len = c.get("max_position_embeddings", 2048)
    if window is not None and uses_window and window < max_len:
        raise UserError(f"{where}: sliding_window={window} < max_position_embeddings={max_len} is not "
                        "supported (jaxlm has no sliding-window attention); set sliding_window to null "
                        "if the model never sees longer sequences")
    act = c.get("hidden_act", "silu")
    qkv_b, o_b, mlp_b = llama_biases(c, model_type)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or 0
    head_dim = 0 if head_dim == d // heads and d % heads == 0 else head_dim  # 0: jaxlm's default
    return ModelConfig(
        vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], d_model=d, num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=c["intermediate_size"], activation=_activation(act, HF_GATED, "hidden_act", where),
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), norm_position="pre", positions="rope",
        max_len=max_len, rope_theta=float(theta),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), use_bias=qkv_b or o_b or mlp_b,
        causal=True, attention_dropout=float(c.get("attention_dropout", 0.0) or 0.0),  # Llama's only dropout
        init_std=c.get("initializer_range", 0.02))


def llama_config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "hidden_act": EXPORT_GATED[cfg.activation],
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
        "attention_dropout": cfg.attention_dropout, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _activation(name: str, table: dict, key: str, where: str) -> str:
    if name not in table:
        raise UserError(f"{where}: {key}={name!r} is not supported for this family; "
                        f"supported: {', '.join(sorted(table))}")
    return table[name]


# -- which family a ModelConfig is -----------------------------------------------------------------
def _mha(cfg):  # plain multi-head attention with d_model = heads * head_dim
    return cfg.kv_heads == cfg.num_heads and cfg.dim_per_head * cfg.num_heads == cfg.d_model


# family -> {field: the value it needs, or the values it accepts}. "mha": multi-head attention
# with head_dim = d_model / num_heads (GPT-2 and BERT have no GQA and no free head_dim).
_SHARED = {"norm_position": "pre", "type_vocab_size": 0, "embed_norm": False, "causal": True}
REQUIREMENTS: dict[str, dict[str, Any]] = {
    "gpt2": {**_SHARED, "norm": "layernorm", "positions": "learned", "activation": tuple(EXPORT_ACTIVATIONS),
             "use_bias": True, "mha": True},
    "llama": {**_SHARED, "norm": "rmsnorm", "positions": "rope", "activation": tuple(EXPORT_GATED)},
    "bert": {"norm": "layernorm", "norm_position": "post", "positions": "learned",
             "activation": tuple(EXPORT_ACTIVATIONS), "use_bias": True, "causal": False, "embed_norm": True,
             "mha": True},
}


def mismatches(cfg: ModelConfig, family: str) -> list[str]:
    """The fields of `cfg` that keep it out of `family`, as 'field=value (needs X)'."""
    out = []
    for field, need in REQUIREMENTS[family].items():
        if field == "mha":
            if not _mha(cfg):
                out.append(f"num_kv_heads/head_dim={cfg.num_kv_heads}/{cfg.head_dim} "
                           "(needs MHA with head_dim = d_model/num_heads)")
            continue
        have = getattr(cfg, field)
        accepted = need if isinstance(need, tuple) else (need,)
        if have not in accepted:
            out.append(f"{field}={have!r} (needs {'|'.join(accepted) if isinstance(need, tuple) else repr(need)})")
    return out


LAYOUTS = {"bert": bert_layout, "gpt2": gpt2_layout, "llama": llama_layout}
CONFIG_TO_HF = {"bert": bert_config_to_hf, "gpt2": gpt2_config_to_hf, "llama": llama_config_to_hf}


def config_from_hf(family: str, c: dict, where: str, model_type: str) -> ModelConfig:
    try:
        if family == "bert":
            return bert_config_from_hf(c, where)
        if family == "gpt2":
            return gpt2_config_from_hf(c, where)
        return llama_config_from_hf(c, where, model_type)
    except KeyError as e:
        raise UserError(f"{where}: config.json lacks {e.args[0]!r}, which a {model_type} config needs; "
                        "re-save it with save_pretrained") from None


def layout_for(family: str, cfg: ModelConfig, hf_config: Optional[dict[str, Any]] = None,
               model_type: str = "") -> Layout:
    if family == "llama" and hf_config is not None and cfg.use_bias:
        return llama_layout(cfg, *llama_biases(hf_config, model_type))
    return LAYOUTS[family](cfg)
