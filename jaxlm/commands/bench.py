"""`jaxlm bench`: benchmarks on this machine (decode: jaxlm vs transformers' generate())."""

import argparse

from jaxlm.errors import UserError

NAME = "bench"
HELP = "benchmarks (decode: jaxlm vs transformers generate())"
DESCRIPTION = ("--mode=decode: KV-cache decoding tokens/s of a GPT-2-shape model (6 layers, d_model "
               "384, vocab 8192, random weights), jaxlm and transformers' generate() alternating on "
               "this machine; medians.")
NEEDS = ()


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="decode", help="decode")
    parser.add_argument("--batch_sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each, alternating")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:  # pylint: disable=unused-argument
    from jaxlm import bench  # pylint: disable=import-outside-toplevel
    if args.mode != "decode":
        raise UserError(f"--mode={args.mode}: only 'decode' is available")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch_sizes={args.batch_sizes}: expected comma-separated integers, e.g. 1,16") from None
    bench.decode_bench(batch_sizes, args.prompt_len, args.new_tokens, args.rounds)
    return 0
