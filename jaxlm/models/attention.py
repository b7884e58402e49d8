"""Attention kernels: which implementation runs (`model.attention_impl`), its masks, and the
Pallas splash kernel on TPU.

* `xla`: jax.nn.dot_product_attention's XLA path (any backend; a dense [B, 1, T, T] mask for
  padding or packed documents).
* `cudnn`: the same call with cuDNN's fused flash attention (GPU; bf16/fp16, head_dim a
  multiple of 8 up to 128).
* `splash`: `jax.experimental.pallas.ops.tpu.splash_attention` (TPU only). The kernel is built
  per (sequence length, local heads, causal) with 512-token blocks where the sequence allows
  (MaxText's default), runs per example under vmap, and per device under shard_map when a mesh
  is current (a Mosaic kernel cannot be partitioned by XLA). Padding and packed documents are
  segment ids, never a dense mask: a padding token gets a segment of its own.
* `auto`: splash on TPU, cudnn on GPU where it supports the dtype and head size, xla otherwise.
  The platform is the current mesh's devices' (so `jaxlm aot` on a CPU host picks what a TPU
  would), else jax's default backend.

Training with model.attention_dropout > 0 takes `dropout_attention` (the explicit softmax with
dropout on the probabilities, as BERT's and GPT-2's attention_probs/attn_pdrop): neither jax's
fused call nor splash has dropout. Eval and decoding are deterministic and keep the choice above.

JAXLM_SPLASH_INTERPRET=1 runs `splash` on any backend in Pallas' interpreter (slow: for checking
the TPU path's numerics on a CPU, as the tests do).
"""

import functools
import os
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.errors import UserError

Array = jax.Array

SPLASH_MODULE = "jax.experimental.pallas.ops.tpu.splash_attention"
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_BLOCK = 512  # MaxText's sa_block_* default; shorter or odd sequences take 256 or 128.
LANES = 128  # splash's kv blocks are multiples of the TPU's 128 lanes: sequences pad up to it.


class SegmentMask(NamedTuple):
    """What splash attends by: one id per token [B, T]; a token sees only keys of its own id
    (and, when causal, at or before it). Padding tokens hold an id no real token has."""

    ids: Array


# == Choosing the implementation ====================================================================

@functools.lru_cache(maxsize=None)
def splash_module():
    """The splash attention package of this jax, or None where it has none."""
    import importlib  # pylint: disable=import-outside-toplevel
    try:
        return importlib.import_module(SPLASH_MODULE)
    except ImportError:
        return None


def splash_interpret() -> bool:
    return os.environ.get("JAXLM_SPLASH_INTERPRET", "") not in ("", "0")


def current_platform() -> str:
    """'tpu', 'gpu', 'cpu': the devices of the mesh being traced for, else the default backend."""
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get_mesh() if get_mesh is not None else None
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether jax's cuDNN flash attention takes this dtype and head size."""
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and head_dim % 8 == 0 and head_dim <= 128


def choose_impl(impl: str, platform: str, dtype, head_dim: int) -> str:
    """model.attention_impl -> the implementation that runs on `platform` ('xla', 'cudnn', 'splash')."""
    if impl == "auto":
        if platform == "tpu":
            return "splash" if splash_module() is not None else "xla"
        if platform == "gpu" and cudnn_supports(dtype, head_dim):
            return "cudnn"
        return "xla"
    if impl == "splash":
        if platform != "tpu" and not splash_interpret():
            raise UserError(f"model.attention_impl=splash runs only on TPU (this is {platform}): "
                            f"use auto or xla (or JAXLM_SPLASH_INTERPRET=1 to interpret the kernel)")
        if splash_module() is None:
            raise UserError(f"model.attention_impl=splash: jax {jax.__version__} has no {SPLASH_MODULE}; "
                            f"use auto or xla, or a jax with Pallas TPU kernels")
    if impl == "cudnn" and platform != "gpu":
        raise UserError(f"model.attention_impl=cudnn runs only on GPU (this is {platform}): use auto or xla")
    return impl


