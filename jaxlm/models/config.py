"""`ModelConfig`: the frozen, hashable description of one Transformer.

Built from the `model` section of an ml_collections config. Every architecture jaxlm supports
(GPT-2, Llama, BERT and anything in between) is a point in this space, which is what lets
Hugging Face import and export be a pure renaming of weights.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "none")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (MHA); 1: MQA; in between: GQA.
    head_dim: int = 0  # 0: d_model // num_heads.
    d_ff: int = 1024
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # 'pre' (GPT-2, Llama) or 'post' (original BERT).
    positions: str = "learned"
    max_len: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    use_bias: bool = True
    type_vocab_size: int = 0  # >0 adds token-type (segment) embeddings, as in BERT.
    embed_norm: bool = False  # a norm right after the embeddings (BERT).
    causal: bool = True
    dropout: float = 0.0
    # Dropout on the attention probabilities in training (BERT's attention_probs_dropout_prob,
    # GPT-2's attn_pdrop, Llama's attention_dropout); > 0 trains through the explicit attention.
    attention_dropout: float = 0.0
    dtype: str = "float32"  # compute dtype of activations.
    # The dtype the matmuls' inputs are cast to ("": dtype). bfloat16 with dtype float32 is mixed
    # precision where only the matmuls take bf16 inputs and return float32 (norms, softmax, the
    # residual stream stay float32): on XLA:CPU that dot runs 1.4-1.8x faster than a float32 one,
    # while a bf16-in, bf16-out dot is no faster (benchmarks/README.md, "Train step speed").
    matmul_dtype: str = ""
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def matmul_input_dtype(self) -> Any:
        return DTYPES[self.matmul_dtype] if self.matmul_dtype else self.compute_dtype

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def problems(self) -> list[str]:
        """Readable reasons this config cannot build a model (empty when it can)."""
        out = []

        def choice(name, options):
            if getattr(self, name) not in options:
                out.append(f"model.{name}={getattr(self, name)!r}: choose one of {', '.join(options)}")

        choice("activation", ACTIVATIONS)
        choice("norm", NORMS)
        choice("positions", POSITIONS)
        choice("remat_policy", REMAT_POLICIES)
        choice("attention_impl", ATTENTION_IMPLS)
        choice("dtype", tuple(DTYPES))
        choice("param_dtype", tuple(DTYPES))
        choice("matmul_dtype", ("",) + tuple(DTYPES))
        choice("norm_position", ("pre", "post"))
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name}={getattr(self, name)}: must be positive")
        if self.num_heads > 0 and self.kv_heads > 0 and self.num_heads % self.kv_heads:
            out.append(
                f"model.num_kv_heads={self.num_kv_heads}: must divide model.num_heads={self.num_heads}")
        if not self.head_dim and self.num_heads > 0 and self.d_model % self.num_heads:
            out.append(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                       f"{self.num_heads}: set model.head_dim explicitly or change one of them")
        if self.positions == "rope" and self.dim_per_head % 2:
            out.append(f"model.head_dim={self.dim_per_head}: RoPE needs an even head dimension")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout={self.dropout}: must be in [0, 1)")
        if not 0.0 <= self.attention_dropout < 1.0:
            out.append(f"model.attention_dropout={self.attention_dropout}: must be in [0, 1)")
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
