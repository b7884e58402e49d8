"""Mesh construction, logical-axis rules, and that params / optimizer state / batches are really
laid out on the 8 fake CPU devices the way the rules say."""

import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import config as config_lib
from jaxlm import config_checks
from jaxlm import sharding
from jaxlm.errors import UserError
from jaxlm.trainer import Trainer


def mesh_cfg(data, fsdp, tensor, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1, **extra))


# -- mesh_shape ---------------------------------------------------------------------------------
@pytest.mark.parametrize("axes,devices,want", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 2, -1), 8, (1, 2, 4)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_resolves_minus_one(axes, devices, want):
    got = sharding.mesh_shape(mesh_cfg(*axes), devices)
    assert got == dict(zip(("data", "fsdp", "tensor"), want))


@pytest.mark.parametrize("axes", [(3, 1, 1), (2, 2, 1), (4, 4, 1), (1, 1, 16)])
def test_mesh_shape_rejects_axes_that_do_not_multiply_to_the_devices(axes):
    with pytest.raises(UserError) as err:
        sharding.mesh_shape(mesh_cfg(*axes), 8)
    msg = str(err.value)
    assert msg.startswith("mesh")
    for axis, size in zip(("data", "fsdp", "tensor"), axes):
        assert f"{axis}={size}" in msg
    assert "8 devices" in msg


def test_mesh_shape_rejects_fixed_axes_that_do_not_divide_the_devices():
    with pytest.raises(UserError, match=r"multiply to 3, .* change mesh\.data/fsdp/tensor"):
        sharding.mesh_shape(mesh_cfg(-1, 3, 1), 8)


def test_mesh_shape_rejects_two_free_axes():
    with pytest.raises(UserError, match=r"only one of mesh\.data/fsdp/tensor may be -1, got data, tensor"):
        sharding.mesh_shape(mesh_cfg(-1, 1, -1), 8)


@pytest.mark.parametrize("axes", [(0, 1, 8), (-2, 1, 1)])
def test_mesh_shape_rejects_non_positive_sizes(axes):
    with pytest.raises(UserError, match=rf"mesh\.data={axes[0]}: must be a positive size or -1"):
        sharding.mesh_shape(mesh_cfg(*axes), 8)


# -- make_mesh ----------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_make_mesh_on_eight_devices(eight_devices, axes):
    mesh = sharding.make_mesh(mesh_cfg(*axes))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == axes
    assert mesh.devices.shape == axes
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in eight_devices)  # Each once.


def test_make_mesh_on_one_device(eight_devices):
    one = eight_devices[:1]
    mesh = sharding.make_mesh(mesh_cfg(-1, 1, 1), devices=one)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert list(mesh.devices.flat) == one
    with pytest.raises(UserError):
        sharding.make_mesh(mesh_cfg(2, 1, 1), devices=one)


# -- spec_for -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh_124(eight_devices):
    return sharding.make_mesh(mesh_cfg(1, 2, 4))


@pytest.fixture(scope="module")
def mesh_222(eight_devices):
    return sharding.make_mesh(mesh_cfg(2, 2, 2))


def test_spec_for_maps_logical_names(mesh_124):
    assert sharding.spec_for(("embed", "heads", "head_dim"), (32, 8, 16), mesh_124) == P("fsdp", "tensor", None)
    assert sharding.spec_for(("embed", "mlp"), (32, 64), mesh_124) == P("fsdp", "tensor")
    assert sharding.spec_for(("vocab", "embed"), (64, 32), mesh_124) == P("tensor", "fsdp")
    assert sharding.spec_for(("layers", "norm"), (2, 32), mesh_124) == P(None, None)
    assert sharding.spec_for((None, "unknown"), (4, 4), mesh_124) == P(None, None)


def test_spec_for_drops_an_axis_that_does_not_divide(mesh_124):
    # 2 KV heads over tensor=4: the kv_heads dimension stays replicated, embed still shards.
    assert sharding.spec_for(("embed", "kv_heads", "head_dim"), (32, 2, 16), mesh_124) == P("fsdp", None, None)
    assert sharding.spec_for(("embed", "vocab"), (31, 66), mesh_124) == P(None, None)


