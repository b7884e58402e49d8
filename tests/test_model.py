"""The Transformer and its heads: shapes, masking, GQA/MQA, scan, remat, RoPE, KV-cache decode,
tied embeddings, dtypes and config checks. Tiny models; every forward is jitted once per config."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_COMPILE, replace, tiny_bert_config, tiny_config, tiny_llama_config
from jaxlm.models import Model, ModelConfig, Transformer

B, T = 2, 10
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def tokens_for(seed: int, shape=(B, T), vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def abstract_variables(model: nn.Module, batch: int = 1, seq_len: int = T):
    """The shapes `model.init` would give, without compiling the (slow on CPU) initialisers."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, seq_len), jnp.int32))


def init_params(model: nn.Module, seed: int = 0):
    """Random params of exactly init's tree, shapes and dtypes, drawn with numpy (no compile).

    Larger than the real init (std 0.1, norm scales near 1, non-zero biases) so that every
    parameter visibly matters in the comparisons below.
    """
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(abstract_variables(model)["params"])

    def draw(path, a):
        leaf = getattr(path[-1], "key", None)
        x = rng.normal(0.0, 0.1, a.shape) + (1.0 if leaf == "scale" else 0.0)
        return np.asarray(x, a.dtype)  # numpy: no op-by-op compiles while building the tree

    return jax.tree_util.tree_map_with_path(draw, abstract)


def shapes(model: nn.Module):
    return jax.tree.map(lambda a: a.shape, nn.unbox(abstract_variables(model)["params"]))


@functools.lru_cache(maxsize=None)
def forward(model: nn.Module):
    """One jitted apply per (hashable) model; params and inputs are traced arguments."""
    return jit(lambda params, tokens, **kw: model.apply({"params": params}, tokens, **kw))


def logits_of(model, params, tokens, **kw):
    return np.asarray(forward(model)(params, tokens, **kw))


# -- heads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("head,cfg,shape", [
    ("lm", tiny_config(), (B, T, 64)),
    ("lm", tiny_llama_config(), (B, T, 64)),
    ("mlm", tiny_bert_config(), (B, T, 64)),
    ("classifier", tiny_bert_config(), (B, 3)),
], ids=["lm-gpt2", "lm-llama", "mlm", "classifier"])
def test_head_output_shapes(head, cfg, shape):
    model = Model(cfg, head=head, num_labels=3, pooler=head == "classifier")
    params = init_params(model)
    out = logits_of(model, params, tokens_for(0))
    assert out.shape == shape
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))


def test_unknown_head_is_rejected():
    with pytest.raises(ValueError, match="unknown head"):
        init_params(Model(tiny_config(), head="seq2seq"))


# -- masking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [tiny_config(), tiny_llama_config()], ids=["gpt2", "llama"])
def test_causal_logits_ignore_future_tokens(cfg):
    model = Model(cfg)
    params = init_params(model)
    x = tokens_for(1)
    t = 4
    y = x.copy()
    y[:, t + 1:] = (x[:, t + 1:] + 7) % cfg.vocab_size
    a, b = logits_of(model, params, x), logits_of(model, params, y)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
    assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-4  # The later positions did see them.


def test_bidirectional_encoder_sees_future_tokens():
    model = Model(tiny_bert_config(), head="mlm")
    params = init_params(model)
    x = tokens_for(2)
    y = x.copy()
    y[:, -1] = (x[:, -1] + 1) % 64
    a, b = logits_of(model, params, x), logits_of(model, params, y)
    assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-4  # Position 0 saw the change at position T-1.


