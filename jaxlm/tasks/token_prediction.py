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
from jaxlm.tasks.chunked_loss import chunked_cross_entropy


@flax.struct.dataclass
class TokenEvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average
    accuracy: clu_metrics.Average


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Sum of weighted per-token cross-entropies (float32) and the sum of weights."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def _metrics(loss_sum, weight, correct) -> TokenEvalMetrics:
    return collection(TokenEvalMetrics, loss=average(loss_sum, weight), accuracy=average(correct, weight))


class TokenPredictionTask(Task):
    """A task whose head predicts tokens at weighted positions (batch: targets, weights)."""

    vocab_head = True

    def loss(self, logits: jax.Array, batch: Batch):
        return token_cross_entropy(logits, batch["targets"], batch["weights"])

    def eval_metrics(self, logits: jax.Array, batch: Batch) -> TokenEvalMetrics:
        loss_sum, weight = self.loss(logits, batch)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return _metrics(loss_sum, weight, jnp.sum(correct * batch["weights"]))

    # loss_chunk_size > 0: the vocabulary projection and the cross-entropy (and eval's accuracy)
    # run chunk by chunk (jaxlm/tasks/chunked_loss.py); no full logits, in training or eval.
    def model_loss(self, model, variables: dict, batch: Batch, *, rngs: Optional[dict] = None,
                   loss_chunk_size: int = 0):
        if not loss_chunk_size:
            return super().model_loss(model, variables, batch, rngs=rngs)
        return self._chunked(model, variables, batch, rngs, loss_chunk_size, with_accuracy=False)

    def model_eval_metrics(self, model, variables: dict, batch: Batch, loss_chunk_size: int = 0) -> TokenEvalMetrics:
        if not loss_chunk_size:
            return super().model_eval_metrics(model, variables, batch)
        return _metrics(*self._chunked(model, variables, batch, None, loss_chunk_size, with_accuracy=True))

    def _chunked(self, model, variables, batch, rngs, chunk_size: int, with_accuracy: bool):
        features, head = model.apply(variables, **self.model_inputs(batch), rngs=rngs, method="loss_inputs")
        return chunked_cross_entropy(features, head, batch["targets"], batch["weights"], model.cfg,
                                     chunk_size, with_accuracy)

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