def drops_probabilities(cfg, deterministic: bool) -> bool:
    """Whether attention applies dropout to its probabilities (training with attention_dropout)."""
    return not deterministic and cfg.attention_dropout > 0


def resolve(cfg, initializing: bool = False, deterministic: bool = True) -> str:
    """The implementation for `cfg` here. Module.init takes xla: it needs only the shapes (the
    forward is dead code once params are the only output), and it often runs outside any mesh,
    where the platform is this host's rather than the devices' that train (`jaxlm aot`).
    Training with attention dropout takes xla's dense mask (dropout_attention)."""
    if initializing or drops_probabilities(cfg, deterministic):
        return "xla"
    return choose_impl(cfg.attention_impl, current_platform(), cfg.compute_dtype, cfg.dim_per_head)


# == Masks ==========================================================================================

def attention_mask(padding_mask: Optional[Array], length: int, causal: bool,
                   segment_ids: Optional[Array] = None) -> Optional[Array]:
    """A [B, 1, T, T] boolean mask (padding keys ∧ same segment ∧ causal), or None when plain
    causal masking suffices."""
    if padding_mask is None and segment_ids is None:
        return None
    mask = None
    if padding_mask is not None:
        mask = padding_mask[:, None, None, :].astype(jnp.bool_)
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        mask = same if mask is None else mask & same
    if causal:
        mask = mask & jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    return mask


def segment_mask(padding_mask: Optional[Array], segment_ids: Optional[Array]) -> Optional[SegmentMask]:
    """Padding and packed documents as segment ids (None: one segment, no padding)."""
    if padding_mask is None and segment_ids is None:
        return None
    ids = (jnp.zeros(padding_mask.shape, jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    if padding_mask is not None:
        # Padding keys are masked for every real query, as in attention_mask; padding queries see
        # other padding (never an empty row, which would make splash's softmax divide by zero).
        ids = jnp.where(padding_mask.astype(jnp.bool_), ids, jnp.min(ids) - 1)
    return SegmentMask(ids)


def model_mask(cfg, padding_mask: Optional[Array], length: int, segment_ids: Optional[Array],
               initializing: bool = False, deterministic: bool = True):
    """The mask the layers broadcast: segment ids for splash, a dense mask (or None) otherwise."""
    if resolve(cfg, initializing, deterministic) == "splash":
        return segment_mask(padding_mask, segment_ids)
    return attention_mask(padding_mask, length, cfg.causal, segment_ids)


# == Attention ======================================================================================

def attend(cfg, q: Array, k: Array, v: Array, mask, initializing: bool = False,
           dropout_rng: Optional[Array] = None) -> Array:
    """q [B, T, heads, D], k, v [B, T, kv_heads, D] -> [B, T, heads, D], by model.attention_impl;
    `mask` is model_mask's. With dropout_rng (training with attention dropout): dropout_attention."""
    if dropout_rng is not None:
        return dropout_attention(q, k, v, mask, cfg.causal, cfg.attention_dropout, dropout_rng)
    impl = resolve(cfg, initializing)
    if impl == "splash":
        return splash_attention(q, k, v, None if mask is None else mask.ids, causal=cfg.causal,
                                interpret=current_platform() != "tpu")
    # cudnn takes an arbitrary boolean mask (padding, or per-document segments) by turning
    # it into a dense additive bias [B, 1, T, T]: correct, but it costs O(T^2) memory per
    # example and the causal half is no longer skipped.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=cfg.causal and mask is None,
                                        implementation=impl)


def grouped_attention(q: Array, k: Array, v: Array, mask: Optional[Array], kv_layout: str,
                      drop: Optional[Callable[[Array], Array]] = None) -> Array:
    """Attention of q [B, T, heads, D] over k, v laid out as `kv_layout` ("bskd": [B, S, kv_heads, D];
    "bksd": head-major, a KV cache's), query heads grouped over the KV heads (GQA). `mask`
    [B, 1, T, S] or None; logits and softmax in float32, as jax.nn.dot_product_attention's;
    `drop` (dropout) maps the float32 probabilities before they weigh the values."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[kv_layout.index("k")]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, k, preferred_element_type=jnp.float32) * dim ** -0.5
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if drop is not None:
        probs = drop(probs)
    return jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs.astype(v.dtype), v).reshape(batch, length, heads, dim)


def dropout_attention(q: Array, k: Array, v: Array, mask: Optional[Array], causal: bool, rate: float,
                      rng: Array) -> Array:
    """Attention of q [B, T, heads, D] over k, v [B, T, kv_heads, D] with dropout on the
    probabilities (each kept with 1 - rate and scaled by 1 / (1 - rate)); `mask` is
    attention_mask's [B, 1, T, T] or None."""
    length = q.shape[1]
    if mask is None and causal:
        mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]

    def drop(probs):
        keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
        return jnp.where(keep, probs / (1.0 - rate), 0.0)
    return grouped_attention(q, k, v, mask, "bskd", drop)


