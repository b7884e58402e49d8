"""One way to open a finished (or running) run for inference.

    run = open_run("runs/x", step=None, best=False, overrides={})   # = find_run(…).open()
    run.config      # DIR/config.json (resolved at training) + --config.* overrides
    run.model       # ShardedModel on this machine's devices (no optimizer)
    run.params      # the checkpoint's params, read straight into run.model.param_shardings
    run.tokenizer, run.step

`jaxlm eval`, `generate`, `predict` and `export` all start here. Only the params are read from
the checkpoint (orbax partial restore); the optimizer state stays on disk and none is built.
"""

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
from absl import logging

from jaxlm import restore, sharding
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.peft import adapted as peft_adapted
from jaxlm.peft import inference as peft_inference
from jaxlm.sharded_model import ShardedModel


@dataclasses.dataclass
class OpenedRun:
    workdir: str
    config: ml_collections.ConfigDict
    step: int
    model: ShardedModel
    params: Any
    tokenizer: Any


@dataclasses.dataclass
class RunCheckpoint:
    """A run's config and chosen checkpoint, found and checked; nothing heavy is read yet."""

    workdir: str
    config: ml_collections.ConfigDict
    source: restore.CheckpointSource
    mesh: jax.sharding.Mesh

    def open(self, require: str = "") -> OpenedRun:
        """Builds the model on the mesh, loads the tokenizer and restores the params.

        require: 'generate' or 'predict' refuses a run whose task can't do that, before the
        params are read.
        """
        model = ShardedModel(self.config, self.mesh)
        if require == "generate" and not model.task.can_generate:
            raise UserError(f"--workdir={self.workdir} holds a {self.config.task} run; generate needs a "
                            "causal_lm run")
        if require == "predict" and not model.task.can_predict:
            raise UserError(f"--workdir={self.workdir} holds a {self.config.task} run; predict needs a "
                            "classification run (use generate for a causal LM)")
        tokenizer = tokenizer_lib.load_tokenizer(self.config.data.tokenizer, self.workdir)
        logging.info("%s: step %d, %s parameters on mesh %s", self.workdir, self.source.step,
                     f"{model.num_params:,}", dict(model.mesh.shape))
        if peft_adapted.enabled(self.config):  # adapters + trained head, merged onto init_from's base
            params = peft_inference.merged_params(self.config, model, self.source)
        else:
            params = restore.restore_params(self.source, model.abstract_params, model.param_shardings)
        return OpenedRun(self.workdir, self.config, self.source.step, model, params, tokenizer)


def find_run(workdir: str, *, step: Optional[int] = None, best: bool = False,
             overrides: Optional[dict[str, str]] = None, all_devices: bool = False) -> RunCheckpoint:
    """DIR/config.json with the overrides, and the checkpoint at `step` (default: the latest;
    `best`: DIR/best). The mesh is one device unless `all_devices` (every device of every
    process, data parallel: eval) or `--config.mesh.*` overrides ask for more."""
    overrides = dict(overrides or {})
    config = restore.load_run_config(workdir, overrides)
    source = restore.find_checkpoint(workdir, step, best)
    mesh = sharding.make_mesh(config.mesh) if all_devices else restore.inference_mesh(config, overrides)
    return RunCheckpoint(workdir, config, source, mesh)


def open_run(workdir: str, *, step: Optional[int] = None, best: bool = False,
             overrides: Optional[dict[str, str]] = None, require: str = "") -> OpenedRun:
    """find_run(...).open(require): the whole opening path in one call."""
    return find_run(workdir, step=step, best=best, overrides=overrides).open(require)
