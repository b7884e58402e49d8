"""`jaxlm train`: train or resume a run from a recipe."""

import argparse

from jaxlm import console
from jaxlm.commands import common

NAME = "train"
HELP = "train or resume a run (causal LM, masked LM, classification)"
DESCRIPTION = ("Train a model from a config recipe. Running the same command again resumes "
               "from the last checkpoint in --workdir. Override any config field with "
               "--config.FIELD=VALUE (e.g. --config.steps=200 --config.mesh.fsdp=8); "
               "--help_config lists the fields. Library messages go to DIR/jaxlm.log.")
NEEDS = ("config", "workdir")


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_recipe_flags(parser, "configs/tiny_shakespeare.py[:runlocal]")
    parser.add_argument("--workdir", required=False, help="run directory (checkpoints, metrics.jsonl, TensorBoard)")
    common.add_distributed_flags(parser)


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm import train as train_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_recipe(args.config, overrides)
    common.initialize_distributed(args)
    primary = common.is_primary()
    from jaxlm import bucket_probe  # pylint: disable=import-outside-toplevel
    bucket_probe.check_reachable(args.workdir)  # Before the log file's first look at the workdir.
    # The log file opens once training has validated everything and written DIR/config.json.
    console.log_to_workdir(args.workdir, primary=primary, wait_for_config=True)
    console.tfds_prints_to_log()
    final = train_lib.train_and_evaluate(config, args.workdir)
    if primary:
        print(train_lib.format_final(final), flush=True)
    return 0
