"""Masked language modelling (BERT): predict the selected tokens from both sides.

The data masks the batches (jaxlm/data/masking.py: 15% of the non-special tokens, 80/10/10
mask/random/keep); the task is the MLM head and a cross-entropy over the selected positions.
"""

import jax.numpy as jnp

from jaxlm.tasks.base import Batch, token_batch_spec
from jaxlm.tasks.token_prediction import TokenPredictionTask


class MaskedLMTask(TokenPredictionTask):
    name = "masked_lm"
    head = "mlm"

    def build_data(self, config, workdir: str, process_index: int, process_count: int):
        from jaxlm.data.mlm_data import build_mlm_data  # pylint: disable=import-outside-toplevel
        return build_mlm_data(config, workdir, process_index, process_count)

    def batch_spec(self, config) -> dict:
        return token_batch_spec(config, ("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32),
                                ("padding_mask", jnp.bool_))

    def model_kwargs(self, config) -> dict:
        return {"head": self.head}

    def model_inputs(self, batch: Batch) -> Batch:
        return {"tokens": batch["inputs"], "padding_mask": batch["padding_mask"]}
