"""The optax chain from config: schedules, the weight-decay mask, decoupled decay per optimizer,
gradient clipping and config validation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FAST_COMPILE, tiny_bert_config, tiny_config
from jaxlm import config as config_lib
from jaxlm.errors import UserError
from jaxlm.models import Model
from jaxlm.optim import decay_mask, make_optimizer, make_schedule, validate_optim


jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def optim_cfg(**overrides):
    cfg = config_lib.base_config().optim
    cfg.update(overrides)
    return cfg


# -- schedules ----------------------------------------------------------------------------------
PEAK, WARMUP, TOTAL, END = 1e-3, 10, 100, 0.1


def values(schedule, steps):
    return np.asarray(schedule(jnp.asarray(list(steps))), np.float64)


@pytest.mark.parametrize("name,want", [
    # step:            0    5           10    28                                   55                  100         150
    ("cosine", [0.0, PEAK / 2, PEAK, PEAK * (END + (1 - END) * 0.5 * (1 + np.cos(np.pi * 18 / 90))),
                PEAK * (END + (1 - END) * 0.5), PEAK * END, PEAK * END]),
    ("linear", [0.0, PEAK / 2, PEAK, PEAK - (PEAK - PEAK * END) * 18 / 90,
                (PEAK + PEAK * END) / 2, PEAK * END, PEAK * END]),
    ("constant", [0.0, PEAK / 2, PEAK, PEAK, PEAK, PEAK, PEAK]),
])
def test_schedule_values(name, want):
    cfg = optim_cfg(schedule=name, learning_rate=PEAK, warmup_steps=WARMUP, end_lr_ratio=END)
    got = values(make_schedule(cfg, TOTAL), [0, 5, 10, 28, 55, 100, 150])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_schedule_peaks_exactly_at_the_end_of_warmup():
    cfg = optim_cfg(schedule="cosine", learning_rate=PEAK, warmup_steps=WARMUP, end_lr_ratio=END)
    got = values(make_schedule(cfg, TOTAL), range(0, TOTAL + 1))
    assert got[0] == 0.0
    assert int(np.argmax(got)) == WARMUP
    assert got[WARMUP] == np.float32(PEAK)
    assert np.all(np.diff(got[:WARMUP + 1]) > 0) and np.all(np.diff(got[WARMUP:]) <= 0)


def test_schedule_without_warmup_starts_at_the_peak():
    for name in ("cosine", "linear", "constant"):
        cfg = optim_cfg(schedule=name, learning_rate=PEAK, warmup_steps=0, end_lr_ratio=END)
        sched = make_schedule(cfg, TOTAL)
        assert float(sched(0)) == pytest.approx(PEAK, rel=1e-6), name
        assert float(sched(TOTAL)) == pytest.approx(PEAK if name == "constant" else PEAK * END, rel=1e-6)


# -- decay mask ---------------------------------------------------------------------------------
def abstract_params(cfg, head="lm"):
    model = Model(cfg, head=head, pooler=head == "classifier")
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def flat(tree):
    return {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_decay(path: str, decay_embeddings=False, decay_norms_and_biases=False) -> bool:
    """The documented rule, by parameter name: kernels decay; norms, biases, embeddings don't."""
    leaf = path.split("/")[-1]
    if leaf == "kernel":
        return True
    if leaf in ("scale", "bias"):
        return decay_norms_and_biases
    assert leaf == "embedding", path
    return decay_embeddings


TREES = {
    "gpt2-scan-untied": (tiny_config(tie_embeddings=False), "lm"),
    "gpt2-unrolled": (tiny_config(scan_layers=False), "lm"),
    "bert-mlm": (tiny_bert_config(), "mlm"),
    "bert-classifier": (tiny_bert_config(), "classifier"),
}


@pytest.fixture(scope="module", params=list(TREES))
def tree(request):
    cfg, head = TREES[request.param]
    return request.param, abstract_params(cfg, head)


