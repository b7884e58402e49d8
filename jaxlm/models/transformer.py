"""The Transformer body: embeddings, attention, MLP, blocks, and the (scanned) stack.

One module family covers decoders (GPT-2, Llama: causal, pre-norm) and encoders (BERT:
bidirectional, padding mask, token types, post-norm). Every parameter carries logical axis
names (see `jaxlm/sharding.py` for how they map onto the device mesh), and so do the main
activations, through `nn.with_logical_constraint`.

Parameter layout (the Hugging Face converters in `jaxlm/convert/` rely on it):
  embed/token/embedding [vocab, embed]          embed/position/embedding [max_len, embed]
  embed/token_type/embedding [types, embed]      embed/norm/{scale,bias}
  layers/{attn_norm,mlp_norm}/{scale,bias}       (a leading [layers] axis when scanned,
  layers/attn/{query,key,value}/kernel [embed, heads, head_dim]   else layers_0, layers_1 …)
  layers/attn/out/kernel [heads, head_dim, embed]
  layers/mlp/{wi | wi_gate, wi_up}/kernel [embed, mlp]   layers/mlp/wo/kernel [mlp, embed]
  final_norm/{scale,bias}

Training with adapter dropout (peft.dropout > 0) applies the model with a "lora" collection of
adapter factors: the attention projections and MLP kernels then add their adapter branch
(jaxlm/models/adapter_branch.py). Without that collection the layers are exactly the plain ones.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import adapter_branch
from jaxlm.models.config import ModelConfig
# attention_mask is re-exported: tests/test_packing.py (and older callers) import it from here.
from jaxlm.models.attention import (attend, attention_mask, cached_attention, drops_probabilities,  # noqa: F401
                                    model_mask)
from jaxlm.models.matmul import gelu_erf, matmul_dot_general, matmul_einsum

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def normal_init(cfg: ModelConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def zeros_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        scale = self.param("scale", ones_init(("norm",)), (x.shape[-1],), cfg.weight_dtype)
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + cfg.norm_eps)
            return (y * scale).astype(cfg.compute_dtype)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale
        if cfg.use_bias:
            y = y + self.param("bias", zeros_init(("norm",)), (x.shape[-1],), cfg.weight_dtype)
        return y.astype(cfg.compute_dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embeddings, rotate-half layout (GPT-NeoX / Hugging Face Llama).

    x: [batch, length, heads, head_dim]; positions: [batch, length].
    """
    half = x.shape[-1] // 2
    freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * freq  # [B, T, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Embedder(nn.Module):
    """Token (+ learned position, + token type) embeddings; `attend` gives tied logits."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            embedding_init=normal_init(cfg, ("vocab", "embed") if name == "token" else (None, "embed")),
            name=name)
        self.token = embed(cfg.vocab_size, "token")
        if cfg.positions == "learned":
            self.position = embed(cfg.max_len, "position")
        if cfg.type_vocab_size:
            self.token_type = embed(cfg.type_vocab_size, "token_type")
        if cfg.embed_norm:
            self.norm = Norm(cfg, name="norm")

    def __call__(self, tokens: Array, positions: Array, token_type_ids: Optional[Array]) -> Array:
        cfg = self.cfg
        x = self._rows(self.token, tokens, "vocab")
        if cfg.positions == "learned":
            x = x + self._rows(self.position, positions)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + self._rows(self.token_type, types)
        if cfg.embed_norm:
            x = self.norm(x)
        return x

    def _rows(self, table: nn.Embed, ids: Array, rows_axis: Optional[str] = None) -> Array:
        """table[ids], gathered from the table made whole along `embed` first (as FSDP does for
        every weight it uses). The table splits embed over fsdp and the ids split batch over
        data+fsdp; a gather cannot keep both, and XLA then replicated the whole (batch, length,
        embed) output on every device before splitting it by batch ("involuntary full
        rematerialization"), in the train and the eval step alike."""
        whole = nn.with_logical_constraint(table.embedding, (rows_axis, None))
        return jnp.take(whole.astype(self.cfg.compute_dtype), ids, axis=0)

    def attend(self, x: Array) -> Array:
        if self.cfg.matmul_input_dtype != self.cfg.compute_dtype:
            return matmul_einsum(self.cfg, "...d,vd->...v", x, self.token.embedding)
        return self.token.attend(x)


class Projection(nn.Module):
    """An einsum against a kernel of any rank, plus an optional bias over the output dims.

    (flax's DenseGeneral initialises a flattened kernel and reshapes it, which trips the
    logical-axis constraint of a 3-axis kernel; an explicit einsum keeps the names exact.)
    """

    cfg: ModelConfig
    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_shape: tuple[int, ...]
    lora_dropout: float = 0.0  # on the adapter branch's input, when the "lora" collection has one

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        kernel = self.param("kernel", normal_init(cfg, self.kernel_axes), self.kernel_shape, cfg.weight_dtype)
        y = matmul_einsum(cfg, self.equation, x, kernel)
        extra = adapter_branch.branch(self, cfg, self.equation, x, self.lora_dropout)
        if extra is not None:
            y = y + extra
        if cfg.use_bias:
            bias_axes = self.kernel_axes[-len(self.bias_shape):]
            bias = self.param("bias", zeros_init(bias_axes), self.bias_shape, cfg.weight_dtype)
            y = y + bias.astype(cfg.compute_dtype)
        return y


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (MHA, GQA, MQA) and an optional KV cache.

    In decode mode the cache holds `max_len` slots per example (head-major); each call writes
    its keys at `cache_index` and attends to every valid slot at or before the query's slot, which
    covers both the prefill (many tokens) and single-token steps with the same code.
    """

    cfg: ModelConfig
    decode: bool = False
    lora_dropout: float = 0.0  # adapter dropout of the projections (Projection.lora_dropout)
    deterministic: bool = True  # False: training, where cfg.attention_dropout applies

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Optional[Array],
                 key_valid: Optional[Array]) -> Array:
        cfg = self.cfg
        heads, kv_heads, hd = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head

        def proj(name, n, axes):
            return Projection(cfg, "btd,dhk->bthk", (cfg.d_model, n, hd), ("embed",) + axes,
                              (n, hd), self.lora_dropout, name=name)(x)

        q = proj("query", heads, ("heads", "head_dim"))
        k = proj("key", kv_heads, ("kv_heads", "head_dim"))
        v = proj("value", kv_heads, ("kv_heads", "head_dim"))
        if cfg.positions == "rope":
            q = rope(q, positions, cfg.rope_theta)
            k = rope(k, positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = nn.with_logical_constraint(v, ("activation_batch", "activation_length", "activation_kv_heads", None))

        cached = self._update_cache(k, v, key_valid) if self.decode else None
        # The implementation (model.attention_impl) and its mask are jaxlm.models.attention's.
        if cached is not None:
            out = cached_attention(q, *cached)
        else:
            drops = drops_probabilities(cfg, self.deterministic) and not self.is_initializing()
            rng = self.make_rng("dropout") if drops else None
            out = attend(cfg, q, k, v, mask, self.is_initializing(), rng)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        return Projection(cfg, "bthk,hkd->btd", (heads, hd, cfg.d_model), ("heads", "head_dim", "embed"),
                          (cfg.d_model,), self.lora_dropout, name="out")(out)

    def _update_cache(self, k: Array, v: Array, key_valid: Optional[Array]):
        """Writes k, v at cache_index; returns (keys, values, mask) over every slot, or None on
        the init call (which only sizes the cache: its length is max_len).

        The cache is head-major, [batch, kv_heads, slots, head_dim]: attention reads it with
        (batch, head) as the leading batch dimensions, without a transpose per step.
        """
        batch, length = k.shape[:2]
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        valid = self.variable("cache", "cached_valid", jnp.zeros, (batch, length), jnp.bool_)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return None
        start = index.value
        new_valid = jnp.ones((batch, length), jnp.bool_) if key_valid is None else key_valid
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, start, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, start, 0))
        valid.value = jax.lax.dynamic_update_slice(valid.value, new_valid, (0, start))
        index.value = start + length
        slots = cached_k.value.shape[2]
        query_slot = start + jnp.arange(length)
        visible = jnp.arange(slots)[None, :] <= query_slot[:, None]  # [T, S]
        mask = visible[None, None] & valid.value[:, None, None, :]
        return cached_k.value, cached_v.value, mask


class Mlp(nn.Module):
    cfg: ModelConfig
    lora_dropout: float = 0.0  # adapter dropout of the kernels (adapter_branch.BranchDense)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg

        def dense(name, features, in_axis, out_axis, inputs):
            # flax's Dense, plus an adapter branch when the "lora" collection holds one for it.
            return adapter_branch.BranchDense(
                features, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, dot_general=matmul_dot_general(cfg),
                param_dtype=cfg.weight_dtype, kernel_init=normal_init(cfg, (in_axis, out_axis)),
                bias_init=zeros_init((out_axis,)), cfg=cfg, lora_dropout=self.lora_dropout, name=name)(inputs)

        if cfg.gated:
            act = nn.silu if cfg.activation == "swiglu" else (lambda z: nn.gelu(z, approximate=True))
            h = act(dense("wi_gate", cfg.d_ff, "embed", "mlp", x)) * dense("wi_up", cfg.d_ff, "embed", "mlp", x)
        else:
            act = {"gelu": gelu_erf,
                   "gelu_tanh": lambda z: nn.gelu(z, approximate=True),
                   "relu": nn.relu, "silu": nn.silu}[cfg.activation]
            h = act(dense("wi", cfg.d_ff, "embed", "mlp", x))
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense("wo", cfg.d_model, "mlp", "embed", h)


class Block(nn.Module):
    """One Transformer layer, pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x)))."""

    cfg: ModelConfig
    deterministic: bool = True
    decode: bool = False
    lora_dropout: float = 0.0  # adapter dropout (Transformer passes 0 when deterministic)

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Optional[Array],
                 key_valid: Optional[Array]):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attn = Attention(cfg, decode=self.decode, lora_dropout=self.lora_dropout,
                         deterministic=self.deterministic, name="attn")
        mlp = Mlp(cfg, lora_dropout=self.lora_dropout, name="mlp")
        attn_norm, mlp_norm = Norm(cfg, name="attn_norm"), Norm(cfg, name="mlp_norm")
        if cfg.norm_position == "pre":
            x = x + drop(attn(attn_norm(x), positions, mask, key_valid))
            x = x + drop(mlp(mlp_norm(x)))
        else:
            x = attn_norm(x + drop(attn(x, positions, mask, key_valid)))
            x = mlp_norm(x + drop(mlp(x)))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


class Transformer(nn.Module):
    """Embeddings → layers → final norm. Returns hidden states [batch, length, d_model].

    lora_dropout: the dropout on adapter branches' input (adapter_branch.py), when the model is
    applied with a "lora" collection and is not deterministic."""

    cfg: ModelConfig
    deterministic: bool = True
    decode: bool = False
    lora_dropout: float = 0.0

    def setup(self):
        cfg = self.cfg
        lora_dropout = 0.0 if self.deterministic else self.lora_dropout
        self.embed = Embedder(cfg, name="embed")
        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0, "cache": 0, adapter_branch.COLLECTION: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.deterministic, self.decode, lora_dropout, name="layers")
        else:
            self.blocks = [block(cfg, self.deterministic, self.decode, lora_dropout, name=f"layers_{i}")
                           for i in range(cfg.num_layers)]
        if cfg.norm_position == "pre":
            self.final_norm = Norm(cfg, name="final_norm")
        self.embed_dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

    def __call__(self, tokens: Array, *, positions: Optional[Array] = None,
                 padding_mask: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None,
                 segment_ids: Optional[Array] = None) -> Array:
        """tokens: [B, T] ints. padding_mask: [B, T], True for real tokens (keys to attend).

        segment_ids: [B, T] ints, one id per packed document (None: the row is one segment);
        a token attends only to tokens of its own segment, and positions restart at each.
        positions default to 0..T-1 (per segment); pass them explicitly for left-padded or
        cached decoding.
        """
        cfg = self.cfg
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                         if segment_ids is None else segment_positions(segment_ids))
        x = self.embed(tokens, positions, token_type_ids)
        x = self.embed_dropout(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        mask = None if self.decode else model_mask(cfg, padding_mask, tokens.shape[1], segment_ids,
                                                        self.is_initializing(), self.deterministic)
        if cfg.scan_layers:
            x, _ = self.layers(x, positions, mask, padding_mask)
        else:
            for blk in self.blocks:
                x, _ = blk(x, positions, mask, padding_mask)
        if cfg.norm_position == "pre":
            x = self.final_norm(x)
        return x

    def attend(self, x: Array) -> Array:
        """Logits through the tied token embedding."""
        return self.embed.attend(x)


def segment_positions(segment_ids: Array) -> Array:
    """Each token's offset from the first token of its segment: [B, T] int32.

    A segment starts wherever the id differs from the previous token's (and at token 0).
    """
    length = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
