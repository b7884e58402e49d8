"""`jaxlm export`: a run's checkpoint as a Hugging Face model directory.

    export_run("runs/x", "hf/x", overrides={}, step=None)   # config.json, model.safetensors, tokenizer

The family (GPT-2, Llama or BERT) follows from the run's model config (`match_family`, checked
before anything is read); the architecture from the task's head. The weights are the params
only (no optimizer state), written as float32; a padded vocabulary is kept as it is. Either
directory may be on a bucket (gs://).
"""

import dataclasses
from typing import Optional

from jaxlm import config as config_lib
from jaxlm import io
from jaxlm.convert import export_hf, match_family
from jaxlm.errors import UserError
from jaxlm.run import find_run


@dataclasses.dataclass
class ExportResult:
    step: int
    family: str
    out_dir: str
    files: list[str]


def export_run(workdir: str, out_dir: str, overrides: dict[str, str], step: Optional[int] = None,
               best: bool = False) -> ExportResult:
    found = find_run(workdir, step=step, best=best, overrides=overrides)
    family = match_family(config_lib.model_config(found.config))
    check_out_dir(out_dir)
    run = found.open()
    names = found.config.data.get("label_names", ()) if found.config.task == "classification" else ()
    export_hf(run.model.model_config, run.params, out_dir, family=family, tokenizer=run.tokenizer,
              label_names=tuple(names or ()))
    return ExportResult(run.step, family, out_dir, io.list_dir(out_dir))


def check_out_dir(out_dir: str) -> None:
    """--out must be a new or empty directory (local or gs://): an export never mixes with files."""
    if io.list_dir(out_dir):  # On a bucket: any object under the prefix.
        raise UserError(f"--out={out_dir} is not empty: export into a new (or empty) directory")
    if io.is_file(out_dir):
        raise UserError(f"--out={out_dir} is a file: give a directory")
