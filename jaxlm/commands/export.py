"""`jaxlm export`: a checkpoint as a Hugging Face model directory."""

import argparse

from jaxlm import console
from jaxlm.commands import common

NAME = "export"
HELP = "export a checkpoint as a Hugging Face model directory"
DESCRIPTION = ("Write config.json, model.safetensors and the tokenizer files of a run's checkpoint in "
               "the Hugging Face layout (GPT-2, Llama or BERT family, whichever the model config is), "
               "for transformers' from_pretrained.")
NEEDS = ("workdir", "out")


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_flags(parser)
    parser.add_argument("--out", required=False, help="new (or empty) output directory, local or gs://")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import export  # pylint: disable=import-outside-toplevel
    common.check_bucket_exists("--out", args.out)
    console.log_to_workdir(args.workdir)
    result = export.export_run(args.workdir, args.out, overrides, step=args.step, best=args.best)
    print(f"exported step {result.step} as a Hugging Face {result.family} model to {result.out_dir}: "
          f"{', '.join(result.files)}", flush=True)
    return 0
