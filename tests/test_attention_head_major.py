"""The CPU's XLA attention (attention.head_major_attention) against jax.nn.dot_product_attention's
XLA path: outputs and gradients of q, k, v for causal, bidirectional, GQA, MQA, padding and packed
documents, in float32, bf16 compute and bf16 matmuls; and `attend` on this CPU takes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import attention
from jaxlm.models.config import ModelConfig


def qkv(batch, length, heads, kv_heads, dim=16, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(batch, length, n, dim)), jnp.float32) for n in (heads, kv_heads, kv_heads)]


def reference(q, k, v, mask, causal):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal and mask is None,
                                        implementation="xla")


def loss_and_grads(f, q, k, v, cotangent):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cotangent),
                                      argnums=(0, 1, 2)))(q, k, v)


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = {
    "causal": dict(heads=4, kv_heads=4, causal=True, padding=None, segments=None),
    "bidirectional padded": dict(heads=4, kv_heads=4, causal=False, padding=[12, 7], segments=None),
    "gqa causal padded": dict(heads=4, kv_heads=2, causal=True, padding=[12, 9], segments=None),
    "mqa packed": dict(heads=4, kv_heads=1, causal=True, padding=None, segments=[[5], [3, 8]]),
}


def case_inputs(case):
    batch, length = 2, 12
    q, k, v = qkv(batch, length, case["heads"], case["kv_heads"])
    padding = None if case["padding"] is None else jnp.asarray(np.arange(length)[None] < np.asarray(case["padding"])[:, None])
    segments = None
    if case["segments"] is not None:
        ids = np.zeros((batch, length), np.int32)
        for b, cuts in enumerate(case["segments"]):
            for c in cuts:
                ids[b, c:] += 1
        segments = jnp.asarray(ids)
    mask = attention.attention_mask(padding, length, case["causal"], segments)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    if padding is not None:  # Padding queries' outputs are never used: only real rows count.
        cotangent = cotangent * padding[:, :, None, None]
    return q, k, v, mask, cotangent


@pytest.mark.parametrize("name", list(CASES))
def test_float32_outputs_and_gradients_match_jax(name):
    case = CASES[name]
    q, k, v, mask, cotangent = case_inputs(case)
    cfg = ModelConfig(causal=case["causal"])
    mine = loss_and_grads(lambda q, k, v: attention.head_major_attention(cfg, q, k, v, mask), q, k, v, cotangent)
    ref = loss_and_grads(lambda q, k, v: reference(q, k, v, mask, case["causal"]), q, k, v, cotangent)
    out_mine = attention.head_major_attention(cfg, q, k, v, mask)
    out_ref = reference(q, k, v, mask, case["causal"])
    if case["padding"] is not None:
        keep = np.asarray(cotangent[..., :1, :1] != 0)  # real query rows
        out_mine, out_ref = np.asarray(out_mine) * keep, np.asarray(out_ref) * keep
    np.testing.assert_allclose(out_mine, out_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mine[0], ref[0], rtol=1e-5)
    for g_mine, g_ref in zip(mine[1], ref[1]):
        np.testing.assert_allclose(g_mine, g_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("precision", ["bf16 compute", "bf16 matmuls"])
def test_bf16_stays_within_bf16_rounding_of_the_float32_result(precision):
    case = CASES["gqa causal padded"]
    q, k, v, mask, cotangent = case_inputs(case)
    if precision == "bf16 compute":
        cfg = ModelConfig(dtype="bfloat16")
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    else:
        cfg = ModelConfig(matmul_dtype="bfloat16")
    mine = loss_and_grads(lambda q, k, v: attention.head_major_attention(cfg, q, k, v, mask), q, k, v, cotangent)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = loss_and_grads(lambda q, k, v: reference(q, k, v, mask, True), *f32, cotangent)
    for g_mine, g_ref in zip(mine[1], ref[1]):
        assert g_mine.dtype == q.dtype
        assert relative(g_mine, g_ref) < 2e-2, precision  # bf16 keeps 8 bits: ~4e-3 per rounding
        assert relative(g_mine, g_ref) > 0  # and it did round: the bf16 path really ran
    if precision == "bf16 matmuls":  # float32 softmax and output around bf16 matmuls
        out = attention.head_major_attention(cfg, q, k, v, mask)
        assert out.dtype == jnp.float32


def test_attend_on_this_cpu_is_the_head_major_path():
    q, k, v, mask, _ = case_inputs(CASES["gqa causal padded"])
    cfg = ModelConfig(causal=True, attention_impl="auto")
    assert attention.current_platform() == "cpu"
    np.testing.assert_array_equal(attention.attend(cfg, q, k, v, mask),
                                  attention.head_major_attention(cfg, q, k, v, mask))