def test_spec_for_skips_size_one_axes(eight_devices):
    mesh = sharding.make_mesh(mesh_cfg(8, 1, 1))
    assert sharding.spec_for(("vocab", "embed"), (64, 32), mesh) == P(None, None)
    assert sharding.spec_for(("batch", None), (16, 4), mesh) == P("data", None)


def test_spec_for_keeps_the_dividing_prefix_of_multi_axis_rules(mesh_222):
    assert sharding.spec_for(("batch", None), (8, 3), mesh_222) == P(("data", "fsdp"), None)
    assert sharding.spec_for(("batch", None), (2, 3), mesh_222) == P("data", None)
    assert sharding.spec_for(("batch", None), (3, 3), mesh_222) == P(None, None)


@pytest.mark.parametrize("names,shape", [
    (("embed", "embed"), (32, 32)),
    (("batch", "embed"), (8, 32)),
    (("heads", "mlp", "vocab"), (4, 4, 4)),
    (("batch", "batch"), (8, 8)),
])
def test_spec_for_never_uses_a_mesh_axis_twice(mesh_222, names, shape):
    spec = sharding.spec_for(names, shape, mesh_222)
    used = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    assert len(used) == len(set(used)), spec
    assert spec[0] is not None  # The first dimension still gets its axes.
    assert all(entry is None for entry in spec[1:]), spec  # Later ones find them taken.


# -- a Trainer's real arrays --------------------------------------------------------------------
# Independent statement of the parameter rules (jaxlm/sharding.py's docstring): embed over fsdp;
# vocab, heads, kv_heads, mlp over tensor; everything else replicated.
PARAM_AXIS = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


