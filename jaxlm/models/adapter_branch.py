"""A low-rank adapter run beside its layer, for adapter dropout (peft.dropout > 0).

LoRA's y = x·W + b + (dropout(x)·A)·B·scale cannot be folded into one merged kernel when the
adapter's input is dropped out, so for training with peft.dropout > 0 the model is applied with
an extra variable collection, "lora", that holds each adapted kernel's two factors at the path of
the module that owns the kernel:

    lora/body/layers/attn/query/{left [*in, r], right [r, *out]}   (scanned: a leading layers axis)

`left` is A (AdaLoRA: P), `right` is B·scale (AdaLoRA: diag(λ)·Q·scale): jaxlm.peft builds them
from the adapters inside the train step. A module with factors adds
einsum(einsum(dropout(x), left), right) to its output; without them it is the plain layer
(eval, predict, generate, export and peft.dropout=0 merge the adapters into the kernels instead).
The modules that can run a branch are the layers' attention projections and MLP kernels
(`takes_branch`); peft refuses dropout on any other target.
"""

import re
from typing import Optional

import flax.linen as nn
import jax

from jaxlm.models.config import ModelConfig
from jaxlm.models.matmul import matmul_einsum

Array = jax.Array
COLLECTION = "lora"
BRANCH_MODULES = {("attn", name) for name in ("query", "key", "value", "out")} | {
    ("mlp", name) for name in ("wi", "wi_gate", "wi_up", "wo")}
_LAYER = re.compile(r"layers(_\d+)?")


def takes_branch(module_path: tuple[str, ...]) -> bool:
    """Whether the module at this param path (e.g. ('body', 'layers', 'attn', 'query')) adds an
    adapter branch when the "lora" collection holds factors for it."""
    return (len(module_path) == 4 and module_path[0] == "body" and _LAYER.fullmatch(module_path[1]) is not None
            and tuple(module_path[2:]) in BRANCH_MODULES)


def _rank_label(equation: str) -> str:
    return next(c for c in "rzyxwvu" if c not in equation)


def branch(module: nn.Module, cfg: ModelConfig, equation: str, x: Array, rate: float) -> Optional[Array]:
    """(dropout(x)·left)·right for `module` (called inside its compact __call__), shaped as
    einsum(equation, x, kernel); None when the collection holds no factors for it.

    equation: the layer's own, "lhs,kernel->out"; the kernel's leading left.ndim - 1 labels are
    its input axes. rate: the dropout on the adapter's input (0: none, as in eval)."""
    if not module.has_variable(COLLECTION, "left"):
        return None
    left, right = module.get_variable(COLLECTION, "left"), module.get_variable(COLLECTION, "right")
    operands, out = equation.split("->")
    lhs, kernel = operands.split(",")
    n_in = left.ndim - 1
    ins, outs, r = kernel[:n_in], kernel[n_in:], _rank_label(equation)
    kept = "".join(c for c in lhs if c not in ins)  # "bt", or "..." for a Dense
    if rate > 0:
        # Its own "dropout" rng (a named submodule), apart from the residual dropout's.
        x = nn.Dropout(rate, deterministic=False, name="lora_dropout")(x)
    h = matmul_einsum(cfg, f"{lhs},{ins}{r}->{kept}{r}", x, left)
    return matmul_einsum(cfg, f"{kept}{r},{r}{outs}->{out}", h, right)


class BranchDense(nn.Dense):
    """flax's Dense (same params, names and values) plus the adapter branch when it has factors."""

    cfg: Optional[ModelConfig] = None
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        y = super().__call__(inputs)
        extra = branch(self, self.cfg, "...i,io->...o", inputs, self.lora_dropout)
        return y if extra is None else y + extra
