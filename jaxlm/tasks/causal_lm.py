"""Causal language modelling: next-token cross-entropy over packed sequences."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from jaxlm.metrics import average, bits_per_byte, collection


@flax.struct.dataclass
class CausalLMEvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average
    accuracy: clu_metrics.Average


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Sum of weighted per-token cross-entropies (float32) and the sum of weights."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


class CausalLMTask:
    name = "causal_lm"
    head = "lm"
    eval_metrics_class = CausalLMEvalMetrics

    def build_data(self, config, workdir: str, process_index: int, process_count: int):
        """Tokenizer, resumable train iterator and exact eval batches (see jaxlm/data)."""
        from jaxlm.data import build_lm_data  # pylint: disable=import-outside-toplevel
        return build_lm_data(config.data, seq_len=config.seq_len, global_batch_size=config.global_batch_size,
                             seed=config.seed, workdir=workdir, process_index=process_index,
                             process_count=process_count)

    def model_kwargs(self, config) -> dict:
        return {"head": self.head}

    def dummy_inputs(self, config) -> dict:
        """Inputs of the right shapes to initialise the model."""
        return {"tokens": jnp.zeros((1, config.seq_len), jnp.int32)}

    def model_inputs(self, batch: dict) -> dict:
        return {"tokens": batch["inputs"]}

    def loss(self, logits: jax.Array, batch: dict):
        return token_cross_entropy(logits, batch["targets"], batch["weights"])

    def eval_metrics(self, logits: jax.Array, batch: dict) -> CausalLMEvalMetrics:
        loss_sum, weight = self.loss(logits, batch)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return collection(CausalLMEvalMetrics, loss=average(loss_sum, weight),
                          accuracy=average(jnp.sum(correct * batch["weights"]), weight))

    def eval_summary(self, computed: dict, data: Any) -> dict:
        loss = float(computed["loss"])
        out = {"eval/loss": loss, "eval/accuracy": float(computed["accuracy"]),
               "eval/perplexity": float(jnp.exp(jnp.minimum(loss, 50.0)))}
        tokens_per_byte = getattr(data, "eval_tokens_per_byte", None)
        if tokens_per_byte:
            out["eval/bits_per_byte"] = bits_per_byte(loss, tokens_per_byte)
        return out
