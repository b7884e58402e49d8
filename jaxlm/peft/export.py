"""`jaxlm export --adapters_only`: a LoRA or AdaLoRA run's adapters (and the params it trained in
full) as a Hugging Face PEFT directory, for `peft.PeftModel.from_pretrained(base, DIR)` on the
transformers model of init_from (AutoModelForSequenceClassification for a classifier). An AdaLoRA
run's directory is peft's AdaLoraConfig with its rank_pattern and only the kept triplets.

    result = export_adapters("runs/x", "adapters/x", overrides={}, step=None, best=False)

Only the trainable tree is read from the checkpoint; the base model is not. Plain `jaxlm export`
writes the merged model instead (W + ΔW), loadable without peft. Either directory may
be on a bucket (gs://): the files are written locally first, the weights uploaded last.
"""

import os
import shutil
import tempfile
from typing import Optional

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import io, restore
from jaxlm.convert import match_family
from jaxlm.errors import UserError
from jaxlm.export import ExportResult, check_out_dir
from jaxlm.peft import adapted as adapted_lib
from jaxlm.peft import hf_format
from jaxlm.run import find_run
from jaxlm.sharded_model import ShardedModel


def export_adapters(workdir: str, out_dir: str, overrides: dict[str, str], step: Optional[int] = None,
                    best: bool = False) -> ExportResult:
    found = find_run(workdir, step=step, best=best, overrides=overrides)
    config = found.config
    if not adapted_lib.enabled(config):
        raise UserError(f"--adapters_only: the run in {workdir} trained no adapters (peft.method=none); "
                        "export the whole model without --adapters_only")
    family = match_family(config_lib.model_config(config))
    check_out_dir(out_dir)
    model = ShardedModel(config, found.mesh)
    adapted = adapted_lib.build(config, model.boxed_params, model.mesh, model.rules)
    trained = jax.tree.map(np.asarray, jax.device_get(
        restore.restore_params(found.source, adapted.abstract, adapted.shardings)))
    task_type = hf_format.TASK_TYPES.get(model.task.head)
    local = out_dir if not io.is_remote(out_dir) else tempfile.mkdtemp(
        prefix="peft-", dir=_scratch_parent())
    try:
        files = hf_format.write_adapters(local, model.model_config, family, adapted, trained,
                                         str(config.init_from), task_type, total_step=int(config.steps))
        if local != out_dir:
            io.copy_tree(local, out_dir, last=hf_format.ADAPTER_WEIGHTS)
    finally:
        if local != out_dir:
            shutil.rmtree(local, ignore_errors=True)
    return ExportResult(found.source.step, family, out_dir, files)


def _scratch_parent() -> str:
    parent = os.path.join(io.cache_dir(), "exports")
    os.makedirs(parent, exist_ok=True)
    return parent