def test_decay_mask_default(tree):
    name, params = tree
    mask = flat(decay_mask(params, optim_cfg()))
    want = {path: expected_decay(path) for path in flat(params)}
    assert mask == want
    if name == "gpt2-scan-untied":
        assert flat(params)["body/layers/attn_norm/scale"].shape == (2, 32)  # Rank 2 when scanned...
        assert mask["body/layers/attn_norm/scale"] is False  # ...and still no decay.
        assert mask["body/layers/attn/query/kernel"] is True
        assert mask["body/embed/token/embedding"] is False
        assert mask["body/embed/position/embedding"] is False
        assert mask["lm_head/kernel"] is True
        assert mask["body/final_norm/bias"] is False


def test_decay_embeddings_flag(tree):
    name, params = tree
    mask = flat(decay_mask(params, optim_cfg(decay_embeddings=True)))
    embeddings = [p for p in mask if p.endswith("/embedding")]
    assert len(embeddings) == (3 if name.startswith("bert") else 2)
    assert all(mask[p] for p in embeddings)
    assert mask == {p: expected_decay(p, decay_embeddings=True) for p in flat(params)}


def test_decay_norms_and_biases_flag_on_a_decoder():
    params = abstract_params(tiny_config(tie_embeddings=False))
    mask = flat(decay_mask(params, optim_cfg(decay_norms_and_biases=True)))
    assert mask == {p: expected_decay(p, decay_norms_and_biases=True) for p in flat(params)}
    assert mask["body/layers/mlp_norm/scale"] and mask["body/layers/mlp/wi/bias"]
    assert not mask["body/embed/token/embedding"]


def test_decay_norms_and_biases_flag_covers_the_embedding_norm():
    params = abstract_params(tiny_bert_config(), "mlm")
    mask = flat(decay_mask(params, optim_cfg(decay_norms_and_biases=True)))
    assert mask["body/embed/norm/scale"] is True
    assert mask == {p: expected_decay(p, decay_norms_and_biases=True) for p in flat(params)}


# -- decoupled weight decay, per optimizer --------------------------------------------------------
def small_params():
    rng = np.random.default_rng(0)
    shapes = {
        "body": {
            "embed": {"token": {"embedding": (8, 4)}, "position": {"embedding": (6, 4)}},
            "layers": {"attn": {"query": {"kernel": (2, 4, 2, 2), "bias": (2, 2, 2)}},
                       "attn_norm": {"scale": (2, 4), "bias": (2, 4)},
                       "mlp": {"wi": {"kernel": (2, 4, 8), "bias": (2, 8)}}},
            "final_norm": {"scale": (4,), "bias": (4,)},
        },
        "lm_head": {"kernel": (4, 8)},
    }
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 1.0, s) + 1.0, jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


LR, WD = 0.1, 0.5


def first_update(tx, grads, params):
    """Updates of one step from a fresh state (jitted: far faster than op-by-op on CPU)."""
    return jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


@functools.lru_cache(maxsize=None)
def stepper(**cfg_items):
    """One compiled `params -> params after one update` per optimizer config."""
    tx, _ = make_optimizer(optim_cfg(**cfg_items), 10)
    return jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))


def one_update(name, grads=None, params=None, **overrides):
    cfg = {**dict(name=name, learning_rate=LR, weight_decay=WD, schedule="constant", warmup_steps=0,
                  clip_norm=1.0), **overrides}
    params = small_params() if params is None else params
    grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
    return params, jax.device_get(stepper(**cfg)(grads, params))


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_weight_decay_touches_kernels_only(name):
    params, new = one_update(name)
    old, new = flat(params), flat(new)
    for path, value in old.items():
        if path.endswith("/kernel"):
            assert np.all(np.abs(new[path]) < np.abs(value)), path  # Shrunk towards zero.
        else:
            np.testing.assert_array_equal(new[path], value, err_msg=path)


