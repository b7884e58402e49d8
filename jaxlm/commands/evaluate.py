"""`jaxlm eval`: a checkpoint's eval metrics on this machine's devices."""

import argparse

from jaxlm import console
from jaxlm.commands import common

NAME = "eval"
HELP = "evaluate a checkpoint on this machine's devices"
DESCRIPTION = ("Restore a checkpoint's params (written on any mesh) onto this machine's devices and "
               "compute the task's eval metrics, as training does. Writes DIR/eval/<split>_step<N>.json "
               "and TensorBoard scalars. --config.FIELD=VALUE overrides the run's config, e.g. "
               "--config.data.eval_file=other.txt.")
NEEDS = ("workdir",)


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_flags(parser)
    parser.add_argument("--split", default="", help="eval (default: the run's eval split) | another split "
                                                    "of the run's tfds dataset, e.g. test")
    common.add_distributed_flags(parser)


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import evaluate  # pylint: disable=import-outside-toplevel
    common.initialize_distributed(args)
    primary = common.is_primary()
    from jaxlm import bucket_probe  # pylint: disable=import-outside-toplevel
    bucket_probe.check_reachable(args.workdir)  # One line, not gcsfs's 33 s of retries.
    console.log_to_workdir(args.workdir, primary=primary)
    console.tfds_prints_to_log()
    result = evaluate.evaluate_checkpoint(args.workdir, overrides, step=args.step, best=args.best, split=args.split)
    if primary:
        print(evaluate.format_table(result), flush=True)
    return 0
