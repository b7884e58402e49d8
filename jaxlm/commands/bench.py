"""`jaxlm bench`: benchmarks on this machine (decode: jaxlm vs transformers' generate())."""

import argparse

from jaxlm.errors import UserError

NAME = "bench"
HELP = "benchmarks: the train step of a config (train), KV-cache decoding vs transformers (decode)"
DESCRIPTION = ("--mode=train --config=RECIPE: the real compiled train step of the recipe on synthetic "
               "batches of its shapes: compile time, median step time, tokens/s, MFU, peak device "
               "memory; the last line is JSON. --mode=decode: KV-cache decoding tokens/s of a "
               "GPT-2-shape model (6 layers, d_model 384, vocab 8192, random weights), jaxlm and "
               "transformers' generate() alternating on this machine; medians.")
NEEDS = ()


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="decode", choices=("decode", "train"), help="what to time")
    parser.add_argument("--config", default="", help="train: the recipe whose train step is timed, e.g. "
                        "configs/tiny_shakespeare.py (--config.FIELD=VALUE overrides apply)")
    parser.add_argument("--steps", type=int, default=20, help="train: timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="train: untimed steps after the compile")
    parser.add_argument("--batch_sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each, alternating")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:  # pylint: disable=unused-argument
    if args.mode == "train":
        return _train(args, overrides)
    from jaxlm import bench  # pylint: disable=import-outside-toplevel
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch_sizes={args.batch_sizes}: expected comma-separated integers, e.g. 1,16") from None
    bench.decode_bench(batch_sizes, args.prompt_len, args.new_tokens, args.rounds)
    return 0


def _train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm import train_bench  # pylint: disable=import-outside-toplevel
    if not args.config:
        raise UserError("--mode=train needs --config=RECIPE, e.g. --config=configs/tiny_shakespeare.py")
    config = config_lib.load_recipe(args.config, overrides)
    print(train_bench.format_report(train_bench.train_bench(config, args.steps, args.warmup)), flush=True)
    return 0
