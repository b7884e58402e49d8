"""`AdaptedParams`: a model's params split into what trains (adapters + params trained in full)
and what stays frozen, with the shardings of both and the merge back into the model's params.

    adapted = build(config, boxed_params, mesh, rules)     # None when peft.method=none
    adapted.abstract, adapted.shardings                     # the trainable tree (a LoRA run's
                                                            # TrainState.params, what checkpoints hold)
    adapted.frozen_abstract, adapted.frozen_shardings       # the rest of the model's params
    params = adapted.merge(frozen, trainable)               # the model's params, inside jit
    variables = adapted.train_variables(frozen, trainable)  # what the train step applies the model to

The trainable tree is {"adapters": {<base param path>: {"lora_A", "lora_B"}}, "params": {<the
params trained in full, at their own paths>}} ("params" absent when nothing trains in full). The
optimizer sees only this tree, so the frozen base has no gradient and no optimizer state. The
merge (W + delta on each target, the trained params overlaid) runs inside the jitted step, so it
works for scanned kernels with a leading layer axis and kernels with head axes alike.

Adapter dropout (peft.dropout > 0, as Hugging Face peft's lora_dropout) drops out the adapter's
own input, which a merged kernel does not have: the train step then leaves the targets unmerged
and hands the model each target's factors in the "lora" collection
(jaxlm/models/adapter_branch.py), so that the layer adds (dropout(x)·left)·right. Eval and
everything after training merge as before (dropout is off there, so the function is the same).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding

from jaxlm import sharding
from jaxlm.compat import mesh_context
from jaxlm.errors import UserError
from jaxlm.models import adapter_branch
from jaxlm.peft import targets as targets_lib
from jaxlm.peft.adalora import AdaLoRA
from jaxlm.peft.lora import LoRA
from jaxlm.peft.targets import Path, Target, flatten, unflatten

METHODS = {"lora": LoRA, "adalora": AdaLoRA}
ADAPTER_RNG_STREAM = 0x10A  # fold_in constant: the adapters' init stream, apart from the model's


def enabled(config: ml_collections.ConfigDict) -> bool:
    return "peft" in config and (config.peft.get("method", "none") or "none") != "none"


def make_method(peft: ml_collections.ConfigDict):
    if peft.method not in METHODS:
        raise UserError(f"peft.method={peft.method!r}: choose none, lora or adalora")
    if not 0 <= peft.dropout < 1:
        raise UserError(f"peft.dropout={peft.dropout}: must be in [0, 1)")
    if peft.method == "adalora":
        return AdaLoRA(peft)
    return METHODS[peft.method](peft.rank, peft.alpha)


class AdaptedParams:
    def __init__(self, method, targets: list[Target], trainable: list[Path], boxed_params: Any,
                 mesh: jax.sharding.Mesh, rules, dropout: float = 0.0):
        self.method, self.targets, self.trainable_paths = method, targets, trainable
        self.dropout = float(dropout)  # on the adapters' input in training (0: merged there too)
        full = nn.unbox(boxed_params)
        full_shardings = sharding.param_shardings(boxed_params, mesh, rules)
        flat = flatten(full)
        adapters, adapter_shardings = {}, {}
        for t in targets:
            for name, (shape, names) in method.arrays(t).items():
                adapters[t.path + (name,)] = jax.ShapeDtypeStruct(shape, flat[t.path].dtype)
                adapter_shardings[t.path + (name,)] = NamedSharding(mesh, sharding.spec_for(names, shape, mesh, rules))
        self.abstract = {"adapters": unflatten(adapters)}
        self.shardings = {"adapters": unflatten(adapter_shardings)}
        if trainable:
            self.abstract["params"] = targets_lib.subtree(full, trainable)
            self.shardings["params"] = targets_lib.subtree(full_shardings, trainable)
        self.frozen_abstract = targets_lib.without(full, trainable)
        self.frozen_shardings = targets_lib.without(full_shardings, trainable)
        self.model_params = sum(int(v.size) for v in flat.values())
        self.adapter_params = sum(int(v.size) for v in adapters.values())
        self.full_params = sum(int(flat[p].size) for p in trainable)

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.full_params

    def init_trainable(self, rng: jax.Array, full: Any) -> dict:
        """Fresh adapters (B = 0: the model is unchanged) and the trained params' values in `full`."""
        flat, adapters = flatten(full), {}
        fresh = self.method.init(rng, self.targets, [flat[t.path].dtype for t in self.targets])
        for t, arrays in zip(self.targets, fresh):
            for name, value in arrays.items():
                adapters[t.path + (name,)] = value
        out = {"adapters": unflatten(adapters)}
        if self.trainable_paths:
            out["params"] = targets_lib.subtree(full, self.trainable_paths)
        return out

    def frozen_part(self, full: Any) -> dict:
        return targets_lib.without(full, self.trainable_paths)

    def merge(self, frozen: Any, trainable: dict) -> dict:
        """The model's params: the frozen ones, the trained ones overlaid, each target plus its delta."""
        flat = self._overlaid(frozen, trainable)
        for t, adapter in self._per_target(trainable):
            base = flat[t.path]
            flat[t.path] = base + self.method.delta(adapter, t).astype(base.dtype)
        return unflatten(flat)

    def train_variables(self, frozen: Any, trainable: dict) -> dict:
        """The train model's variables: {"params": merge(...)} without adapter dropout; with it, the
        params with the targets left as their base and the "lora" collection of factors, placed at
        the module that owns each kernel (scanned layers keep their leading layers axis)."""
        if not self.dropout:
            return {"params": self.merge(frozen, trainable)}
        factors = {}
        for t, adapter in self._per_target(trainable):
            left, right = self.method.factors(adapter, t)
            factors[t.path[:-1] + ("left",)], factors[t.path[:-1] + ("right",)] = left, right
        return {"params": unflatten(self._overlaid(frozen, trainable)), adapter_branch.COLLECTION: unflatten(factors)}

    @staticmethod
    def _overlaid(frozen: Any, trainable: dict) -> dict:
        """{path: array} of the model's params before any adapter: the frozen ones, the trained ones over them."""
        flat = flatten(frozen)
        flat.update(flatten(trainable.get("params", {})))
        return flat

    def _per_target(self, trainable: dict):
        """(target, {array name: array}) of each adapted kernel."""
        adapters = flatten(trainable["adapters"])
        for t in self.targets:
            yield t, {p[-1]: v for p, v in adapters.items() if p[:-1] == t.path}

    def penalty(self, trainable: dict) -> Optional[Any]:
        """The method's regulariser on the adapters (AdaLoRA's orthogonality term), None if it has none."""
        if not hasattr(self.method, "penalty"):
            return None
        return self.method.penalty(trainable["adapters"], self.targets)

    def wrap_optimizer(self, tx, total_steps: int):
        """The run's optimizer, wrapped by the method when it acts on the update (AdaLoRA's rank allocation)."""
        if not hasattr(self.method, "wrap_optimizer"):
            return tx
        return self.method.wrap_optimizer(tx, self.targets, total_steps)

    def describe(self) -> str:
        """The log line: method, adapted kernels, trainable parameters as a count and a share."""
        matrices = sum(t.matrices for t in self.targets)
        kinds = sorted({targets_lib.path_str(t.path) for t in self.targets})
        full = sorted({targets_lib.path_str(p[:-1]) for p in self.trainable_paths})
        share = 100 * self.trainable_params / max(self.model_params, 1)
        return (f"peft: {self.method.describe()} on {matrices} matrices ({', '.join(kinds)}); trainable parameters: "
                f"{self.trainable_params:,} of the model's {self.model_params:,} ({share:.2f}%): "
                f"{self.adapter_params:,} in adapters, {self.full_params:,} trained in full "
                f"({', '.join(full) or 'none'}); the rest is frozen")


