"""model.attention_impl: which implementation `auto` picks per platform, the errors off-platform,
and the Pallas splash kernel (run in Pallas' interpreter on this CPU) against XLA attention:
causal, GQA, MQA, padding, packed documents (segment ids), sequences that are not a multiple of
128, per device under shard_map, and the whole model's logits and gradients."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import tiny_bert_config, tiny_llama_config
from jaxlm.errors import UserError
from jaxlm.models import Model
from jaxlm.models import attention
from jaxlm.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(attention.splash_module() is None, reason="this jax has no splash kernel")


# -- the choice --------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform, dtype, head_dim, want", [
    ("cpu", jnp.float32, 64, "xla"), ("cpu", jnp.bfloat16, 64, "xla"),
    ("tpu", jnp.float32, 64, "splash"), ("tpu", jnp.bfloat16, 128, "splash"),
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"),  # cuDNN's flash attention is half precision only
    ("gpu", jnp.bfloat16, 256, "xla"), ("gpu", jnp.bfloat16, 60, "xla"),
])
def test_auto_picks_per_platform(platform, dtype, head_dim, want):
    assert attention.choose_impl("auto", platform, dtype, head_dim) == want


def test_explicit_choices_and_their_platforms(monkeypatch):
    monkeypatch.delenv("JAXLM_SPLASH_INTERPRET", raising=False)
    assert attention.choose_impl("xla", "tpu", jnp.bfloat16, 64) == "xla"
    assert attention.choose_impl("splash", "tpu", jnp.float32, 64) == "splash"
    assert attention.choose_impl("cudnn", "gpu", jnp.bfloat16, 64) == "cudnn"
    with pytest.raises(UserError, match=r"model.attention_impl=splash runs only on TPU \(this is cpu\)"):
        attention.choose_impl("splash", "cpu", jnp.float32, 64)
    with pytest.raises(UserError, match=r"model.attention_impl=cudnn runs only on GPU \(this is cpu\)"):
        attention.choose_impl("cudnn", "cpu", jnp.bfloat16, 64)
    monkeypatch.setenv("JAXLM_SPLASH_INTERPRET", "1")
    assert attention.choose_impl("splash", "cpu", jnp.float32, 64) == "splash"


def test_splash_on_cpu_is_a_user_error_at_apply_but_init_works(monkeypatch):
    monkeypatch.delenv("JAXLM_SPLASH_INTERPRET", raising=False)
    cfg = tiny_llama_config(attention_impl="splash")
    assert not cfg.problems()
    model = Model(cfg)
    tokens = jnp.ones((1, 16), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]  # init needs shapes only: xla
    with pytest.raises(UserError, match="model.attention_impl=splash"):
        model.apply({"params": params}, tokens)
    assert any("splash" in p for p in ModelConfig(attention_impl="flash").problems())


def test_platform_is_the_current_mesh_devices():
    assert attention.current_platform() == "cpu"
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    with jax.set_mesh(mesh):
        seen = []
        jax.jit(lambda x: seen.append(attention.current_platform()) or x).trace(jnp.zeros(2))
    assert seen == ["cpu"]


def test_auto_on_a_tpu_mesh_compiles_the_splash_kernel():
    """The model traced for a v5p:2x2x2 mesh (libtpu compiles on this CPU) with auto: the compiled
    forward holds splash's Mosaic kernel, and xla's none."""
    script = textwrap.dedent("""
        import json, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxlm.models import Model, ModelConfig
        from jaxlm.sharding import RULES
        from jaxlm.tpu_topology import topology_devices
        mesh = Mesh(np.array(topology_devices("v5p:2x2x2")).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
        out = {}
        for impl in ("auto", "xla"):
            cfg = ModelConfig(vocab_size=256, num_layers=1, d_model=256, num_heads=4, num_kv_heads=2,
                              head_dim=64, d_ff=512, max_len=256, positions="rope", attention_impl=impl)
            model = Model(cfg)
            params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 256), jnp.int32)))
            tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
            segs = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
            def f(p, t, s):
                with nn.logical_axis_rules(RULES):
                    return model.apply(p, t, segment_ids=s)
            with jax.set_mesh(mesh):
                text = jax.jit(f).lower(params, tokens, segs).compile().as_text()
            out[impl] = [text.count('custom_call_target="tpu_custom_call"'), "splash_mha_fwd_segmented" in text]
        print(json.dumps(out))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.pop("JAXLM_SPLASH_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json  # noqa: E402
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["auto"][0] >= 1 and got["auto"][1], got
    assert got["xla"] == [0, False], got


# -- the kernel's numerics ------------------------------------------------------------------------------
def qkv(batch, length, heads, kv_heads, dim=64, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(batch, length, n, dim)), jnp.float32) for n in (heads, kv_heads, kv_heads)]


def xla_attention(q, k, v, padding, segments, causal):
    mask = attention.attention_mask(padding, q.shape[1], causal, segments)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal and mask is None,
                                        implementation="xla")


def splash(q, k, v, padding, segments, causal):
    mask = attention.segment_mask(padding, segments)
    return attention.splash_attention(q, k, v, None if mask is None else mask.ids, causal=causal,
                                      interpret=True)