def expected_spec(names, shape, mesh_shape) -> tuple:
    used, out = set(), []
    for name, dim in zip(names, shape):
        axis = PARAM_AXIS.get(name)
        if axis is None or axis in used or mesh_shape[axis] == 1 or dim % mesh_shape[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return tuple(out)


def padded(spec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def tiny_train_config(data, fsdp, tensor):
    c = config_lib.base_config()
    c.model.update(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, max_len=16)
    c.seq_len, c.global_batch_size, c.steps = 16, 8, 10
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    config_checks.validate(c)
    return c


@pytest.fixture(scope="module", params=[(1, 8, 1), (2, 2, 2)], ids=["fsdp8", "data2-fsdp2-tensor2"])
def trained(request, eight_devices):
    config = tiny_train_config(*request.param)
    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    boxed = jax.eval_shape(trainer.init_params, jax.random.key(0))
    # The rbg PRNG compiles several times faster than threefry on CPU; the layout under test comes
    # from init_state's out_shardings, not from the random bits.
    with jax.default_prng_impl("rbg"):
        state = trainer.init_state(0)
    return trainer, state, boxed


def _flat(tree, is_leaf=None):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def test_every_param_is_sharded_as_its_logical_names_say(trained):
    trainer, state, boxed = trained
    mesh_shape = dict(trainer.mesh.shape)
    arrays = _flat(state.params)
    boxes = _flat(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert arrays.keys() == boxes.keys()
    assert len(arrays) >= 20
    sharded = 0
    for path, arr in arrays.items():
        box = boxes[path]
        assert isinstance(box, nn.Partitioned), path
        assert len(box.names) == arr.ndim, (path, box.names)
        want = expected_spec(box.names, arr.shape, mesh_shape)
        assert padded(arr.sharding.spec, arr.ndim) == want, (path, box.names, arr.sharding.spec)
        assert padded(sharding.spec_for(box.names, arr.shape, trainer.mesh, trainer.rules), arr.ndim) == want
        assert arr.sharding.mesh.shape == trainer.mesh.shape
        shard_shape = tuple(d // (mesh_shape[a] if a else 1) for d, a in zip(arr.shape, want))
        shards = arr.addressable_shards
        assert len(shards) == 8
        assert all(s.data.shape == shard_shape for s in shards), (path, shard_shape)
        sharded += shard_shape != arr.shape
        host = np.asarray(arr)
        for s in shards:  # Every device holds exactly its slice of the value.
            np.testing.assert_array_equal(np.asarray(s.data), host[s.index])
    assert sharded >= 10


def test_known_params_have_the_expected_layout(trained):
    trainer, state, _ = trained
    p = state.params
    emb = p["body"]["embed"]["token"]["embedding"]
    query = p["body"]["layers"]["attn"]["query"]["kernel"]
    key = p["body"]["layers"]["attn"]["key"]["kernel"]
    wo = p["body"]["layers"]["mlp"]["wo"]["kernel"]
    scale = p["body"]["layers"]["attn_norm"]["scale"]
    assert (emb.shape, query.shape, key.shape, wo.shape, scale.shape) == (
        (64, 32), (2, 32, 4, 8), (2, 32, 2, 8), (2, 64, 32), (2, 32))
    if trainer.mesh.shape["fsdp"] == 8:
        assert emb.sharding.spec == P(None, "fsdp")
        assert emb.addressable_shards[0].data.shape == (64, 4)
        assert query.addressable_shards[0].data.shape == (2, 4, 4, 8)
        assert wo.addressable_shards[0].data.shape == (2, 64, 4)
    else:  # data=2, fsdp=2, tensor=2
        assert emb.sharding.spec == P("tensor", "fsdp")
        assert emb.addressable_shards[0].data.shape == (32, 16)
        assert query.addressable_shards[0].data.shape == (2, 16, 2, 8)
        assert key.addressable_shards[0].data.shape == (2, 16, 1, 8)
        assert wo.addressable_shards[0].data.shape == (2, 32, 16)
    assert scale.addressable_shards[0].data.shape == (2, 32)  # Norm scales stay replicated.


def test_adam_moments_are_sharded_like_their_params(trained):
    trainer, state, _ = trained
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    params = jax.tree.leaves(state.params)
    for moments in (adam[0].mu, adam[0].nu):
        assert jax.tree.structure(moments) == jax.tree.structure(state.params)
        for m, p in zip(jax.tree.leaves(moments), params):
            assert m.sharding == p.sharding
            assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape
    assert adam[0].count.sharding.spec == P()
    # The declared state shardings say the same thing as the arrays.
    declared = jax.tree.leaves(trainer.state_shardings.opt_state)
    actual = [x.sharding for x in jax.tree.leaves(state.opt_state)]
    assert declared == actual


# -- batches ------------------------------------------------------------------------------------
def test_batch_sharding_splits_rows_over_data_and_fsdp(mesh_222):
    s = sharding.batch_sharding(mesh_222)
    assert s.spec == P(("data", "fsdp"), None)
    assert sharding.batch_sharding(mesh_222, 1).spec == P(("data", "fsdp"))
    assert sharding.data_parallel_size(mesh_222) == 4
    x = jax.device_put(np.arange(8 * 5).reshape(8, 5), s)
    rows = {}
    for shard in x.addressable_shards:
        assert shard.data.shape == (2, 5)
        rows.setdefault(shard.index[0].start, []).append(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), np.arange(8 * 5).reshape(8, 5)[shard.index])
    assert sorted(rows) == [0, 2, 4, 6]
    assert all(len(devs) == 2 for devs in rows.values())  # Replicated over tensor only.


@pytest.mark.parametrize("axes", [(2, 2, 2), (8, 1, 1), (1, 8, 1)])
def test_to_global_equals_the_host_batch(eight_devices, axes):
    mesh = sharding.make_mesh(mesh_cfg(*axes))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 64, (8, 6)).astype(np.int32),
             "weights": rng.random((8, 6)).astype(np.float32),
             "labels": np.arange(8, dtype=np.int32)}
    out = sharding.to_global(batch, mesh)
    assert out.keys() == batch.keys()
    dp = sharding.data_parallel_size(mesh)
    for k, v in batch.items():
        assert isinstance(out[k], jax.Array) and out[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert out[k].sharding.spec == P(("data", "fsdp"), *([None] * (v.ndim - 1)))
        assert {s.data.shape[0] for s in out[k].addressable_shards} == {8 // dp}


def test_logical_rules_drop_activation_axes_that_do_not_divide(mesh_124):
    rules = dict(sharding.logical_rules(mesh_124, num_heads=4, num_kv_heads=2, d_ff=64, vocab=66))
    assert rules["activation_heads"] == "tensor"
    assert rules["activation_kv_heads"] is None  # 2 KV heads over tensor=4.
    assert rules["activation_mlp"] == "tensor"
    assert rules["activation_vocab"] is None
    assert rules["embed"] == "fsdp" and rules["kv_heads"] == "tensor"  # Param rules untouched.
    assert math.prod(mesh_124.shape.values()) == 8
