"""Tasks: what a training run optimises. A task owns its inputs, head, loss and metrics;
the train loop, sharding, checkpoints and logging are shared by all of them.

The registry names each task's class by module path so that importing it (config validation
does) costs nothing: a task's module, and jax with it, loads when the task is asked for.
"""

import importlib

from jaxlm.errors import UserError

_REGISTRY = {
    "causal_lm": "jaxlm.tasks.causal_lm:CausalLMTask",
    "masked_lm": "jaxlm.tasks.masked_lm:MaskedLMTask",
    "classification": "jaxlm.tasks.classification:ClassificationTask",
}


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_task(name: str):
    """The Task (jaxlm.tasks.base.Task) registered under `name`."""
    if name not in _REGISTRY:
        raise UserError(f"task={name!r} is not available; choose one of {', '.join(_REGISTRY)}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
