"""Device mesh, logical-axis rules, and the NamedShardings of state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded, ZeRO-3 style) and `tensor` (Megatron-style tensor parallel). Parameters and
activations are annotated with logical axis names in the model; RULES maps each logical name to
mesh axes. A mapping that would split a dimension unevenly (e.g. 2 KV heads over tensor=4) is
dropped for that array, which then stays replicated along that mesh axis.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes. Parameters shard their `embed` dimension over fsdp and their
# heads / mlp / vocab dimensions over tensor; activations shard batch over data+fsdp.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the per-slice axis sizes (one -1 fills the rest) and checks they fit."""
    slices = mesh_config.get("dcn_data", 1) * mesh_config.get("dcn_fsdp", 1)
    if slices < 1 or num_devices % slices:
        raise UserError(f"mesh.dcn_data * mesh.dcn_fsdp = {slices} does not divide the {num_devices} devices")
    per_slice = num_devices // slices
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise UserError(f"mesh: only one of mesh.data/fsdp/tensor may be -1, got {', '.join(free)}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise UserError(f"mesh.{axis}={size}: must be a positive size or -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if per_slice % fixed:
            raise UserError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                            f"{per_slice} devices per slice; change mesh.data/fsdp/tensor")
        sizes[free[0]] = per_slice // fixed
    if math.prod(sizes.values()) != per_slice:
        raise UserError(
            f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
            f"{math.prod(sizes.values())} but there are {per_slice} devices"
            f"{' per slice' if slices > 1 else ''}; make the axes multiply to {per_slice} (or set one to -1)")
    return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Optional[Sequence[Any]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = (mesh_config.get("dcn_data", 1), mesh_config.get("dcn_fsdp", 1), 1)
    if math.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices=devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (AssertionError, ValueError, NotImplementedError):
            # Topology-aware placement refuses some shapes; a plain reshape is always valid.
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _mesh_axes_for(name: Optional[str], rules) -> tuple[str, ...]:
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for one array: logical names -> mesh axes, keeping only even splits."""
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes):
            # Keep the largest prefix of the axes that still splits the dimension evenly.
            while axes and dim % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_rules(mesh: Mesh, num_heads: int, num_kv_heads: int, d_ff: int, vocab: int):
    """RULES with activation mappings dropped where this model's sizes don't divide the mesh."""
    tensor = mesh.shape["tensor"]
    sizes = {"activation_heads": num_heads, "activation_kv_heads": num_kv_heads,
             "activation_mlp": d_ff, "activation_vocab": vocab}
    return tuple((name, None if name in sizes and sizes[name] % tensor else axes)
                 for name, axes in RULES)


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for an abstract param tree whose leaves carry logical-axis boxes."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            value = leaf.value
            names = leaf.names if len(leaf.names) == value.ndim else (None,) * value.ndim
            return NamedSharding(mesh, spec_for(names, value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def like_params_shardings(tree: Any, params_abstract: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror params by path suffix.

    Adam's moments mirror the params exactly; factored or scalar statistics (adafactor,
    counts) match no param of their shape and are replicated.
    """
    by_path = {}
    for (path, abstract), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params_abstract)[0], jax.tree.leaves(params_shardings)):
        by_path[jax.tree_util.keystr(path)] = (abstract.shape, sharding)

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, (shape, sharding) in by_path.items():
            if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape):
                return sharding
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy rows -> global jax.Arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}
