"""The chunked cross-entropy (loss_chunk_size): the plain loss, its gradients and eval metrics,
without full-vocabulary logits (compiled temporaries are lower)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import config_checks, sharding
from jaxlm.errors import UserError
from jaxlm.models import Model
from jaxlm.tasks import get_task
from jaxlm.tasks.chunked_loss import chunk_layout
from jaxlm.trainer import Trainer
from conftest import tiny_bert_config, tiny_config, tiny_llama_config

VOCAB, ROWS, LENGTH = 97, 3, 13  # 39 tokens: none of the chunk sizes below divides it.


def setup(task_name, cfg, seed=0):
    task, model = get_task(task_name), Model(cfg, head="lm" if task_name == "causal_lm" else "mlm")
    rng = np.random.default_rng(seed)
    batch = {"inputs": jnp.asarray(rng.integers(0, VOCAB, (ROWS, LENGTH)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, VOCAB, (ROWS, LENGTH)), jnp.int32),
             # Weights as the data makes them: 0 on padding (the tail of row 0), else 1; MLM: selected.
             "weights": jnp.asarray(rng.random((ROWS, LENGTH)) > 0.3, jnp.float32).at[0, 9:].set(0.0)}
    if task_name == "masked_lm":
        batch["padding_mask"] = jnp.ones((ROWS, LENGTH), jnp.bool_).at[0, 9:].set(False)
    params = nn.unbox(model.init(jax.random.key(seed), **task.model_inputs(batch))["params"])
    # Half the targets are the model's own argmax, so eval accuracy is neither 0 nor 1.
    logits = model.apply({"params": params}, **task.model_inputs(batch))
    batch["targets"] = jnp.where(jnp.arange(LENGTH) % 2 == 0, jnp.argmax(logits, -1), batch["targets"])
    return task, model, params, batch


def mean_loss(task, model, batch, chunk):
    def f(params):
        loss_sum, weight = task.model_loss(model, {"params": params}, batch, loss_chunk_size=chunk)
        return loss_sum / weight
    return jax.jit(jax.value_and_grad(f))


CASES = {
    "causal_tied": ("causal_lm", tiny_config(vocab_size=VOCAB, max_len=LENGTH)),
    "causal_untied": ("causal_lm", tiny_llama_config(vocab_size=VOCAB, max_len=LENGTH)),
    "masked_lm": ("masked_lm", tiny_bert_config(vocab_size=VOCAB, max_len=LENGTH)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_and_gradients_equal_the_plain_ones(case):
    task, model, params, batch = setup(*CASES[case])
    plain_loss, plain_grads = mean_loss(task, model, batch, 0)(params)
    assert 3.0 < float(plain_loss) < 6.0  # ~log(97) at init: a real loss, not a zero.
    # 1: one position per row; 7: a chunk count that does not divide the sequence. One chunk is the
    # same loop run once (its layout: test_chunk_layout_covers_the_sequence_in_whole_column_blocks).
    for chunk in (1, 7):
        loss, grads = mean_loss(task, model, batch, chunk)(params)
        assert abs(float(loss) - float(plain_loss)) < 1e-5, chunk
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, plain_grads)
        assert max(jax.tree.leaves(diffs)) < 1e-5, (chunk, diffs)
        # The head's weights get their gradient too (tied: the embedding; untied: lm_head/kernel).
        head = grads["lm_head"]["kernel"] if "lm_head" in grads else grads["body"]["embed"]["token"]["embedding"]
        assert float(jnp.max(jnp.abs(head))) > 1e-4


@pytest.mark.parametrize("case", ["causal_tied", "masked_lm"])
def test_chunked_eval_metrics_equal_the_plain_ones(case):
    task, model, params, batch = setup(*CASES[case])
    plain = task.model_eval_metrics(model, {"params": params}, batch, 0).compute()
    chunked = jax.jit(lambda p: task.model_eval_metrics(model, {"params": p}, batch, 7))(params).compute()
    assert 0.2 < float(plain["accuracy"]) < 0.8, plain
    assert float(chunked["accuracy"]) == pytest.approx(float(plain["accuracy"]), abs=1e-6)
    assert float(chunked["loss"]) == pytest.approx(float(plain["loss"]), abs=1e-5)


def test_chunk_layout_covers_the_sequence_in_whole_column_blocks():
    assert chunk_layout(4, 1024, 8192) == (1024, 1)  # 4096 tokens: one chunk.
    assert chunk_layout(32, 1024, 8192) == (256, 4)  # 32,768 tokens in 4 chunks of 8,192.
    assert chunk_layout(3, 13, 5) == (2, 7)  # 7 chunks of 2 positions x 3 rows (padded to 14).
    assert chunk_layout(3, 13, 1) == (1, 13)  # Fewer tokens than rows: one position per chunk.


def test_negative_chunk_size_is_a_user_error():
    config = config_lib.load_config("configs/tiny_shakespeare.py")
    config.loss_chunk_size = -1
    with pytest.raises(UserError, match="loss_chunk_size=-1"):
        config_checks.validate(config)
    assert "loss_chunk_size" in config_lib.describe_fields()


def compiled_train_memory(chunk: int):
    """Temp and total bytes of the real compiled train step (Trainer) of a small GPT-2 with a big
    vocabulary, on one CPU device."""
    config = config_lib.base_config()
    config.global_batch_size, config.seq_len, config.loss_chunk_size = 8, 128, chunk
    config.model.update(vocab_size=8192, num_layers=2, d_model=64, num_heads=4, d_ff=128, max_len=128)
    config.mesh.data = 1
    trainer = Trainer(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
    spec = trainer.task.batch_spec(config)
    stats = trainer.compile_train(spec).memory_analysis()
    return stats.temp_size_in_bytes


def test_chunking_lowers_the_compiled_temporaries():
    plain, chunked = compiled_train_memory(0), compiled_train_memory(128)
    # 1,024 tokens x 8,192 float32 logits = 32 MiB per copy; chunks of 128 tokens hold 4 MiB.
    logits = 8 * 128 * 8192 * 4
    assert plain > 2 * logits, plain
    assert chunked < plain - logits, (plain, chunked)