def cached_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Attention of q [B, T, heads, D] over a head-major cache k, v [B, kv_heads, S, D] with a
    [B, 1, T, S] mask."""
    return grouped_attention(q, k, v, mask, "bksd")


# == Splash =========================================================================================

def splash_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    return next(b for b in (SPLASH_BLOCK, 256, LANES) if length % b == 0)


def splash_kernel(heads: int, length: int, causal: bool, interpret: bool):
    """A splash MHA kernel (GQA when k, v have fewer heads) for one example: q [heads, T, D].

    Built in the trace that uses it (not cached): its block tables are jax arrays, which a cache
    would leak from one trace into the next."""
    sa = splash_module()
    block = splash_block(length)
    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _shard_map(f, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):  # jax 0.7 and later
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # pylint: disable=import-outside-toplevel
    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _even(spec: P, shape: tuple[int, ...], mesh) -> P:
    """`spec` with every mesh axis that does not split its dimension evenly dropped."""
    out = []
    for entry, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Optional[Array] = None, *,
                     causal: bool = True, interpret: bool = False) -> Array:
    """Splash attention of q [B, T, heads, D] over k, v [B, T, kv_heads, D] -> [B, T, heads, D].

    segment_ids [B, T]: tokens attend only within their id. interpret=True runs the kernel in
    Pallas' interpreter (any backend: the CPU tests).
    """
    batch, length, heads, dim = q.shape
    pad = -length % LANES
    if pad:  # The padded tail is a segment of its own, cut off again below.
        ids = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        segment_ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=jnp.min(ids) - 1)
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    # Splash does not scale the logits; jax.nn.dot_product_attention's default is 1/sqrt(D).
    q = q * jnp.asarray(dim ** -0.5, q.dtype)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # The kernel's layout: [B, heads, T, D].

    def local(q, k, v, ids):
        kernel = splash_kernel(q.shape[1], q.shape[2], causal, interpret)
        if ids is None:
            return jax.vmap(kernel)(q, k, v)
        segments = splash_module().SegmentIds(q=ids, kv=ids)
        return jax.vmap(kernel)(q, k, v, segments)

    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get_mesh() if get_mesh is not None else None
    if mesh is None or mesh.empty or mesh.size == 1:
        out = local(q, k, v, segment_ids)
    else:
        # Per device: batch over the batch axes and heads over tensor, as the activations are.
        q_spec = _even(nn.logical_to_mesh_axes(("activation_batch", "activation_heads")), q.shape, mesh)
        kv_spec = _even(nn.logical_to_mesh_axes(("activation_batch", "activation_kv_heads")), k.shape, mesh)
        if q_spec[1] != kv_spec[1]:  # Heads split but KV heads not: give every query head its KV.
            k, v = (jnp.repeat(x, heads // k.shape[1], axis=1) for x in (k, v))
            kv_spec = q_spec
        ids_spec = P(q_spec[0])
        if segment_ids is None:
            out = _shard_map(lambda q, k, v: local(q, k, v, None), mesh, (q_spec, kv_spec, kv_spec),
                             q_spec)(q, k, v)
        else:
            out = _shard_map(local, mesh, (q_spec, kv_spec, kv_spec, ids_spec), q_spec)(q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)[:, :length]
