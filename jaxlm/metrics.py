"""Metric collections (clu), model FLOPs and MFU.

Train metrics stay on device between log intervals: each step returns a `TrainMetrics` whose
merge is plain jnp arithmetic, dispatched asynchronously; only `compute()` at a log step syncs.
"""

import functools
import math
import time

import flax
import jax
import jax.numpy as jnp
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


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (excludes embedding lookups and norms),
    counting the output projection to the vocabulary (tied or not)."""
    d, hd = cfg.d_model, cfg.dim_per_head
    attn = d * hd * (cfg.num_heads + 2 * cfg.kv_heads) + cfg.num_heads * hd * d
    mlp = d * cfg.d_ff * (3 if cfg.gated else 2)
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token: 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B).

    N counts matmul parameters; the attention term counts QK^T and AV over the full length, as
    XLA computes them (no causal skipping). Remat recomputation is not counted (model FLOPs,
    not hardware FLOPs).
    """
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    return 6 * matmul_params(cfg) + attention


# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets.
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
}


@functools.cache
def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n×n matmul on the default device: the MFU denominator on a CPU."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)  # The best run: a peak, as in ../shared/bench/peak_matmul.py.


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
