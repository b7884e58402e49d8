"""Tasks: what a training run optimises. A task owns its inputs, head, loss and metrics;
the train loop, sharding, checkpoints and logging are shared by all of them."""

from jaxlm.errors import UserError
from jaxlm.tasks.causal_lm import CausalLMTask
from jaxlm.tasks.classification import ClassificationTask
from jaxlm.tasks.masked_lm import MaskedLMTask

_TASKS = {"causal_lm": CausalLMTask, "masked_lm": MaskedLMTask, "classification": ClassificationTask}


def get_task(name: str):
    if name not in _TASKS:
        raise UserError(f"task={name!r} is not available; choose one of {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()
