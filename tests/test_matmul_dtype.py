"""model.matmul_dtype: bf16 matmul inputs with float32 results, in both directions.

The mixed einsum's forward is jax's own bf16-in, float32-out einsum; its backward keeps the two
gradient matmuls in bf16 too (jax's transpose would multiply a float32 cotangent by a bf16
operand, float32 speed on XLA:CPU). Checked: values against autodiff of the plain cast einsum,
the dtypes every dot_general of the gradient takes, and whole models (GPT-2, Llama, BERT with
its pooler) against float32 with the same parameters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_COMPILE, replace, tiny_bert_config, tiny_config, tiny_llama_config
from jaxlm.models import Model
from jaxlm.models.matmul import gelu_erf, matmul_dot_general, matmul_einsum
from test_model import init_params, tokens_for

BF16 = jnp.bfloat16
EQUATIONS = [("btd,dhk->bthk", (2, 5, 8), (8, 3, 4)), ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)),
             ("...d,vd->...v", (2, 5, 8), (6, 8)), ("...d,dv->...v", (2, 5, 8), (8, 6))]


def draw(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1, shape), jnp.float32)


def cast_einsum(eq, a, b):
    return jnp.einsum(eq, a.astype(BF16), b.astype(BF16), preferred_element_type=jnp.float32)


@pytest.mark.parametrize("eq,x_shape,w_shape", EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_mixed_einsum_equals_the_cast_einsum_and_its_gradients(eq, x_shape, w_shape):
    cfg = tiny_config(matmul_dtype="bfloat16")
    x, w = draw(0, x_shape), draw(1, w_shape)
    mixed = lambda a, b: jnp.sum(jnp.sin(matmul_einsum(cfg, eq, a, b)))  # noqa: E731
    plain = lambda a, b: jnp.sum(jnp.sin(cast_einsum(eq, a, b)))  # noqa: E731
    out = matmul_einsum(cfg, eq, x, w)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, cast_einsum(eq, x, w))  # The same forward, bit for bit.
    grads, reference = jax.grad(mixed, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)
    for g, r, primal in zip(grads, reference, (x, w)):
        assert g.dtype == jnp.float32 and g.shape == primal.shape
        # Both round to bf16 somewhere (the cotangent here, the gradient there): a few bf16 ulps.
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-2 * float(jnp.max(jnp.abs(r)))
        assert float(jnp.max(jnp.abs(r))) > 0.1


def test_every_gradient_matmul_takes_bf16_inputs():
    cfg = tiny_config(matmul_dtype="bfloat16")
    x, w = draw(2, (2, 5, 8)), draw(3, (8, 3, 4))
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(matmul_einsum(cfg, "btd,dhk->bthk", a, b) ** 2),
                                    (0, 1)))(x, w)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # The forward and the two gradient matmuls.
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [BF16, BF16], e
        assert e.outvars[0].aval.dtype == jnp.float32


def _equations(jaxpr):
    """Every equation of a jaxpr, inside custom_vjp / pjit sub-jaxprs too."""
    for e in jaxpr.eqns:
        yield e
        for param in e.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                yield from _equations(getattr(inner, "jaxpr", inner))


def test_dense_dot_general_is_the_mixed_einsum():
    cfg = tiny_config(matmul_dtype="bfloat16")
    assert matmul_dot_general(tiny_config()) is None  # float32 everywhere: flax's own dot.
    x, w = draw(4, (3, 4, 8)), draw(5, (8, 6))
    dot = matmul_dot_general(cfg)
    np.testing.assert_array_equal(dot(x, w, (((2,), (0,)), ((), ()))), cast_einsum("...d,dv->...v", x, w))
    with pytest.raises(ValueError, match="matmul_dtype"):
        dot(x, w.T, (((2,), (1,)), ((), ())))


@functools.lru_cache(maxsize=None)
def loss_and_grads(model):
    def loss(params, x):
        logits = model.apply({"params": params}, x[:, :-1])
        if logits.ndim == 2:  # The classifier: a fixed label per example.
            return -jnp.mean(jax.nn.log_softmax(logits)[:, 1]), logits
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("cfg,head", [(tiny_config(), "lm"), (tiny_llama_config(), "lm"),
                                      (tiny_bert_config(), "classifier")], ids=["gpt2", "llama", "bert"])
def test_models_with_bf16_matmuls_follow_float32(cfg, head):
    kw = dict(head=head, num_labels=3, pooler=True) if head == "classifier" else {}
    full, mixed = Model(cfg, **kw), Model(replace(cfg, matmul_dtype="bfloat16"), **kw)
    params = init_params(full)
    x = tokens_for(7)
    (loss32, logits32), grads32 = loss_and_grads(full)(params, x)
    (loss16, logits16), grads16 = loss_and_grads(mixed)(params, x)
    assert logits16.dtype == jnp.float32  # The results, not only the parameters, stay float32.
    scale = float(jnp.max(jnp.abs(logits32)))
    assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.03 * scale
    assert float(jnp.max(jnp.abs(logits16 - logits32))) > 0  # bf16 did happen.
    assert abs(float(loss16) - float(loss32)) < 0.01 * abs(float(loss32))
    top = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads32))
    for (path, g16), g32 in zip(jax.tree_util.tree_leaves_with_path(grads16), jax.tree.leaves(grads32)):
        assert g16.dtype == jnp.float32
        error = float(jnp.max(jnp.abs(g16 - g32)))
        if "'key']['bias']" in jax.tree_util.keystr(path):
            # Softmax ignores a constant per query, so the key bias's true gradient is 0: float32
            # leaves rounding noise, bf16 attention matmuls a larger one, both far below the rest.
            assert float(jnp.max(jnp.abs(g32))) < 1e-6 * top and error < 1e-3 * top, (error, top)
            continue
        assert error <= 0.05 * float(jnp.max(jnp.abs(g32))) + 1e-6, jax.tree_util.keystr(path)


def test_a_bad_matmul_dtype_is_named():
    problems = tiny_config(matmul_dtype="int8").problems()
    assert len(problems) == 1 and problems[0].startswith("model.matmul_dtype='int8'"), problems


def test_gelu_erf_is_the_exact_gelu():
    """The erf form (PyTorch's) against jax's erfc form, values and gradients, over the range
    where GELU bends and its tails."""
    x = jnp.linspace(-12.0, 12.0, 4097, dtype=jnp.float32)
    exact = lambda z: jax.nn.gelu(z, approximate=False)  # noqa: E731
    np.testing.assert_allclose(gelu_erf(x), exact(x), atol=1e-6, rtol=1e-6)
    grad = jax.vmap(jax.grad(gelu_erf))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(exact))(x), atol=1e-6, rtol=1e-6)
    assert float(gelu_erf(jnp.float32(1.0))) == pytest.approx(0.8413447460685429, abs=1e-7)  # 1·Φ(1).
