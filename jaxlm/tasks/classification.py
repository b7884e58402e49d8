"""Sequence classification: pool the body's hidden states, a linear classifier, cross-entropy.

Encoders pool the [CLS] token (or the mean of the real tokens); decoders pool the last real
token, so a causal-LM checkpoint can be fine-tuned as a classifier. Eval metrics are a loss
and a confusion matrix summed exactly over the eval set (padding rows masked out); precision,
recall and F1 are computed from it on the host (jaxlm.metrics.classification_scores).
"""

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from jaxlm.metrics import ConfusionMatrix, average, classification_scores, collection
from jaxlm.tasks.base import Batch, Task

MAX_CLASSES_WITH_CONFUSION_SCALARS = 10  # Larger matrices go to the eval report only.


@flax.struct.dataclass
class ClassificationEvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average
    confusion: ConfusionMatrix


def auto_pooling(causal: bool, tokenizer: Any) -> str:
    """Last token for decoders (the only one that saw the whole text); [CLS] if there is one; else mean."""
    if causal:
        return "last"
    return "cls" if getattr(tokenizer, "cls_token_id", None) is not None else "mean"


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


class ClassificationTask(Task):
    name = "classification"
    head = "classifier"
    can_predict = True

    def build_data(self, config, workdir: str, process_index: int, process_count: int):
        from jaxlm.data.classification_data import build_classification_data  # pylint: disable=import-outside-toplevel
        return build_classification_data(config, workdir, process_index, process_count)

    def build_eval_data(self, config, workdir: str, process_index: int, process_count: int):
        """For a trained run: data.eval_file alone when that suffices (see can_build_eval_only)."""
        from jaxlm.data import classification_data  # pylint: disable=import-outside-toplevel
        if classification_data.can_build_eval_only(config):
            return classification_data.build_eval_only_data(config, workdir, process_index, process_count)
        return self.build_data(config, workdir, process_index, process_count)

    def resolve(self, config, data) -> None:
        """The classes (so config.json records the label vocabulary) and the pooling 'auto' picks."""
        super().resolve(config, data)
        with config.data.ignore_type():
            config.data.num_labels = len(data.label_names)
            config.data.label_names = list(data.label_names)
            config.data.label_kind = data.label_kind  # Later evals map labels as training did.
        if config.classification.pooling == "auto":
            config.classification.pooling = auto_pooling(config.model.causal, data.tokenizer)

    def batch_spec(self, config) -> dict:
        b, t = config.global_batch_size, config.seq_len
        return {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32),
                "padding_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
                "token_type_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
                "labels": jax.ShapeDtypeStruct((b,), jnp.int32), "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}

    def model_kwargs(self, config) -> dict:
        pooling = config.classification.pooling
        return {"head": self.head, "num_labels": max(int(config.data.num_labels), 2),
                "pooling": auto_pooling(config.model.causal, None) if pooling == "auto" else pooling,
                "pooler": bool(config.classification.pooler)}

    def model_inputs(self, batch: Batch) -> Batch:
        return {"tokens": batch["inputs"], "padding_mask": batch["padding_mask"],
                "token_type_ids": batch["token_type_ids"]}

    def loss(self, logits: jax.Array, batch: Batch):
        """Class-weighted cross-entropy: batch["weights"] holds each row's class weight (0 for padding)."""
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
        weights = batch["weights"].astype(jnp.float32)
        return jnp.sum(losses * weights), jnp.sum(weights)

    def eval_metrics(self, logits: jax.Array, batch: Batch) -> ClassificationEvalMetrics:
        loss_sum, weight = self.loss(logits, batch)
        confusion = ConfusionMatrix.from_predictions(batch["labels"], jnp.argmax(logits, -1), batch["weights"] > 0,
                                                     logits.shape[-1])
        return collection(ClassificationEvalMetrics, loss=average(loss_sum, weight), confusion=confusion)

    def eval_report(self, computed: dict, data: Any) -> dict:
        """Everything about one evaluation: scores, per-class values, confusion matrix, label names."""
        scores = classification_scores(computed["confusion"], data.label_names, data.positive_index)
        return {"loss": float(computed["loss"]), **scores}

    def eval_summary(self, computed: dict, data: Any) -> dict:
        report = self.eval_report(computed, data)
        out = {f"eval/{k}": report[k] for k in (
            "loss", "accuracy", "precision", "recall", "f1", "precision_macro", "recall_macro", "f1_macro",
            "precision_weighted", "recall_weighted", "f1_weighted")}
        for name, values in report["per_class"].items():
            for key in ("precision", "recall", "f1"):
                out[f"eval/{key}/{_tag(name)}"] = values[key]
        names = report["labels"]
        if len(names) <= MAX_CLASSES_WITH_CONFUSION_SCALARS:
            for i, row in enumerate(report["confusion_matrix"]):
                for j, count in enumerate(row):
                    out[f"eval/confusion/{_tag(names[i])}/{_tag(names[j])}"] = float(count)
        return out
