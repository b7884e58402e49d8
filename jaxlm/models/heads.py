"""Heads on top of the Transformer body: LM (tied or untied), masked LM, classification."""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.config import ModelConfig
from jaxlm.models.matmul import gelu_erf, matmul_dot_general, matmul_einsum
from jaxlm.models.transformer import Norm, normal_init, zeros_init

Array = jax.Array


class LMHead(nn.Module):
    """Next-token logits. Tied heads reuse the token embedding (`attend`)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        if not cfg.tie_embeddings:
            self.kernel = self.param("kernel", normal_init(cfg, ("embed", "vocab")),
                                     (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)

    def __call__(self, x: Array, attend: Callable[[Array], Array]) -> Array:
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits = attend(x)
        else:
            logits = matmul_einsum(cfg, "btd,dv->btv", x, self.kernel)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def projection(self, embedding: Array) -> dict:
        """The output projection's weights for `project_vocab` (the chunked loss)."""
        return {"embedding": embedding} if self.cfg.tie_embeddings else {"kernel": self.kernel}


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + activation + norm, then tied decoder plus a bias."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.transform = nn.Dense(cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                                  dot_general=matmul_dot_general(cfg),
                                  kernel_init=normal_init(cfg, ("embed", "embed_out")),
                                  bias_init=zeros_init(("embed_out",)))
        self.norm = Norm(cfg)
        self.bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)

    def features(self, x: Array) -> Array:
        """What the tied decoder projects: dense, activation, norm."""
        h = self.transform(x)
        h = nn.gelu(h, approximate=True) if self.cfg.activation == "gelu_tanh" else gelu_erf(h)
        return self.norm(h)

    def __call__(self, x: Array, attend: Callable[[Array], Array]) -> Array:
        logits = attend(self.features(x))
        logits = logits + self.bias.astype(logits.dtype)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def projection(self, embedding: Array) -> dict:
        return {"embedding": embedding, "bias": self.bias}


def project_vocab(x: Array, head: dict, cfg: ModelConfig) -> Array:
    """Vocabulary logits of features x [..., d_model] from a head's `projection()` weights, as the
    heads compute them: tied {'embedding': [V, d]} or untied {'kernel': [d, V]}, plus 'bias' [V].
    The weights are cast to the compute dtype here, so a caller can keep float32 ones."""
    if "embedding" in head:
        logits = matmul_einsum(cfg, "...d,vd->...v", x, head["embedding"])
    else:
        logits = matmul_einsum(cfg, "...d,dv->...v", x, head["kernel"])
    if "bias" in head:
        logits = logits + head["bias"].astype(logits.dtype)
    return logits


class ClassificationHead(nn.Module):
    """Pool the sequence, then (optionally BERT's tanh pooler) dropout and a linear classifier.

    pooling: 'cls' (first token), 'mean' (over real tokens) or 'last' (last real token, for
    decoder models).
    """

    cfg: ModelConfig
    num_labels: int
    pooling: str = "cls"
    pooler: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, padding_mask: Optional[Array]) -> Array:
        cfg = self.cfg
        if padding_mask is None:
            padding_mask = jnp.ones(x.shape[:2], jnp.bool_)
        if self.pooling == "cls":
            pooled = x[:, 0]
        elif self.pooling == "mean":
            w = padding_mask.astype(jnp.float32)[..., None]
            pooled = (jnp.sum(x.astype(jnp.float32) * w, 1) / jnp.maximum(w.sum(1), 1.0)).astype(x.dtype)
        elif self.pooling == "last":
            last = jnp.maximum(jnp.sum(padding_mask.astype(jnp.int32), 1) - 1, 0)
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        else:
            raise ValueError(f"unknown pooling {self.pooling!r}")
        if self.pooler:
            pooled = jnp.tanh(nn.Dense(cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                                       dot_general=matmul_dot_general(cfg),
                                       kernel_init=normal_init(cfg, ("embed", "embed_out")),
                                       bias_init=zeros_init(("embed_out",)), name="pooler")(pooled))
        pooled = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(pooled)
        logits = nn.Dense(self.num_labels, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                          kernel_init=normal_init(cfg, ("embed", None)), bias_init=zeros_init((None,)),
                          name="classifier")(pooled)
        return logits