@pytest.mark.parametrize("name", [
    "adamw",
    "adafactor",
    "lion",
    "sgd",
])
def test_weight_decay_is_scaled_by_the_learning_rate(name):
    params, new = one_update(name)
    new = flat(new)
    for path, value in flat(params).items():
        if path.endswith("/kernel"):
            np.testing.assert_allclose(new[path], value * (1 - LR * WD), rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("name", [
    "adamw",
    "adafactor",
    "lion",
    "sgd",
])
def test_no_update_at_all_while_the_warmup_learning_rate_is_zero(name):
    cfg = optim_cfg(name=name, learning_rate=LR, weight_decay=WD, schedule="cosine", warmup_steps=5)
    tx, schedule = make_optimizer(cfg, 10)
    assert float(schedule(0)) == 0.0
    params = small_params()
    grads = jax.tree.map(jnp.ones_like, params)
    for path, u in flat(first_update(tx, grads, params)).items():
        np.testing.assert_array_equal(u, 0.0, err_msg=path)


# -- clipping -----------------------------------------------------------------------------------
def test_clipping_rescales_to_the_clip_norm():
    params = small_params()
    rng = np.random.default_rng(1)
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    norm = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(g)))
    g10 = jax.tree.map(lambda x: (x * (10.0 / norm)).astype(np.float32), g)
    g1 = jax.tree.map(lambda x: x / np.float32(10.0), g10)
    np.testing.assert_allclose(float(optax.tree.norm(g10)), 10.0, rtol=1e-6)
    common = dict(weight_decay=0.0, momentum=0.0, clip_norm=1.0)
    _, clipped = one_update("sgd", grads=g10, params=params, **common)
    _, unit = one_update("sgd", grads=g1, params=params, **common)
    for path, value in flat(clipped).items():
        np.testing.assert_allclose(value, flat(unit)[path], rtol=1e-6, atol=1e-7, err_msg=path)
        want = flat(params)[path] - LR * flat(g1)[path]
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=path)
    # clip_norm=0 turns clipping off: the full gradient goes through.
    _, unclipped = one_update("sgd", grads=g10, params=params, **{**common, "clip_norm": 0.0})
    for path, value in flat(unclipped).items():
        np.testing.assert_allclose(value, flat(params)[path] - LR * flat(g10)[path], rtol=1e-6, atol=1e-6)
    # A gradient already inside the norm is left alone.
    g_half = jax.tree.map(lambda x: x / np.float32(2.0), g1)
    _, small = one_update("sgd", grads=g_half, params=params, **common)
    for path, value in flat(small).items():
        np.testing.assert_allclose(value, flat(params)[path] - LR * flat(g_half)[path], rtol=1e-6, atol=1e-7)


# -- validation ---------------------------------------------------------------------------------
def test_base_optim_config_is_valid():
    validate_optim(optim_cfg())
    for name in ("adamw", "adafactor", "lion", "sgd"):
        tx, _ = make_optimizer(optim_cfg(name=name), 100)
        assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(name="adam"), r"^optim\.name='adam': choose one of adamw, adafactor, lion, sgd$"),
    (dict(schedule="exponential"), r"^optim\.schedule='exponential': choose one of cosine, linear, constant$"),
    (dict(learning_rate=0.0), r"^optim\.learning_rate=0\.0: must be positive$"),
    (dict(learning_rate=-1e-3), r"^optim\.learning_rate=-0\.001"),
    (dict(warmup_steps=-1), r"optim\.warmup_steps"),
    (dict(clip_norm=-1.0), r"optim\.clip_norm"),
    (dict(weight_decay=-0.1), r"optim\.weight_decay"),
])
def test_validate_optim_names_the_bad_field(overrides, pattern):
    cfg = optim_cfg(**overrides)
    with pytest.raises(UserError, match=pattern):
        validate_optim(cfg)
    with pytest.raises(UserError, match=pattern):
        make_optimizer(cfg, 100)
