"""Dropout on the attention probabilities (model.attention_dropout, attention.dropout_attention).

The explicit path equals a float64 numpy reference built from the same keep mask (GQA, padding
and causal masks, 1e-5), and with nothing dropped it equals the XLA path of eval. Training with
attention dropout bypasses the fused kernels (cuDNN, splash), eval keeps them. On the tiny BERT the
train model depends on the dropout rng, remat recomputes the same masks (loss and gradients equal
the stored-activation model's), and eval equals the model without attention dropout bitwise. Imports and exports carry each family's field: BERT's attention_probs_dropout_prob,
GPT-2's attn_pdrop, Llama's attention_dropout (its only dropout). The fine-tuning defaults:
tests/test_lora.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_COMPILE, replace, tiny_bert_config, tiny_config
from jaxlm.convert import families
from jaxlm.errors import UserError
from jaxlm.models import attention
from jaxlm.models.model import Model

B, T, HEADS, KV, D = 2, 6, 4, 2, 8


def numpy_attention(q, k, v, valid, causal, keep, rate):
    """float64 reference: q [B, T, H, D], k, v [B, T, KV, D]; keep [B, KV, H/KV, T, T] (bool)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    qg = q.reshape(B, T, KV, group, D)
    logits = np.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(D)
    allowed = np.broadcast_to(valid[:, None, None, None, :], logits.shape)
    if causal:
        allowed = allowed & np.tril(np.ones((T, T), bool))
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs = np.where(keep, probs / (1 - rate), 0.0)
    return np.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, HEADS, D)


@pytest.mark.parametrize("causal", [False, True])
def test_dropped_probabilities_as_numpy_computes_them(causal):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, HEADS, D)).astype(np.float32)
    k, v = (rng.normal(size=(B, T, KV, D)).astype(np.float32) for _ in range(2))
    valid = np.ones((B, T), bool)
    valid[1, 4:] = False  # the second row has two padding keys
    mask = attention.attention_mask(jnp.asarray(valid), T, causal)
    rate, key = 0.3, jax.random.key(7)
    out = jax.jit(attention.dropout_attention, static_argnums=(4, 5))(q, k, v, mask, causal, rate, key)
    keep = np.asarray(jax.random.bernoulli(key, 1 - rate, (B, KV, HEADS // KV, T, T)))
    assert 0.5 < keep.mean() < 0.9
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, valid, causal, keep, rate), atol=1e-5)
    # Nothing dropped (rate 0): the XLA path eval takes, which masks the same keys.
    cfg = tiny_config(num_heads=HEADS, num_kv_heads=KV, d_model=HEADS * D, causal=causal, attention_impl="xla")
    none_dropped = attention.dropout_attention(q, k, v, mask, causal, 0.0, key)
    np.testing.assert_allclose(np.asarray(none_dropped), np.asarray(attention.attend(cfg, q, k, v, mask)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(none_dropped), numpy_attention(q, k, v, valid, causal, np.ones_like(keep), 0),
                               atol=1e-5)


def test_training_with_attention_dropout_bypasses_the_fused_kernels():
    cfg = tiny_config(attention_impl="cudnn", attention_dropout=0.1)  # cudnn: GPU only; this is a CPU
    assert attention.resolve(cfg, deterministic=False) == "xla"
    with pytest.raises(UserError, match="model.attention_impl=cudnn runs only on GPU"):
        attention.resolve(cfg, deterministic=True)  # eval keeps the configured kernel
    assert attention.drops_probabilities(cfg, deterministic=False)
    assert not attention.drops_probabilities(replace(cfg, attention_dropout=0.0), deterministic=False)
    assert "model.attention_dropout=1.0: must be in [0, 1)" in replace(cfg, attention_dropout=1.0).problems()


@pytest.fixture(scope="module")
def bert():
    cfg = tiny_bert_config(dropout=0.0, attention_dropout=0.3)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    padding = jnp.asarray(np.arange(8)[None, :] < np.array([[8], [5]]))
    params = nn.unbox(Model(cfg, head="classifier").init(jax.random.key(0), tokens, padding_mask=padding)["params"])
    return cfg, params, tokens, padding


def apply(cfg, params, tokens, padding, deterministic, seed=0):
    model = Model(cfg, head="classifier", deterministic=deterministic)
    fn = jax.jit(lambda p, r: model.apply({"params": p}, tokens, padding_mask=padding, rngs={"dropout": r}),
                 compiler_options=FAST_COMPILE)
    return np.asarray(fn(params, jax.random.key(seed)))


def test_train_model_drops_attention_and_eval_does_not(bert):
    cfg, params, tokens, padding = bert
    first, again, other = (apply(cfg, params, tokens, padding, False, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    # Logits of ~0.1 (the classifier's init scale); float32 noise would be ~1e-8.
    assert np.abs(first - other).max() > 1e-5  # another rng, other probabilities dropped
    plain = apply(replace(cfg, attention_dropout=0.0), params, tokens, padding, False)
    assert np.abs(first - plain).max() > 1e-5
    np.testing.assert_array_equal(apply(cfg, params, tokens, padding, True),
                                  apply(replace(cfg, attention_dropout=0.0), params, tokens, padding, True))


def test_remat_recomputes_the_same_masks(bert):
    """Under remat the backward pass recomputes attention: it must drop the probabilities the
    forward dropped, so loss and gradients equal the stored-activation model's."""
    cfg, params, tokens, padding = bert

    def grads(c):
        model = Model(c, head="classifier", deterministic=False)

        def loss(p):
            logits = model.apply({"params": p}, tokens, padding_mask=padding, rngs={"dropout": jax.random.key(3)})
            return jax.nn.logsumexp(logits, -1).mean() - logits[:, 0].mean()
        return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params)

    (plain_loss, plain), (remat_loss, remat) = grads(cfg), grads(replace(cfg, remat_policy="full"))
    np.testing.assert_allclose(float(remat_loss), float(plain_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale + 1e-12)
    query = np.asarray(plain["body"]["layers"]["attn"]["query"]["kernel"])
    assert np.abs(query).max() > 1e-6  # a gradient reached the attention (the head's init is small)


def test_each_family_imports_and_exports_its_attention_dropout():
    bert = families.bert_config_from_hf(dict(vocab_size=100, num_hidden_layers=2, hidden_size=32,
                                             num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.1,
                                             attention_probs_dropout_prob=0.2), "bert")
    assert (bert.dropout, bert.attention_dropout) == (0.1, 0.2)
    out = families.bert_config_to_hf(bert)
    assert (out["hidden_dropout_prob"], out["attention_probs_dropout_prob"]) == (0.1, 0.2)
    gpt2 = families.gpt2_config_from_hf(dict(vocab_size=100, n_layer=2, n_embd=32, n_head=2, resid_pdrop=0.1,
                                             embd_pdrop=0.1, attn_pdrop=0.25), "gpt2")
    assert (gpt2.dropout, gpt2.attention_dropout) == (0.1, 0.25)
    out = families.gpt2_config_to_hf(gpt2)
    assert (out["resid_pdrop"], out["attn_pdrop"]) == (0.1, 0.25)
    llama = families.llama_config_from_hf(dict(vocab_size=100, num_hidden_layers=2, hidden_size=32,
                                               num_attention_heads=2, intermediate_size=64, attention_dropout=0.15),
                                          "llama", "llama")
    assert (llama.dropout, llama.attention_dropout) == (0.0, 0.15)  # Llama has no residual dropout
    assert families.llama_config_to_hf(llama)["attention_dropout"] == 0.15
