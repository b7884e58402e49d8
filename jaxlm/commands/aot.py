"""`jaxlm aot`: compile the train step for a TPU topology on this machine, and size it."""

import argparse
import json
import sys

from jaxlm.aot import EXIT_DOES_NOT_FIT
from jaxlm.commands import common
from jaxlm.tpu_topology import TOPOLOGY_EXAMPLES

NAME = "aot"
HELP = "compile the train step for a TPU topology here: memory, FLOPs, collectives"
DESCRIPTION = ("Compile the real train step (model, shardings, optimizer) for a TPU topology on "
               "this machine, with no TPU (needs the tpu extra: pip install 'jaxlm[tpu]'), and "
               "report memory per device against the chip's HBM, FLOPs per step and the "
               f"collectives. Exits {EXIT_DOES_NOT_FIT} when the step does not fit. Override "
               "config fields with --config.FIELD=VALUE (model.vocab_size must be set).")
NEEDS = ("config", "topology")


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_recipe_flags(parser, "configs/llama_1b.py")
    parser.add_argument("--topology", required=False, help=f"TPU slice as CHIP:SHAPE, e.g. {TOPOLOGY_EXAMPLES}")
    parser.add_argument("--num_slices", type=int, default=1,
                        help="slices joined over DCN (data parallel across them: mesh.dcn_data)")
    parser.add_argument("--json_out", default=None, help="also write the report as JSON to this file")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import aot  # pylint: disable=import-outside-toplevel
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_recipe(args.config, overrides)
    report = aot.aot_report(config, args.topology, args.num_slices)
    report["config"] = args.config
    report["overrides"] = dict(overrides)
    print(aot.format_report(report), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    if not report["fits"]:
        print(f"jaxlm: error: {aot.does_not_fit_line(report)}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return 0
