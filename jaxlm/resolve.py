"""The config resolved once: everything the data and `init_from` decide, fixed before the model
is built. The resolved config is what DIR/config.json records and what a resume is checked
against (once).

    run = resolve_run(config, workdir, mesh)
    run.config   # model.vocab_size, data.label_names/num_labels, classification.pooling and
                 # (with init_from) the source's model shapes and tokenizer are all final
    run.data     # the task's data: tokenizer, train iterator, eval batches
    run.init_source   # where fresh params come from (None: random init)
"""

import dataclasses
from typing import Any, Optional

import jax
import ml_collections

from jaxlm import config_checks, pretrained, sharding
from jaxlm.errors import UserError
from jaxlm.peft import finetuning
from jaxlm.tasks import get_task


@dataclasses.dataclass
class ResolvedRun:
    config: ml_collections.ConfigDict
    data: Any
    init_source: Optional[pretrained.PretrainedSource]


def check_batch_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    micro = config.global_batch_size // config.grad_accum_steps
    if micro % dp:
        raise UserError(
            f"global_batch_size={config.global_batch_size} (micro-batch {micro} with grad_accum_steps="
            f"{config.grad_accum_steps}) is not divisible by the data-parallel size mesh.data x mesh.fsdp = {dp}")
    if config.global_batch_size % jax.process_count():
        raise UserError(f"global_batch_size={config.global_batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")


def resolve_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> ResolvedRun:
    """Resolves `config` in place, in the order the facts become known; nothing is written into
    `workdir` except a tokenizer a fresh run trains (it is the run's own)."""
    saved = config_checks.saved_run_config(workdir)  # Read once: {} for a fresh workdir.
    # The source's model and tokenizer; the peft checks and fine-tuning defaults (jaxlm/peft/finetuning.py).
    init_source = finetuning.resolve_init_from(config, saved)
    config_checks.validate(config)
    check_batch_layout(config, mesh)
    config_checks.keep_saved_loader(workdir, saved, config)
    config_checks.keep_saved_labels(workdir, saved, config)
    task = get_task(config.task)
    data = task.build_data(config, workdir, jax.process_index(), jax.process_count())
    task.resolve(config, data)  # Vocab size, classes, pooling.
    config_checks.check_resumable(workdir, saved, config)
    return ResolvedRun(config, data, init_source)
