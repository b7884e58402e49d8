"""Masked language modelling (BERT): predict the selected tokens from both sides.

The data masks the batches (jaxlm/data/masking.py: 15% of the non-special tokens, 80/10/10
mask/random/keep); the task is the MLM head and a cross-entropy over the selected positions.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from jaxlm.metrics import average, collection
from jaxlm.tasks.causal_lm import token_cross_entropy


@flax.struct.dataclass
class MaskedLMEvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average
    accuracy: clu_metrics.Average


class MaskedLMTask:
    name = "masked_lm"
    head = "mlm"
    eval_metrics_class = MaskedLMEvalMetrics

    def build_data(self, config, workdir: str, process_index: int, process_count: int):
        from jaxlm.data.mlm_data import build_mlm_data  # pylint: disable=import-outside-toplevel
        return build_mlm_data(config, workdir, process_index, process_count)

    def model_kwargs(self, config) -> dict:
        return {"head": self.head}

    def dummy_inputs(self, config) -> dict:
        shape = (1, config.seq_len)
        return {"tokens": jnp.zeros(shape, jnp.int32), "padding_mask": jnp.ones(shape, jnp.bool_)}

    def model_inputs(self, batch: dict) -> dict:
        return {"tokens": batch["inputs"], "padding_mask": batch["padding_mask"]}

    def loss(self, logits: jax.Array, batch: dict):
        return token_cross_entropy(logits, batch["targets"], batch["weights"])

    def eval_metrics(self, logits: jax.Array, batch: dict) -> MaskedLMEvalMetrics:
        loss_sum, weight = self.loss(logits, batch)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return collection(MaskedLMEvalMetrics, loss=average(loss_sum, weight),
                          accuracy=average(jnp.sum(correct * batch["weights"]), weight))

    def eval_summary(self, computed: dict, data: Any) -> dict:
        loss = float(computed["loss"])
        return {"eval/loss": loss, "eval/accuracy": float(computed["accuracy"]),
                "eval/perplexity": float(jnp.exp(jnp.minimum(loss, 50.0)))}
