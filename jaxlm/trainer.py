"""The train step: a ShardedModel plus its optimizer, state shardings and compiled steps.

    trainer = Trainer(config, mesh)
    state = trainer.init_state(seed)                  # straight into its shardings
    steps = CompiledSteps(trainer)
    state, metrics = steps.train(state, global_batch)  # one jit, donated state
    metrics = trainer.eval_batch(state.params, global_eval_batch)

With peft (config.peft.method=lora) the state's params are the trainable tree of
`jaxlm.peft.adapted.AdaptedParams` (adapters + params trained in full): the optimizer, its state,
the gradients and the checkpoints cover only them. The frozen base lives beside the state
(`Trainer.frozen`, from init_from on every start, fresh run or resume) and is merged in inside the
jitted train and eval steps; `Trainer(config, mesh, init_source)` says where it comes from. With
adapter dropout (peft.dropout > 0) the train step leaves the targets unmerged and the train model
runs each adapter beside its layer (`AdaptedParams.train_variables`); eval merges as always.
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
from jaxlm.peft import adapted as adapted_lib
from jaxlm.sharded_model import ShardedModel, batch_key


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class Trainer(ShardedModel):
    """What the train step needs on top of the model: optimizer, state shardings, compiled step."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, init_source: Any = None):
        super().__init__(config, mesh)
        # peft: the trainable tree (adapters + params trained in full) and the frozen rest.
        self.adapted = adapted_lib.build(config, self.boxed_params, mesh, self.rules)
        self.init_source = init_source  # where the frozen base comes from (a pretrained.PretrainedSource)
        self._frozen = None
        if self.adapted is not None and self.adapted.dropout:  # static: the train model's only
            self.train_model = self.train_model.clone(lora_dropout=self.adapted.dropout)
        if self.adapted is None:
            trained, trained_shardings = self.abstract_params, self.param_shardings
        else:
            trained, trained_shardings = self.adapted.abstract, self.adapted.shardings
        self.tx, self.schedule = make_optimizer(config.optim, config.steps)
        full_tx = self.tx  # what full fine-tuning would use (the log's optimizer-state comparison)
        if self.adapted is not None:  # AdaLoRA: rank allocation acts on the update, its state in opt_state
            self.tx = self.adapted.wrap_optimizer(self.tx, config.steps)
        # The optimizer state mirrors the trained params' shardings.
        abstract_opt = jax.eval_shape(self.tx.init, trained)
        self.state_shardings = TrainState(
            step=NamedSharding(mesh, P()), params=trained_shardings,
            opt_state=sharding.like_params_shardings(abstract_opt, trained, trained_shardings, mesh))
        self.abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
                                         opt_state=abstract_opt)
        if self.adapted is not None:
            logging.info("%s", self.adapted.describe())
            full = tree_bytes(jax.eval_shape(full_tx.init, self.abstract_params))
            own = tree_bytes(abstract_opt)
            logging.info("optimizer state: %s bytes, %.2f%% of full fine-tuning's %s bytes", f"{own:,}",
                         100 * own / max(full, 1), f"{full:,}")

    @property
    def frozen(self) -> Any:
        """The frozen base on the mesh (peft only; None otherwise): built by init_state on a fresh
        run, else read from init_source when first needed (a resumed run)."""
        if self.adapted is not None and self._frozen is None:
            loaded = self.init_source.load(self.abstract_params) if self.init_source is not None else {}
            self._frozen = adapted_lib.place_frozen(self.adapted, self.init_params, self.config.seed, loaded,
                                                    self.param_shardings, self.mesh)
        return self._frozen

    def _frozen_abstract(self) -> tuple:
        if self.adapted is None:
            return ()
        return (abstract_with_shardings(self.adapted.frozen_abstract, self.adapted.frozen_shardings),)

    def _frozen_shardings(self) -> tuple:
        return () if self.adapted is None else (self.adapted.frozen_shardings,)

    def init_state(self, seed: int, pretrained: Optional[dict] = None) -> TrainState:
        """Initialises params and optimizer state directly into their shardings.

        pretrained: numpy arrays for part of the params (same paths and shapes, e.g. the body of
        an init_from source); they replace the fresh values, the rest (a new head) stays fresh.
        With peft they make the frozen base (kept as `frozen`) and the params trained in full;
        the adapters start fresh.
        """
        pretrained = pretrained or {}
        shardings = _subtree(self.param_shardings, pretrained)
        # Global arrays in the params' shardings: every host reads its own shards only.
        pretrained = jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index, a=a: a[index]), pretrained, shardings)

        def init(rng, loaded):
            params = _overlay(nn.unbox(self.init_params(rng)), loaded)
            if self.adapted is None:
                return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=self.tx.init(params))
            trained = self.adapted.init_trainable(jax.random.fold_in(rng, adapted_lib.ADAPTER_RNG_STREAM), params)
            state = TrainState(step=jnp.array(0, jnp.int32), params=trained, opt_state=self.tx.init(trained))
            return state, self.adapted.frozen_part(params)

        out_shardings = self.state_shardings if self.adapted is None else (
            self.state_shardings, self.adapted.frozen_shardings)
        with mesh_context(self.mesh):
            out = jax.jit(init, in_shardings=(None, shardings), out_shardings=out_shardings)(
                jax.random.key(seed), pretrained)
        if self.adapted is None:
            return out
        state, self._frozen = out
        return state

    def abstract_sharded_state(self) -> TrainState:
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    def train_step(self, state: TrainState, batch: dict, frozen: Any = None):
        """One optimizer step on one global batch, split into grad_accum_steps micro-batches.
        frozen: the frozen base (peft); the gradients are taken w.r.t. state.params only."""
        accum = self.config.grad_accum_steps
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)

        def loss_sums(params, micro, micro_rng):
            penalty, variables = None, {"params": params}
            if self.adapted is not None:
                penalty = self.adapted.penalty(params)  # AdaLoRA's orthogonality term (LoRA: None)
                variables = self.adapted.train_variables(frozen, params)  # merged, or the factors beside
            with nn.logical_axis_rules(self.rules):
                loss_sum, weight = self.task.model_loss(self.train_model, variables, micro,
                                                        rngs={"dropout": micro_rng},
                                                        loss_chunk_size=self.loss_chunk_size)
            if penalty is not None:  # weighted so that the mean loss gets + penalty
                loss_sum = loss_sum + penalty * weight
            return loss_sum, weight

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
        in_shardings = (self.state_shardings, batch_shardings) + self._frozen_shardings()
        train = jax.jit(self.train_step, in_shardings=in_shardings, out_shardings=(self.state_shardings, None),
                        donate_argnums=(0,))
        with mesh_context(self.mesh):
            compiled = train.lower(self.abstract_sharded_state(), batch_abstract, *self._frozen_abstract()).compile()
        return compiled if self.adapted is None else WithFrozen(compiled, self)

    def compile_eval(self, batch_example: dict):
        """As ShardedModel's, on the trainable tree (peft): the frozen base is merged in inside."""
        if self.adapted is None:
            return super().compile_eval(batch_example)
        batch_shardings, batch_abstract = self.batch_layout(batch_example)

        def evaluate(trained, batch, frozen):
            return self.eval_step(self.adapted.merge(frozen, trained), batch)

        step = jax.jit(evaluate, in_shardings=(self.adapted.shardings, batch_shardings, self.adapted.frozen_shardings))
        with mesh_context(self.mesh):
            compiled = step.lower(abstract_with_shardings(self.adapted.abstract, self.adapted.shardings),
                                  batch_abstract, *self._frozen_abstract()).compile()
        return WithFrozen(compiled, self)

    def compile(self, batch_example: dict):
        """AOT-compiles the train and eval steps for this mesh (also used by `jaxlm aot`)."""
        return self.compile_train(batch_example), self.compile_eval(batch_example)


class WithFrozen:
    """A compiled peft step called as the plain one (state, batch): the frozen base is passed on.
    Everything else (memory_analysis, as_text, ...) is the compiled step's."""

    def __init__(self, compiled, trainer: Trainer):
        self._compiled, self._trainer = compiled, trainer

    def __call__(self, *args):
        return self._compiled(*args, self._trainer.frozen)

    def __getattr__(self, name):
        return getattr(self._compiled, name)


def tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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
