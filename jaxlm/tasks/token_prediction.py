"""What causal and masked language modelling share: a per-token cross-entropy over a weighted
set of positions, and the same eval metrics (loss, accuracy, perplexity; bits per byte when the
data knows how many bytes its eval tokens stand for)."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from jaxlm.metrics import average, bits_per_byte, collection
from jaxlm.tasks.base import Batch, Task


@flax.struct.dataclass
class TokenEvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average
    accuracy: clu_metrics.Average


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Sum of weighted per-token cross-entropies (float32) and the sum of weights."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


class TokenPredictionTask(Task):
    """A task whose head predicts tokens at weighted positions (batch: targets, weights)."""

    vocab_head = True

    def loss(self, logits: jax.Array, batch: Batch):
        return token_cross_entropy(logits, batch["targets"], batch["weights"])

    def eval_metrics(self, logits: jax.Array, batch: Batch) -> TokenEvalMetrics:
        loss_sum, weight = self.loss(logits, batch)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return collection(TokenEvalMetrics, loss=average(loss_sum, weight),
                          accuracy=average(jnp.sum(correct * batch["weights"]), weight))

    def tokens_per_byte(self, data: Any) -> Optional[float]:
        """Eval targets per UTF-8 byte of the eval text, for bits per byte (None: not reported)."""
        return None

    def eval_summary(self, computed: dict, data: Any) -> dict:
        loss = float(computed["loss"])
        out = {"eval/loss": loss, "eval/accuracy": float(computed["accuracy"]),
               "eval/perplexity": float(jnp.exp(jnp.minimum(loss, 50.0)))}
        per_byte = self.tokens_per_byte(data)
        if per_byte:
            out["eval/bits_per_byte"] = bits_per_byte(loss, per_byte)
        return out