def test_encoder_padding_mask_hides_pad_tokens():
    model = Model(tiny_bert_config(), head="mlm")
    params = init_params(model)
    x = tokens_for(3)
    mask = np.arange(T)[None, :] < np.array([[T - 3], [T - 5]])  # Row lengths 7 and 5.
    y = np.where(mask, x, (x + 11) % 64)  # Different ids on the pads only.
    a = logits_of(model, params, x, padding_mask=mask)
    b = logits_of(model, params, y, padding_mask=mask)
    m = np.asarray(mask)
    np.testing.assert_allclose(a[m], b[m], atol=1e-6, rtol=0)
    # Without the mask the pads are attended to, so the same change does reach the real tokens.
    c, d = logits_of(model, params, x), logits_of(model, params, y)
    assert np.abs(c[m] - d[m]).max() > 1e-4


# -- GQA / MQA ----------------------------------------------------------------------------------
def _expand_kv(params, groups: int, tile: bool = False):
    """MHA params from grouped ones: each KV head's key/value weights repeated `groups` times."""

    def fix(path, x):
        names = [getattr(k, "key", None) for k in path]
        if ("key" in names or "value" in names) and "attn" in names:
            # kernel [..., embed, kv_heads, head_dim], bias [..., kv_heads, head_dim]: axis -2.
            return np.tile(x, (1,) * (x.ndim - 2) + (groups, 1)) if tile else np.repeat(x, groups, axis=-2)
        return x

    return jax.tree_util.tree_map_with_path(fix, params)


@pytest.mark.parametrize("kv_heads,use_bias", [(2, False), (1, True)], ids=["gqa", "mqa-bias"])
def test_grouped_kv_heads_equal_mha_with_repeated_kv(kv_heads, use_bias):
    cfg = tiny_llama_config(num_kv_heads=kv_heads, use_bias=use_bias)
    grouped = Model(cfg)
    params = init_params(grouped)
    kernel = params["body"]["layers"]["attn"]["key"]["kernel"]
    assert kernel.shape == (2, 32, kv_heads, 8)  # [layers, embed, kv_heads, head_dim]
    assert params["body"]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)

    mha = Model(replace(cfg, num_kv_heads=0))
    mha_params = _expand_kv(params, 4 // kv_heads)
    assert jax.tree.map(np.shape, mha_params) == shapes(mha)
    x = tokens_for(4)
    want = logits_of(grouped, params, x)
    np.testing.assert_allclose(logits_of(mha, mha_params, x), want, atol=1e-5, rtol=0)
    if kv_heads == 2:  # Query head h reads KV head h // groups; tiling (h % kv_heads) is wrong.
        assert np.abs(logits_of(mha, _expand_kv(params, 2, tile=True), x) - want).max() > 1e-4


# -- scan, remat --------------------------------------------------------------------------------
def _stack_layers(params, num_layers: int):
    body = dict(params["body"])
    layers = [body.pop(f"layers_{i}") for i in range(num_layers)]
    body["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return {**params, "body": body}


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_llama_config()], ids=["gpt2", "llama"])
def test_scan_layers_equals_unrolled_layers(cfg):
    unrolled = Model(replace(cfg, scan_layers=False))
    scanned = Model(replace(cfg, scan_layers=True))
    params = init_params(unrolled)
    assert "layers" not in params["body"] and "layers_1" in params["body"]
    stacked = _stack_layers(params, cfg.num_layers)
    assert jax.tree.map(np.shape, stacked) == shapes(scanned)
    x = tokens_for(5)
    np.testing.assert_allclose(logits_of(scanned, stacked, x), logits_of(unrolled, params, x),
                               atol=1e-5, rtol=0)


def _loss_and_grads(model, params, x):
    def loss(p):
        logits = model.apply({"params": p}, x[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))
    return jit(jax.value_and_grad(loss))(params)


def test_full_remat_gives_same_loss_and_grads():
    cfg = tiny_llama_config(scan_layers=True)
    plain, remat = Model(replace(cfg, remat_policy="none")), Model(replace(cfg, remat_policy="full"))
    params = init_params(plain)
    x = tokens_for(6)
    loss_a, grads_a = _loss_and_grads(plain, params, x)
    loss_b, grads_b = _loss_and_grads(remat, params, x)
    np.testing.assert_allclose(loss_b, loss_a, atol=1e-6, rtol=0)
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(gb, ga, atol=1e-6, rtol=1e-5)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 1e-3  # Not all zero.


