"""The train step: a ShardedModel plus its optimizer, state shardings and compiled steps.

    trainer = Trainer(config, mesh)
    state = trainer.init_state(seed)                  # straight into its shardings
    steps = CompiledSteps(trainer)
    state, metrics = steps.train(state, global_batch)  # one jit, donated state
    metrics = trainer.eval_batch(state.params, global_eval_batch)
"""

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm import metrics as metrics_lib
from jaxlm import sharding
from jaxlm.checkpoint import abstract_with_shardings
from jaxlm.compat import global_norm, mesh_context
from jaxlm.optim import make_optimizer
from jaxlm.sharded_model import ShardedModel, batch_key


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class Trainer(ShardedModel):
    """What the train step needs on top of the model: optimizer, state shardings, compiled step."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        super().__init__(config, mesh)
        self.tx, self.schedule = make_optimizer(config.optim, config.steps)
        # The optimizer state mirrors the params' shardings.
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.state_shardings = TrainState(
            step=NamedSharding(mesh, P()), params=self.param_shardings,
            opt_state=sharding.like_params_shardings(abstract_opt, self.abstract_params, self.param_shardings, mesh))
        self.abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                                         opt_state=abstract_opt)

    def init_state(self, seed: int, pretrained: Optional[dict] = None) -> TrainState:
        """Initialises params and optimizer state directly into their shardings.

        pretrained: numpy arrays for part of the params (same paths and shapes, e.g. the body of
        an init_from source); they replace the fresh values, the rest (a new head) stays fresh.
        """
        pretrained = pretrained or {}
        shardings = _subtree(self.param_shardings, pretrained)
        # Global arrays in the params' shardings: every host reads its own shards only.
        pretrained = jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index, a=a: a[index]), pretrained, shardings)

        def init(rng, loaded):
            params = _overlay(nn.unbox(self.init_params(rng)), loaded)
            return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=self.tx.init(params))

        with mesh_context(self.mesh):
            return jax.jit(init, in_shardings=(None, shardings),
                           out_shardings=self.state_shardings)(jax.random.key(seed), pretrained)

    def abstract_sharded_state(self) -> TrainState:
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    def train_step(self, state: TrainState, batch: dict):
        """One optimizer step on one global batch, split into grad_accum_steps micro-batches."""
        accum = self.config.grad_accum_steps
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)

        def loss_sums(params, micro, micro_rng):
            with nn.logical_axis_rules(self.rules):
                logits = self.train_model.apply({"params": params}, **self.task.model_inputs(micro),
                                                rngs={"dropout": micro_rng})
            return self.task.loss(logits, micro)

        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
        if accum == 1:
            (loss_sum, weight), grads = grad_fn(state.params, batch, rng)
        else:
            # Micro-batch i takes rows i, i+A, i+2A…: every device keeps feeding its own rows.
            micro_batches = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)
            micro_batches = jax.lax.with_sharding_constraint(
                micro_batches, jax.tree.map(lambda x: NamedSharding(self.mesh, P(None, sharding.BATCH_AXES)),
                                            micro_batches))

            def accumulate(carry, xs):
                i, micro = xs
                (l, w), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (l, w, g)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, weight, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro_batches))
        # Gradients of the summed loss over all tokens -> gradient of the mean loss.
        grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
        grad_norm = global_norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics_lib.train_metrics(loss_sum, weight, grad_norm, self.schedule(state.step))

    def compile_train(self, batch_example: dict):
        """AOT-compiles the train step for global batches shaped like `batch_example`."""
        batch_shardings, batch_abstract = self.batch_layout(batch_example)
        train = jax.jit(self.train_step, in_shardings=(self.state_shardings, batch_shardings),
                        out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        with mesh_context(self.mesh):
            return train.lower(self.abstract_sharded_state(), batch_abstract).compile()

    def compile(self, batch_example: dict):
        """AOT-compiles the train and eval steps for this mesh (also used by `jaxlm aot`)."""
        return self.compile_train(batch_example), self.compile_eval(batch_example)


def _subtree(tree: Any, like: dict) -> Any:
    """The part of `tree` at the paths of the nested dict `like`."""
    if isinstance(like, dict):
        return {k: _subtree(tree[k], v) for k, v in like.items()}
    return tree


def _overlay(params: Any, loaded: Any) -> Any:
    """params with the leaves that `loaded` (a nested dict over some of its paths) has replaced."""
    if isinstance(loaded, dict):
        return {k: _overlay(v, loaded[k]) if k in loaded else v for k, v in params.items()}
    return loaded


class CompiledSteps:
    """The train step, compiled once per global batch shape (length-bucketed data has a few)."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer
        self._train: dict = {}

    def compiled_train(self, batch: dict):
        key = batch_key(batch)
        if key not in self._train:
            if self._train:
                logging.info("compiling the train step for another batch shape: %s",
                             {k: tuple(v.shape) for k, v in batch.items()})
            self._train[key] = self._trainer.compile_train(batch)
        return self._train[key]

    def train(self, state: TrainState, batch: dict):
        return self.compiled_train(batch)(state, batch)
