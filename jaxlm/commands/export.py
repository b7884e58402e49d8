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
    parser.add_argument("--adapters_only", action="store_true",
                        help="a LoRA run: write its adapters (and its trained head) as a Hugging Face PEFT directory "
                             "(adapter_config.json, adapter_model.safetensors) instead of the merged model")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import export  # pylint: disable=import-outside-toplevel
    common.check_bucket_exists("--out", args.out)
    from jaxlm import bucket_probe  # pylint: disable=import-outside-toplevel
    bucket_probe.check_reachable(args.workdir)  # One line, not gcsfs's 33 s of retries.
    console.log_to_workdir(args.workdir)
    if args.adapters_only:
        return _export_adapters(args, overrides)
    result = export.export_run(args.workdir, args.out, overrides, step=args.step, best=args.best)
    print(f"exported step {result.step} as a Hugging Face {result.family} model to {result.out_dir}: "
          f"{', '.join(result.files)}", flush=True)
    return 0


def _export_adapters(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm.peft import export as peft_export  # pylint: disable=import-outside-toplevel
    result = peft_export.export_adapters(args.workdir, args.out, overrides, step=args.step, best=args.best)
    print(f"exported step {result.step}'s adapters as a Hugging Face PEFT adapter ({result.family}) to "
          f"{result.out_dir}: {', '.join(result.files)}", flush=True)
    return 0