# -- RoPE ---------------------------------------------------------------------------------------
def test_rope_depends_only_on_relative_positions():
    model = Model(tiny_llama_config())
    params = init_params(model)
    x = tokens_for(7)
    base = np.broadcast_to(np.arange(T), (B, T))
    a = logits_of(model, params, x, positions=base)
    np.testing.assert_allclose(a, logits_of(model, params, x), atol=1e-6, rtol=0)  # The default.
    for shift in (3, 100):
        np.testing.assert_allclose(logits_of(model, params, x, positions=base + shift), a, atol=1e-4, rtol=0)
    # Relative distances do matter: spreading the positions apart changes the logits.
    assert np.abs(logits_of(model, params, x, positions=base * 2) - a).max() > 1e-4


# -- KV-cache decoding --------------------------------------------------------------------------
MAX_LEN = 16


def decode_run(cfg, params, tokens, prefill: int, padding_mask=None, positions=None):
    """Prefill `prefill` tokens, then feed the rest one at a time. Returns [B, T, V] logits."""
    batch, length = tokens.shape
    model = Model(cfg, decode=True)
    # The init call (here its shapes) sizes the cache from a [batch, max_len] input; it starts empty.
    sized = abstract_variables(model, batch, cfg.max_len)["cache"]
    cache = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), sized)
    key = sized["body"]["layers" if cfg.scan_layers else "layers_0"]["attn"]["cached_key"]
    assert key.shape[-3:] == (cfg.kv_heads, cfg.max_len, cfg.dim_per_head)  # head-major
    if positions is None:
        positions = np.broadcast_to(np.arange(length), tokens.shape)
    if padding_mask is None:
        padding_mask = np.ones(tokens.shape, np.bool_)

    @jit
    def step(cache, tok, pos, mask):
        logits, mutated = model.apply({"params": params, "cache": cache}, tok, positions=pos,
                                      padding_mask=mask, mutable=["cache"])
        return logits, mutated["cache"]

    out, start = [], 0
    for stop in [prefill, *range(prefill + 1, length + 1)]:
        logits, cache = step(cache, tokens[:, start:stop], positions[:, start:stop], padding_mask[:, start:stop])
        out.append(logits)
        start = stop
    return np.concatenate([np.asarray(o) for o in out], axis=1)


@pytest.mark.parametrize("base,scan", [(tiny_llama_config, True), (tiny_llama_config, False), (tiny_config, True)],
                         ids=["llama-scan", "llama-unrolled", "gpt2-scan"])
def test_kv_cache_decode_equals_full_forward(base, scan):
    cfg = base(scan_layers=scan, max_len=MAX_LEN)
    params = init_params(Model(cfg))
    x = tokens_for(8)
    full = logits_of(Model(cfg), params, x)
    stepped = decode_run(cfg, params, x, prefill=5)
    assert stepped.shape == full.shape
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)


def test_left_padded_decode_matches_unpadded_prompt():
    cfg = tiny_llama_config(max_len=MAX_LEN)
    params = init_params(Model(cfg))
    pads, prompt_len, new = 3, 4, 3
    seq = tokens_for(9, (1, prompt_len + new))  # Row 0: a 4-token prompt and 3 decoded tokens.
    other = tokens_for(10, (1, pads + prompt_len + new))  # Row 1: a 7-token prompt, unpadded.
    row0 = np.concatenate([np.full((1, pads), 5, np.int32), seq], axis=1)
    tokens = np.concatenate([row0, other], axis=0)
    mask = np.ones(tokens.shape, np.bool_)
    mask[0, :pads] = False
    positions = np.cumsum(mask, axis=1) - 1
    assert positions[0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6]

    batched = decode_run(cfg, params, tokens, prefill=pads + prompt_len, padding_mask=mask,
                         positions=positions)
    alone = decode_run(cfg, params, seq, prefill=prompt_len)
    np.testing.assert_allclose(batched[0, pads:], alone[0], atol=1e-5, rtol=0)
    # Row 1 is unaffected by row 0's padding: it equals its own full forward pass.
    np.testing.assert_allclose(batched[1], logits_of(Model(cfg), params, tokens)[1], atol=1e-5, rtol=0)


