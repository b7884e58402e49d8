"""A run directory's pieces, read back: its config, its checkpoints, its params.

    config = load_run_config(workdir, overrides)          # DIR/config.json + --config.* overrides
    source = find_checkpoint(workdir, step=None, best=False)
    params = restore_params(source, abstract_params, param_shardings)

Commands do not call these one by one: `jaxlm.run.open_run` puts them together.

Only the params are read (an orbax partial restore: the optimizer state, twice the params' size
for Adam, stays on disk), and each array is read straight into its target sharding on this
machine's devices, whatever mesh wrote it.
"""

import dataclasses
import gc
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import config as config_lib
from jaxlm import bucket_probe, io, sharding
from jaxlm.best_checkpoint import BEST_DIRNAME, BEST_JSON
from jaxlm.checkpoint import abstract_with_shardings, checkpoint_dir
from jaxlm.config_checks import saved_run_config
from jaxlm.errors import UserError

# Bytes of arrays read per orbax call (a larger array is read alone). Measured on a 124M-param
# checkpoint, 1 CPU device: peak host memory grows by 1.5x the params (one array in flight and
# tensorstore's caches) against 1.9x in one call, at ~1.5x the time.
GROUP_BYTES = 64 << 20


def _path(workdir: str, *parts: str) -> epath.Path:
    return io.path(workdir).joinpath(*parts)


def load_run_config(workdir: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """DIR/config.json (the resolved config the run trained with), then `--config.*` overrides.

    The mesh is reset to this machine's default (every device data-parallel): a checkpoint is
    restored onto whatever devices are here, not the mesh that wrote it. `--config.mesh.*`
    overrides still apply. A bucket workdir is probed first (one line, not 30 s of retries).
    """
    bucket_probe.check_reachable(workdir)
    saved = saved_run_config(workdir)
    if not saved:
        raise UserError(f"{_path(workdir, 'config.json')} not found: --workdir must be a jaxlm run directory "
                        "(one `jaxlm train` wrote)")
    config = config_lib.base_config()
    config_lib.merge_saved(config, saved)
    config.mesh = config_lib.base_config().mesh
    config_lib.apply_overrides(config, overrides)
    return config


def inference_mesh(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> jax.sharding.Mesh:
    """One device, unless --config.mesh.* overrides ask for a mesh over this machine's devices."""
    if any(k.startswith("mesh.") for k in overrides):
        return sharding.make_mesh(config.mesh)
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    step: int
    path: epath.Path  # the orbax item directory
    kind: str  # "state": a TrainState (params are its 'params'); "params": a bare params tree


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint, by orbax's own rule: locally a finished save is renamed
    to its step number; on a bucket (no rename) its step directory holds commit_success.txt."""
    directory = io.path(checkpoint_dir(workdir))
    return sorted(int(name) for name in io.list_dir(directory)
                  if name.isdigit() and io.exists(directory / name / "state")
                  and ocp.step.is_checkpoint_finalized(directory / name))


def find_checkpoint(workdir: str, step: Optional[int] = None, best: bool = False) -> CheckpointSource:
    """The checkpoint to read: `step`, the best one (DIR/best), or the latest."""
    if best:
        if step is not None:
            raise UserError("--step and --best name different checkpoints: give one of them")
        record_path = _path(workdir, BEST_JSON)
        if not io.exists(record_path):
            raise UserError(f"{record_path} not found: the run kept no best checkpoint (set best_metric "
                            "when training), so use --step=N or the latest")
        record = io.read_json(record_path)
        path = _path(workdir, BEST_DIRNAME, str(record["step"]), "params")
        if not io.exists(path):
            raise UserError(f"{path} is missing although {record_path} names step {record['step']}; "
                            "use --step=N instead")
        return CheckpointSource(int(record["step"]), path, "params")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise UserError(f"{checkpoint_dir(workdir)}: no checkpoint; train the run first (jaxlm train "
                        f"--workdir={workdir}) or point --workdir at a run that saved one")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--step={step}: no such checkpoint in {checkpoint_dir(workdir)}; "
                        f"it has step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}")
    return CheckpointSource(step, io.path(checkpoint_dir(workdir)) / str(step) / "state", "state")


def restore_params(source: CheckpointSource, abstract_params: Any, shardings: Any) -> Any:
    """The checkpoint's params as jax.Arrays laid out by `shardings` (nothing else is read).

    abstract_params: ShapeDtypeStructs (or arrays) of the params tree the model expects.
    Read a few arrays at a time: orbax's read buffers outlive their arrays until the next garbage
    collection, so reading everything at once briefly holds close to two copies of the params.
    """
    target = abstract_with_shardings(abstract_params, shardings)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    handler = ocp.PyTreeCheckpointHandler()
    restored = []
    with ocp.Checkpointer(handler) as checkpointer:
        for group in _groups(flat, GROUP_BYTES):
            item = _nest(group)
            if source.kind == "state":
                item = {"params": item}
            args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                          partial_restore=True)
            try:
                out = checkpointer.restore(source.path, args=args)
            except (ValueError, KeyError) as e:  # a tree or shape that does not fit this model
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"{source.path}: its params do not fit the model in config.json ({first[:300]}); "
                                "check --config.model.* overrides") from None
            out = out["params"] if source.kind == "state" else out
            restored += [_get(out, path) for path, _ in group]
            del out
            gc.collect()
    return jax.tree_util.tree_unflatten(treedef, restored)


def _groups(flat: list, limit: int) -> list[list]:
    groups, current, size = [], [], 0
    for path, leaf in flat:
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if current and size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append((path, leaf))
        size += nbytes
    return groups + ([current] if current else [])


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _nest(group: list) -> dict:
    tree: dict = {}
    for path, leaf in group:
        *parents, last = _keys(path)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def _get(tree: Any, path) -> Any:
    for key in _keys(path):
        tree = tree[key]
    return tree
