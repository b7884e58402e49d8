"""The Task protocol: what every task implements, and nothing the loop has to probe for.

A task owns which data it reads, what the data decides about the config (vocab size, labels,
pooling), the shape of one global batch, the head it adds, its loss, its eval metrics and how
they are summarised. The train loop, sharding, checkpoints, `aot`, `bench` and inference call
these methods only: no `hasattr`, no branching on task or head names outside `jaxlm/tasks/`.
"""

import abc
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from clu import metrics as clu_metrics

from jaxlm.errors import UserError

Batch = dict[str, Any]  # name -> array, one global (or host) batch


class Task(abc.ABC):
    """One training objective. Subclasses set the class attributes and implement the methods."""

    name: str  # the config's `task` value
    head: str  # the model head (jaxlm.models.Model's `head` argument)
    # Whether the head projects onto the vocabulary (counted in model FLOPs / MFU).
    vocab_head: bool = False
    # What a finished run of this task can be used for besides eval and export.
    can_generate: bool = False
    can_predict: bool = False

    # -- data ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_data(self, config: ml_collections.ConfigDict, workdir: str, process_index: int,
                   process_count: int) -> Any:
        """Tokenizer, this host's resumable train iterator and exact eval batches."""

    def build_eval_data(self, config: ml_collections.ConfigDict, workdir: str, process_index: int,
                        process_count: int) -> Any:
        """Eval batches for a trained run (default: the same data training builds)."""
        return self.build_data(config, workdir, process_index, process_count)

    def resolve(self, config: ml_collections.ConfigDict, data: Any) -> None:
        """Fixes in `config` what the data decided (called once, before the model is built).

        Every task takes the vocabulary size from the tokenizer; subclasses add their own.
        """
        resolve_vocab(config, data.vocab_size)

    # -- shapes -------------------------------------------------------------------------------
    @abc.abstractmethod
    def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global train batch (used by aot, bench and compilation)."""

    @abc.abstractmethod
    def model_kwargs(self, config: ml_collections.ConfigDict) -> dict:
        """Keyword arguments of jaxlm.models.Model beyond its ModelConfig (head, labels, pooling)."""

    def init_inputs(self, config: ml_collections.ConfigDict) -> Batch:
        """Model inputs shaped like one row of the batch, to initialise the parameters."""
        return self.model_inputs(example_batch(self.batch_spec(config), rows=1))

    @abc.abstractmethod
    def model_inputs(self, batch: Batch) -> Batch:
        """The model's keyword inputs, taken from a batch."""

    # -- objective and metrics ----------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """(sum of weighted losses, sum of weights): the mean is taken over the whole global batch."""

    @abc.abstractmethod
    def eval_metrics(self, logits: jax.Array, batch: Batch) -> clu_metrics.Collection:
        """Per-batch eval metrics, merged over the eval split."""

    # What the train and eval steps call: `model` is the flax jaxlm.models.Model, run on the batch
    # with `variables` (and `rngs`, e.g. dropout). loss_chunk_size: the config's (0: off); tasks
    # without a vocabulary head ignore it and take the full logits.
    def model_loss(self, model: Any, variables: dict, batch: Batch, *, rngs: Optional[dict] = None,
                   loss_chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
        """`loss` of the model on `batch`."""
        return self.loss(model.apply(variables, **self.model_inputs(batch), rngs=rngs), batch)

    def model_eval_metrics(self, model: Any, variables: dict, batch: Batch,
                           loss_chunk_size: int = 0) -> clu_metrics.Collection:
        """`eval_metrics` of the model on `batch`."""
        return self.eval_metrics(model.apply(variables, **self.model_inputs(batch)), batch)

    @abc.abstractmethod
    def eval_summary(self, computed: dict, data: Any) -> dict[str, float]:
        """Scalars for the writers, named eval/…"""

    def eval_report(self, computed: dict, data: Any) -> dict:
        """The full report of one evaluation, saved as JSON (default: the scalars)."""
        return self.eval_summary(computed, data)


def token_batch_spec(config: ml_collections.ConfigDict, *keys_and_dtypes: tuple[str, Any]) -> dict:
    shape = (config.global_batch_size, config.seq_len)
    return {key: jax.ShapeDtypeStruct(shape, dtype) for key, dtype in keys_and_dtypes}


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
    """model.vocab_size=0 means: the tokenizer's size, rounded up so it shards evenly."""
    if config.model.vocab_size == 0:
        multiple = max(int(config.model.get("vocab_multiple", 1)), 1)
        config.model.vocab_size = int(math.ceil(tokenizer_vocab / multiple) * multiple)
    elif config.model.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer_vocab} tokens; set --config.model.vocab_size=0 to take the tokenizer's")


def example_batch(spec: dict[str, jax.ShapeDtypeStruct], rows: Optional[int] = None) -> Batch:
    """A batch of the spec's shapes (optionally `rows` rows): masks all True, everything else 0."""
    def one(s):
        shape = ((rows or s.shape[0]),) + tuple(s.shape[1:])
        return jnp.ones(shape, s.dtype) if s.dtype == jnp.bool_ else jnp.zeros(shape, s.dtype)
    return {k: one(s) for k, s in spec.items()}