def build(config: ml_collections.ConfigDict, boxed_params: Any, mesh: jax.sharding.Mesh,
          rules) -> Optional[AdaptedParams]:
    """The adapted view of a model's params for config.peft (None when peft.method is none)."""
    if not enabled(config):
        return None
    method = make_method(config.peft)
    targets, trainable = targets_lib.select(boxed_params, config.peft.targets, config.peft.trainable)
    if config.peft.dropout:
        unmerged = [t for t in targets if not adapter_branch.takes_branch(t.path[:-1])]
        if unmerged:
            raise UserError(
                f"peft.dropout={config.peft.dropout} runs each adapter beside its kernel, which jaxlm's model does for "
                f"the Transformer layers' attention (query, key, value, out) and MLP kernels only; "
                f"peft.targets={config.peft.targets!r} picks {targets_lib.path_str(unmerged[0].path)}: narrow "
                f"peft.targets to those (e.g. attn/(query|value)/kernel$) or set peft.dropout=0")
    return AdaptedParams(method, targets, trainable, boxed_params, mesh, rules, float(config.peft.dropout))


def place_frozen(adapted: AdaptedParams, init_params: Callable[[jax.Array], Any], seed: int, loaded: dict,
                 full_shardings: Any, mesh: jax.sharding.Mesh) -> dict:
    """The frozen params on the mesh: `loaded` (numpy, from init_from) where it has them, the
    fresh init of `seed` elsewhere (deterministic, so every start of a run rebuilds the same)."""
    loaded = loaded or {}
    loaded_shardings = _like(full_shardings, loaded)
    on_mesh = jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index, a=a: a[index]),
                           loaded, loaded_shardings)

    def frozen(rng, values):
        return adapted.frozen_part(overlay(nn.unbox(init_params(rng)), values))

    with mesh_context(mesh):
        return jax.jit(frozen, in_shardings=(None, loaded_shardings),
                       out_shardings=adapted.frozen_shardings)(jax.random.key(seed), on_mesh)


def _like(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _like(tree[k], v) for k, v in like.items()}
    return tree


def overlay(params: Any, loaded: Any) -> Any:
    """params with the leaves that `loaded` (a nested dict over some of its paths) replaces."""
    if isinstance(loaded, dict):
        return {k: overlay(v, loaded[k]) if k in loaded else v for k, v in params.items()}
    return loaded
