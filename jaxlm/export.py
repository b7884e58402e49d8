"""`jaxlm export`: a run's checkpoint as a Hugging Face model directory.

    export_run("runs/x", "hf/x", overrides={}, step=None)   # config.json, model.safetensors, tokenizer

The family (GPT-2, Llama or BERT) follows from the run's model config (`match_family`, checked
before anything is read); the architecture from the task's head. The weights are the params
only (no optimizer state), written as float32; a padded vocabulary is kept as it is.
"""

import dataclasses
import os
from typing import Optional

from jaxlm import config as config_lib
from jaxlm import restore
from jaxlm.convert import export_hf, match_family
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.train import Trainer


@dataclasses.dataclass
class ExportResult:
    step: int
    family: str
    out_dir: str
    files: list[str]


def export_run(workdir: str, out_dir: str, overrides: dict[str, str], step: Optional[int] = None,
               best: bool = False) -> ExportResult:
    config = restore.load_run_config(workdir, overrides)
    family = match_family(config_lib.model_config(config))
    source = restore.find_checkpoint(workdir, step, best)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"--out={out_dir} is not empty: export into a new (or empty) directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out={out_dir} is a file: give a directory")
    tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer, workdir)

    trainer = Trainer(config, restore.inference_mesh(config, overrides))
    params = restore.restore_params(source, trainer.abstract_state.params, trainer.param_shardings)
    export_hf(trainer.model_config, params, out_dir, family=family, tokenizer=tokenizer)
    return ExportResult(source.step, family, out_dir, sorted(os.listdir(out_dir)))