# -- embeddings, dtypes -------------------------------------------------------------------------
def logits_and_hidden(cfg, params, x):
    """The LM logits and the body's final hidden states h, from one compiled call."""
    fn = jit(lambda p, t: (Model(cfg).apply({"params": p}, t), Transformer(cfg).apply({"params": p["body"]}, t)))
    return tuple(np.asarray(a) for a in fn(params, x))


def test_tied_embeddings_share_the_token_embedding():
    cfg = tiny_config(tie_embeddings=True)
    params = init_params(Model(cfg))
    assert "lm_head" not in params
    logits, h = logits_and_hidden(cfg, params, tokens_for(11))
    emb = params["body"]["embed"]["token"]["embedding"]
    assert emb.shape == (64, 32)
    np.testing.assert_allclose(logits, h @ emb.T, atol=1e-6, rtol=0)


def test_untied_embeddings_have_their_own_kernel():
    cfg = tiny_config(tie_embeddings=False)
    params = init_params(Model(cfg))
    assert set(params["lm_head"]) == {"kernel"}
    kernel = params["lm_head"]["kernel"]
    assert kernel.shape == (32, 64)
    logits, h = logits_and_hidden(cfg, params, tokens_for(12))
    np.testing.assert_allclose(logits, h @ kernel, atol=1e-6, rtol=0)
    assert np.abs(logits - h @ params["body"]["embed"]["token"]["embedding"].T).max() > 1e-2


def test_bfloat16_compute_keeps_float32_params():
    cfg16 = tiny_llama_config(dtype="bfloat16")
    model16 = Model(cfg16)
    dtypes = {x.dtype for x in jax.tree.leaves(nn.unbox(abstract_variables(model16)["params"]))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    params = init_params(model16)
    x = tokens_for(13)
    out16 = logits_of(model16, params, x)
    assert out16.dtype == jnp.bfloat16
    out32 = logits_of(Model(replace(cfg16, dtype="float32")), params, x)
    scale = np.abs(out32).max()
    assert np.abs(out16.astype(np.float32) - out32).max() < 0.05 * scale


# -- config checks ------------------------------------------------------------------------------
def test_tiny_configs_have_no_problems():
    for cfg in (tiny_config(), tiny_llama_config(), tiny_bert_config(), tiny_llama_config(num_kv_heads=1)):
        assert cfg.problems() == []


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads=3"),
    (dict(positions="rope", d_model=12, num_heads=4), "model.head_dim=3"),
    (dict(positions="rope", head_dim=5), "model.head_dim=5"),
    (dict(activation="swish"), "model.activation='swish'"),
    (dict(norm="batchnorm"), "model.norm='batchnorm'"),
    (dict(d_model=30, num_heads=4), "model.d_model=30"),
    (dict(dropout=1.0), "model.dropout=1.0"),
    (dict(num_layers=0), "model.num_layers=0"),
], ids=["kv-heads", "rope-odd-derived", "rope-odd-explicit", "activation", "norm", "d-model", "dropout",
        "layers"])
def test_problems_name_the_bad_field(changes, field):
    problems = tiny_config(**changes).problems()
    assert len(problems) == 1, problems
    assert problems[0].startswith(field), problems


def test_problems_lists_every_mistake():
    problems = ModelConfig(num_heads=4, num_kv_heads=3, activation="swish", positions="rope",
                           d_model=12).problems()
    assert sorted(p.split("=")[0] for p in problems) == ["model.activation", "model.head_dim",
                                                         "model.num_kv_heads"]
