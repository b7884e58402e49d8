"""Matmuls in the precision the model asks for, and the exact GELU as PyTorch computes it.

`model.matmul_dtype` (e.g. bfloat16 with model.dtype float32) casts only the matmuls' inputs and
returns their results in model.dtype, forward and backward: mixed precision where norms, softmax
and the residual stream stay float32. The projections (transformer.Projection, the heads) call
`matmul_einsum`; flax Dense layers take `matmul_dot_general(cfg)`.
"""

import jax
import jax.numpy as jnp

from jaxlm.models.config import ModelConfig

Array = jax.Array


def matmul_einsum(cfg: ModelConfig, equation: str, x: Array, kernel: Array) -> Array:
    """x against kernel by `equation`, with inputs in model.matmul_dtype and the result in
    model.dtype (float32 accumulation when only the matmuls take bf16)."""
    dtype, inputs = cfg.compute_dtype, cfg.matmul_input_dtype
    if inputs == dtype:
        return jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype))
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    if lhs.startswith("..."):  # Leading dims folded into one, so the weight gradient names them.
        lead = x.shape[:x.ndim - len(lhs) + 3]
        y = mixed_einsum(f"Z{lhs[3:]},{rhs}->Z{out[3:]}", x.reshape((-1,) + x.shape[len(lead):]),
                         kernel, inputs, dtype)
        return y.reshape(lead + y.shape[1:])
    return mixed_einsum(equation, x, kernel, inputs, dtype)


def mixed_einsum(equation: str, x: Array, w: Array, inputs, out) -> Array:
    """einsum(equation, x, w) with x, w cast to `inputs` and the result in `out`, and a backward
    pass whose two matmuls also take `inputs` (the cotangent cast to it) and return `out`.

    jax's own transpose of a bf16-in, float32-out dot multiplies the float32 cotangent with a
    bf16 operand, which XLA:CPU runs at float32 speed; this keeps all three matmuls in bf16.
    Every label of x (and of w) must appear in w or the output (x) or the output: true of the
    projections' equations, whose gradients are then einsums of the same form."""
    operands, result = equation.split("->")
    lhs, rhs = operands.split(",")
    x_dtype, w_dtype = x.dtype, w.dtype

    def apply(eq, a, b):
        return jnp.einsum(eq, a.astype(inputs), b.astype(inputs), preferred_element_type=out)

    @jax.custom_vjp
    def f(a, b):
        return apply(equation, a, b)

    def fwd(a, b):
        a, b = a.astype(inputs), b.astype(inputs)
        return apply(equation, a, b), (a, b)

    def bwd(saved, g):
        a, b = saved
        da = apply(f"{result},{rhs}->{lhs}", g, b)
        db = apply(f"{lhs},{result}->{rhs}", a, g)
        return da.astype(x_dtype), db.astype(w_dtype)

    f.defvjp(fwd, bwd)
    return f(x, w)


def matmul_dot_general(cfg: ModelConfig):
    """flax Dense's dot_general doing what matmul_einsum does (None: flax's own)."""
    dtype, inputs = cfg.compute_dtype, cfg.matmul_input_dtype
    if inputs == dtype:
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # The inputs' and the compute dtype decide.
        if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
            raise ValueError(f"matmul_dtype: Dense contracts {dimension_numbers}, not last x first")
        return matmul_einsum(cfg, "...i,io->...o", lhs, rhs)
    return dot_general


def gelu_erf(x: Array) -> Array:
    """BERT's exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)), as PyTorch computes it. jax.nn.gelu's
    exact form goes through erfc, which XLA:CPU runs 1.7-2.7x slower forward and backward on a
    [4096, 1536] float32 array (benchmarks/README.md); the two agree within 5e-7."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))