def packed(batch, length, cuts):
    """Segment ids [B, T]: row b's documents start at each of cuts[b]."""
    ids = np.zeros((batch, length), np.int32)
    for b, row in enumerate(cuts):
        for c in row:
            ids[b, c:] += 1
    return jnp.asarray(ids)


def padded(batch, length, lengths):
    return jnp.asarray(np.arange(length)[None, :] < np.asarray(lengths)[:, None])


CASES = {
    # name: (batch, length, heads, kv_heads, causal, padding lengths or None, segment cuts or None)
    "causal_mha": (2, 384, 4, 4, True, None, None),
    "causal_gqa": (2, 384, 4, 2, True, None, None),
    "causal_mqa": (1, 256, 4, 1, True, None, None),
    "encoder_padding": (2, 256, 4, 4, False, [256, 150], None),
    "causal_right_padding": (2, 256, 4, 2, True, [200, 97], None),
    "packed_documents_gqa": (2, 384, 4, 2, True, None, [[100, 250], [5]]),
    "packed_and_padded": (2, 256, 4, 2, True, [256, 180], [[60], [90, 120]]),
    "length_not_a_multiple_of_128": (2, 200, 4, 2, True, None, [[70], []]),
}


def case_inputs(name):
    batch, length, heads, kv_heads, causal, lengths, cuts = CASES[name]
    q, k, v = qkv(batch, length, heads, kv_heads)
    padding = None if lengths is None else padded(batch, length, lengths)
    segments = None if cuts is None else packed(batch, length, cuts)
    # Only real query rows are compared: a padding token's output is never used.
    real = np.ones((batch, length), bool) if padding is None else np.asarray(padding)
    return (q, k, v), padding, segments, causal, real


@pytest.mark.parametrize("name", CASES)
def test_splash_forward_and_gradients_equal_xla(name):
    (q, k, v), padding, segments, causal, real = case_inputs(name)
    want = xla_attention(q, k, v, padding, segments, causal)
    got = jax.jit(splash, static_argnums=5)(q, k, v, padding, segments, causal)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)

    weight = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32) * real[:, :, None, None]

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, padding, segments, causal) * weight)

    grads_want = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    grads_got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(grads_got, grads_want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0)
    assert max(float(jnp.abs(w).max()) for w in grads_want) > 0.1  # the gradients are not all ~0


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_splash_per_device_under_shard_map(kv_heads):
    """On a data=2 x fsdp=2 x tensor=2 mesh: batch and heads split as the activations are; one KV
    head (MQA) cannot split over tensor=2 and is repeated to the query heads instead."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("activation_batch", ("data", "fsdp")), ("activation_heads", "tensor"),
             ("activation_kv_heads", "tensor"))
    q, k, v = qkv(4, 256, 4, kv_heads, seed=2)
    segments = packed(4, 256, [[30], [128], [], [7, 200]])
    want = xla_attention(q, k, v, None, segments, True)

    def f(q, k, v, s):
        with nn.logical_axis_rules(rules):
            return attention.splash_attention(q, k, v, s, causal=True, interpret=True)

    with jax.set_mesh(mesh):
        jitted = jax.jit(f)
        got = jitted(q, k, v, segments)
        assert "shard_map" in str(jitted.trace(q, k, v, segments).jaxpr)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_block_sizes():
    assert [attention.splash_block(n) for n in (128, 256, 384, 512, 1024, 8192, 640)] == \
        [128, 256, 128, 512, 512, 512, 128]


# -- the whole model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama_packed", "bert_padded"])
def test_model_with_splash_equals_xla(kind, monkeypatch):
    """The model's logits and parameter gradients with splash (interpreted) equal XLA's."""
    monkeypatch.setenv("JAXLM_SPLASH_INTERPRET", "1")
    batch, length = 2, 16
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 64, (batch, length)), jnp.int32)
    if kind == "llama_packed":
        base, inputs = tiny_llama_config(), {"segment_ids": packed(batch, length, [[6], [3, 11]])}
        real = np.ones((batch, length), bool)
    else:
        base, inputs = tiny_bert_config(), {"padding_mask": padded(batch, length, [16, 9])}
        real = np.asarray(inputs["padding_mask"])
    models = {impl: Model(ModelConfig(**{**base.to_dict(), "attention_impl": impl})) for impl in ("xla", "splash")}
    params = models["xla"].init(jax.random.key(0), tokens)["params"]
    weight = jnp.asarray(real, jnp.float32)[:, :, None]

    def loss(impl):
        return lambda p: jnp.sum(jnp.tanh(models[impl].apply({"params": p}, tokens, **inputs)) * weight)

    logits = {impl: np.asarray(jax.jit(lambda p, m=m: m.apply({"params": p}, tokens, **inputs))(params))
              for impl, m in models.items()}
    np.testing.assert_allclose(logits["splash"][real], logits["xla"][real], atol=1e-5, rtol=0)
    grads = {impl: jax.jit(jax.grad(loss(impl)))(params) for impl in models}
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads["splash"]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
