"""Metric collections (clu), model FLOPs and MFU.

Train metrics stay on device between log intervals: each step returns a `TrainMetrics` whose
merge is plain jnp arithmetic, dispatched asynchronously; only `compute()` at a log step syncs.
"""

import contextlib
import functools
import json
import math
import os
import re
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

from jaxlm.models.config import ModelConfig


def average(total, count) -> clu_metrics.Average:
    return clu_metrics.Average(total=jnp.asarray(total, jnp.float32), count=jnp.asarray(count, jnp.float32))


@flax.struct.dataclass
class Sum(clu_metrics.Metric):
    """A plain sum (clu has averages; counts of bad steps want a sum)."""

    total: jnp.ndarray

    @classmethod
    def empty(cls) -> "Sum":
        return cls(total=jnp.array(0, jnp.float32))

    def merge(self, other: "Sum") -> "Sum":
        return type(self)(total=self.total + other.total)

    def compute(self):
        return self.total


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average
    grad_norm: clu_metrics.Average
    learning_rate: clu_metrics.LastValue
    nonfinite_steps: Sum


def train_metrics(loss_sum, weight_sum, grad_norm, learning_rate) -> TrainMetrics:
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return collection(
        TrainMetrics, loss=average(loss_sum, weight_sum), grad_norm=average(grad_norm, 1.0),
        learning_rate=clu_metrics.LastValue(value=jnp.asarray(learning_rate, jnp.float32)),
        nonfinite_steps=Sum(total=bad.astype(jnp.float32)))


def collection(cls, **metrics):
    """A clu Collection holding these metric values (clu's own constructors want model outputs)."""
    return cls.empty().replace(**metrics)


def matmul_params(cfg: ModelConfig, vocab_projection: bool = True) -> int:
    """Parameters that take part in a matmul per token (excludes embedding lookups and norms),
    plus the output projection to the vocabulary (tied or not) when the head has one."""
    d, hd = cfg.d_model, cfg.dim_per_head
    attn = d * hd * (cfg.num_heads + 2 * cfg.kv_heads) + cfg.num_heads * hd * d
    mlp = d * cfg.d_ff * (3 if cfg.gated else 2)
    return cfg.num_layers * (attn + mlp) + (d * cfg.vocab_size if vocab_projection else 0)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, vocab_projection: bool = True) -> float:
    """Model FLOPs per trained token: 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B).

    N counts matmul parameters; the attention term counts QK^T and AV over the full length, as
    XLA computes them (no causal skipping). Remat recomputation is not counted (model FLOPs,
    not hardware FLOPs).
    """
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    return 6 * matmul_params(cfg, vocab_projection) + attention


def batch_length(batch: dict, default: int) -> int:
    """Sequence length of a batch (length-bucketed batches are shorter than seq_len)."""
    return max((v.shape[1] for v in batch.values() if getattr(v, "ndim", 0) >= 2), default=default)


# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets.
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
}


@functools.cache
def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n×n matmul on the default device: the MFU denominator on a CPU.

    Measured once per host and kept in its cache (JAXLM_CACHE_DIR), keyed by the device, the
    core count and the jax version: the measurement costs ~100 GFLOP, seconds of every start on
    a small CPU, for a figure that does not change between runs."""
    device = jax.devices()[0]
    key = f"{device.platform}-{device.device_kind}-{os.cpu_count()}-{jax.__version__}-{n}"
    memo = os.path.join(_cache_dir(), "matmul_peak", re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        with open(memo) as f:
            return float(json.load(f)["flops"])
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    peak = 2 * n ** 3 / min(times)  # The best run: a peak, as in benchmarks/peers/peak_matmul.py.
    try:
        from jaxlm import io  # pylint: disable=import-outside-toplevel
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        io.write_json_atomic(memo, {"flops": peak, "key": key, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError as e:  # A read-only cache only costs the next start the measurement.
        logging.warning("could not keep the matmul peak in %s: %s", memo, e)
    return peak


def _cache_dir() -> str:
    from jaxlm import io  # pylint: disable=import-outside-toplevel  # io imports gcsfs: only when needed.
    return io.cache_dir()


def device_peak_flops() -> tuple[float, str]:
    """Peak FLOP/s of one device and where the figure comes from."""
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{device.device_kind} spec sheet (bf16 dense)"
    peak = measured_matmul_peak()
    return peak, f"measured {device.platform} float32 matmul peak ({peak / 1e9:.1f} GFLOP/s)"


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float) -> float:
    return loss_nats_per_token * tokens_per_byte / math.log(2)


def log_mfu_source(source: str) -> None:
    logging.info("train/mfu is model FLOPs over the peak of %s", source)


# -- classification: a confusion matrix summed over the eval set, then P/R/F1 on the host ----------
@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """counts[i, j] = examples of true class i predicted as j (int32, exact). Empty: shape (0, 0)."""

    counts: jnp.ndarray

    @classmethod
    def empty(cls) -> "ConfusionMatrix":
        return cls(counts=jnp.zeros((0, 0), jnp.int32))

    @classmethod
    def from_predictions(cls, labels, predictions, mask, num_classes: int) -> "ConfusionMatrix":
        """mask: 1 for real examples, 0 for rows that only pad the batch."""
        true = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask.astype(jnp.int32)[:, None]
        pred = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
        return cls(counts=jnp.einsum("bi,bj->ij", true, pred, preferred_element_type=jnp.int32))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if self.counts.size == 0:  # Shapes are static, so this branch is fine under jit.
            return other
        if other.counts.size == 0:
            return self
        return type(self)(counts=self.counts + other.counts)

    def compute(self):
        return self.counts


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0: a ratio with a zero denominator is 0.
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def classification_scores(confusion, label_names, positive: int) -> dict:
    """Accuracy, precision, recall, F1 (binary for two classes, else macro), weighted and per class.

    Matches scikit-learn (zero_division=0): per-class F1 is 2·tp / (2·tp + fp + fn); macro and
    weighted averages run over the labels present in the true or predicted values, as sklearn's
    default `labels=None` does.
    """
    confusion = np.asarray(confusion, np.int64)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, support + predicted)
    present = (support + predicted) > 0
    total = support.sum()
    weights = support[present] / max(support[present].sum(), 1.0)
    out = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": float(precision[present].mean()) if present.any() else 0.0,
        "recall_macro": float(recall[present].mean()) if present.any() else 0.0,
        "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
        "precision_weighted": float((precision[present] * weights).sum()),
        "recall_weighted": float((recall[present] * weights).sum()),
        "f1_weighted": float((f1[present] * weights).sum()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(label_names)},
        "confusion_matrix": confusion.tolist(),
        "labels": list(label_names),
        "num_examples": int(total),
    }
    if len(label_names) == 2:
        out.update(average="binary", positive_label=label_names[positive], precision=float(precision[positive]),
                   recall=float(recall[positive]), f1=float(f1[positive]))
    else:
        out.update(average="macro", precision=out["precision_macro"], recall=out["recall_macro"],
                   f1=out["f1_macro"])
    return out
