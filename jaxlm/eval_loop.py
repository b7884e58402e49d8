"""One evaluation: the eval step over every batch of the eval split, merged exactly.

Used by the train loop and by `jaxlm eval`, so both report the same numbers.
"""

import jax

from jaxlm import sharding
from jaxlm.errors import UserError
from jaxlm.sharded_model import ShardedModel


def evaluate(model: ShardedModel, params, data, max_batches: int = 0) -> tuple[dict, dict]:
    """(scalars for the writers, the task's full report) over the eval split (or its first
    max_batches batches)."""
    totals = None
    for i, batch in enumerate(data.eval_batches()):
        if max_batches and i >= max_batches:
            break
        update = model.eval_batch(params, sharding.to_global(batch, model.mesh))
        totals = update if totals is None else totals.merge(update)
    if totals is None:
        raise UserError("the eval split yielded no batches: check data.eval_file / data.eval_split")
    computed = jax.device_get(totals.compute())
    return model.task.eval_summary(computed, data), model.task.eval_report(computed, data)
