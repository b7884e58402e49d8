"""A task's model laid out on a device mesh: what training and inference both need.

    model = ShardedModel(config, mesh)     # resolved config: vocab size, labels, pooling known
    model.abstract_params, model.param_shardings   # shapes and where each array lives
    logits = model.apply(params, batch)            # deterministic forward, under the axis rules

No optimizer: `jaxlm.trainer.Trainer` adds that for training; eval, generate, predict and export
use this alone.
"""

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.checkpoint import abstract_with_shardings
from jaxlm.compat import mesh_context
from jaxlm.models import Model, ModelConfig, count_params
from jaxlm.tasks import get_task


class ShardedModel:
    """Flax modules, logical-axis rules, and the params' shardings and shapes on `mesh`."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.task = get_task(config.task)
        self.model_config: ModelConfig = config_lib.model_config(config)
        mc = self.model_config
        self.rules = sharding.logical_rules(mesh, mc.num_heads, mc.kv_heads, mc.d_ff, mc.vocab_size)
        model_kwargs = self.task.model_kwargs(config)
        self.train_model = Model(mc, deterministic=False, **model_kwargs)
        self.eval_model = Model(mc, deterministic=True, **model_kwargs)
        boxed = jax.eval_shape(self.init_params, jax.random.key(0))
        self.boxed_params = boxed  # abstract, with logical axis names (peft derives its adapters' from them)
        self.param_shardings = sharding.param_shardings(boxed, mesh, self.rules)
        self.abstract_params = nn.unbox(boxed)
        self.num_params = count_params(self.abstract_params)
        self._eval_steps: dict = {}

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh (boxed) params. No axis rules here: out_shardings place the params, and flax's
        DenseGeneral would constrain its flattened kernel with the 3-axis names."""
        return self.eval_model.init(rng, **self.task.init_inputs(self.config))["params"]

    def apply(self, params: Any, batch: dict) -> jax.Array:
        """Deterministic logits for a batch (inside jit, under the mesh)."""
        with nn.logical_axis_rules(self.rules):
            return self.eval_model.apply({"params": params}, **self.task.model_inputs(batch))

    @property
    def loss_chunk_size(self) -> int:
        """Tokens per chunk of the train and eval loss (0: full logits; jaxlm/tasks/chunked_loss.py)."""
        return int(self.config.get("loss_chunk_size", 0))

    def eval_step(self, params: Any, batch: dict):
        with nn.logical_axis_rules(self.rules):
            return self.task.model_eval_metrics(self.eval_model, {"params": params}, batch, self.loss_chunk_size)

    def batch_layout(self, batch_example: dict) -> tuple[dict, dict]:
        """(shardings, abstract arrays) of a global batch shaped like `batch_example`."""
        shardings = {k: sharding.batch_sharding(self.mesh, len(v.shape)) for k, v in batch_example.items()}
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                    for k, v in batch_example.items()}
        return shardings, abstract

    def abstract_sharded_params(self) -> Any:
        return abstract_with_shardings(self.abstract_params, self.param_shardings)

    def compile_eval(self, batch_example: dict):
        """AOT-compiles the eval step for global batches shaped like `batch_example`."""
        batch_shardings, batch_abstract = self.batch_layout(batch_example)
        evaluate = jax.jit(self.eval_step, in_shardings=(self.param_shardings, batch_shardings))
        with mesh_context(self.mesh):
            return evaluate.lower(self.abstract_sharded_params(), batch_abstract).compile()

    def eval_batch(self, params: Any, batch: dict):
        """Eval metrics of one global batch; the step compiles once per batch shape (length-bucketed
        data has a few shapes; a plain run has one)."""
        key = batch_key(batch)
        if key not in self._eval_steps:
            self._eval_steps[key] = self.compile_eval(batch)
        return self._eval_steps[key](params, batch)


def batch_key(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
