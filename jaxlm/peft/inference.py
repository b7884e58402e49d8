"""A LoRA run's params for eval, predict, generate and export: the base from init_from plus the
checkpoint's trainable tree (adapters + params trained in full), merged into plain model params.

    params = merged_params(config, model, source)   # run.RunCheckpoint.open() for a peft run

Only the trainable tree is read from the checkpoint; the base is read from the run's init_from,
which must still be there and still describe the same model.
"""

from typing import Any

import jax
import ml_collections

from jaxlm import pretrained, restore
from jaxlm.compat import mesh_context
from jaxlm.config_checks import SHAPE_FIELDS
from jaxlm.errors import UserError
from jaxlm.peft import adapted as adapted_lib


def merged_params(config: ml_collections.ConfigDict, model: Any, source: restore.CheckpointSource) -> Any:
    """model: the run's ShardedModel. Returns params laid out by model.param_shardings."""
    adapted = adapted_lib.build(config, model.boxed_params, model.mesh, model.rules)
    trained = restore.restore_params(source, adapted.abstract, adapted.shardings)
    frozen = adapted_lib.place_frozen(adapted, model.init_params, config.seed, base_params(config, model),
                                      model.param_shardings, model.mesh)
    with mesh_context(model.mesh):
        return jax.jit(adapted.merge, out_shardings=model.param_shardings)(frozen, trained)


def base_params(config: ml_collections.ConfigDict, model: Any) -> dict:
    """init_from's params that fit the run's model, as numpy; a UserError when init_from is gone
    or has other shapes than the base the adapters were trained on."""
    probe = ml_collections.ConfigDict(config.to_dict())
    source = pretrained.resolve_init_from(probe)
    if source is None:
        raise UserError(f"the run has peft.method={config.peft.method} but no init_from: its config.json does not "
                        "name the base model its adapters belong to")
    for field in SHAPE_FIELDS:
        if probe.model.get(field) != config.model.get(field):
            raise UserError(f"init_from={config.init_from} has model.{field}={probe.model.get(field)!r} but the run's "
                            f"adapters were trained on a base with {config.model.get(field)!r}: point "
                            f"--config.init_from at the run's base model")
    return source.load(model.abstract_params)
