"""A cross-entropy that never holds full-vocabulary logits for the whole batch (loss_chunk_size).

The plain loss projects every token onto the vocabulary at once: [batch, seq, vocab] logits in
the compute dtype plus their float32 copy, and the backward keeps as much again (for GPT-2 small,
128 x 1024 x 50,304 float32 logits are 26 GB). Here the model returns its final features and the
head's weights (`Model.loss_inputs`), and a `lax.scan` projects one chunk of tokens at a time
(`heads.project_vocab`), takes its cross-entropy and adds it up. The chunk body is under
`jax.checkpoint`, so the backward recomputes each chunk's logits instead of saving them: forward
and backward hold one chunk of logits at a time. MaxText's vocabulary tiling and levanter's
blockwise cross-entropy do the same.

Chunks are column blocks of the batch: every chunk takes `L` consecutive positions of every row,
so a batch sharded over data/fsdp stays sharded and each device works on its own rows in every
chunk. loss_chunk_size is the tokens per chunk over the (micro-)batch: L = about
loss_chunk_size / batch rows, at least 1. The sequence is padded with zero-weight positions up to
a whole number of chunks, so any chunk size works.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.models.config import ModelConfig
from jaxlm.models.heads import project_vocab

Array = jax.Array
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")
FEATURES_AXES = ("activation_batch", "activation_length", "activation_embed")
# The head's weights inside the loop: the vocabulary stays split over `tensor`, the embed dim
# (fsdp) is gathered once before the loop; else every chunk gathers them again (measured with
# `jaxlm aot` of llama_1b on v5p:2x2x2: the 0.5 GB bf16 embedding gathered 64 times a step).
HEAD_AXES = {"embedding": ("vocab", None), "kernel": (None, "vocab"), "bias": ("vocab",)}


def chunk_layout(rows: int, length: int, chunk_size: int) -> tuple[int, int]:
    """(positions per chunk, number of chunks) for `chunk_size` tokens per chunk of a
    [rows, length] batch: the fewest chunks with at most ~chunk_size tokens each."""
    chunks = min(max(math.ceil(rows * length / chunk_size), 1), length)
    per_chunk = math.ceil(length / chunks)
    return per_chunk, math.ceil(length / per_chunk)


def chunked_cross_entropy(features: Array, head: dict, targets: Array, weights: Array, cfg: ModelConfig,
                          chunk_size: int, with_accuracy: bool = False) -> tuple[Array, ...]:
    """(sum of weighted cross-entropies, sum of weights[, weighted count of argmax == target]),
    equal to the plain loss (`token_prediction.token_cross_entropy`) on the full logits.

    features: [B, T, d] (the head's input); head: the head's `projection()` weights, float32 (cast
    to the compute dtype inside each chunk, so their gradient adds up in float32); targets,
    weights: [B, T]. Call under the model's logical-axis rules (its sharding constraints).
    """
    rows, length = targets.shape
    per_chunk, chunks = chunk_layout(rows, length, chunk_size)
    pad = per_chunk * chunks - length
    weights = weights.astype(jnp.float32)
    if pad:  # Zero-weight positions: they add nothing to any sum (nor to the gradients).
        features = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    head = {k: nn.with_logical_constraint(v, HEAD_AXES[k]) for k, v in head.items()}

    def split(x):  # [B, n*L, ...] -> [n, B, L, ...]: the scan walks the leading axis.
        return jnp.moveaxis(x.reshape(rows, chunks, per_chunk, *x.shape[2:]), 1, 0)

    def chunk(carry, xs):
        h, t, w = xs
        h = nn.with_logical_constraint(h, FEATURES_AXES)
        logits = nn.with_logical_constraint(project_vocab(h, head, cfg), LOGITS_AXES)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), t)
        sums = [jnp.sum(losses * w), jnp.sum(w)]
        if with_accuracy:
            sums.append(jnp.sum((jnp.argmax(logits, -1) == t).astype(jnp.float32) * w))
        return tuple(c + s for c, s in zip(carry, sums)), None

    # Saves only the chunk's inputs: the backward recomputes its logits, one chunk at a time.
    chunk = jax.checkpoint(chunk, prevent_cse=False)
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(3 if with_accuracy else 2))
    sums, _ = jax.lax.scan(chunk, zeros, (split(features), split(targets), split(weights)))
    return sums
