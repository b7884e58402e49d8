"""`jaxlm <command>`: the command line. Thin: parse, set up the process, call the library.

A UserError becomes one line on stderr and exit code 2; a diverged run exits 1 with its reason.
"""

import argparse
import os
import sys
from typing import Callable, Optional

from jaxlm.errors import UserError

EXIT_USER_ERROR = 2


def hide_gpus_from_tensorflow() -> None:
    """TensorFlow (pulled in by tfds and clu) must never take GPU memory from JAX."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # Already initialised elsewhere with no GPU visible: nothing to hide.


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.a.b=value` overrides from the other arguments."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: missing value; write --config.{key}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (GPU clusters and tests; TPU VMs need none)")
    group.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int, default=None, help="total number of processes")
    group.add_argument("--process_id", type=int, default=None, help="this process's index")
    group.add_argument("--initialization_timeout", type=int, default=300,
                       help="seconds to wait for the other processes at start-up")


def initialize_distributed(args: argparse.Namespace) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    explicit = [args.coordinator_address, args.num_processes, args.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError("--coordinator_address, --num_processes and --process_id go together: give all three")
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   initialization_timeout=args.initialization_timeout)
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # A multi-host TPU slice: the TPU runtime knows its peers.


def load_run_config(spec: str, overrides: dict[str, str]):
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config(spec)
    config_lib.check_known_fields(config)
    config_lib.apply_overrides(config, overrides)
    return config


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import train as train_lib  # pylint: disable=import-outside-toplevel
    config = load_run_config(args.config, overrides)
    initialize_distributed(args)
    final = train_lib.train_and_evaluate(config, args.workdir)
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
        print(train_lib.format_final(final), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm", description="JAX/Flax training stack for language models.",
        epilog="Run `jaxlm COMMAND --help` for a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train or resume a run (causal LM, masked LM, classification)",
        description="Train a model from a config recipe. Running the same command again resumes "
                    "from the last checkpoint in --workdir. Override any config field with "
                    "--config.FIELD=VALUE (e.g. --config.steps=200 --config.mesh.fsdp=8); "
                    "--help_config lists the fields.")
    train.add_argument("--config", required=False, help="recipe file, e.g. configs/tiny_shakespeare.py[:runlocal]")
    train.add_argument("--workdir", required=False, help="run directory (checkpoints, metrics.jsonl, TensorBoard)")
    train.add_argument("--help_config", action="store_true", help="list every config field and exit")
    add_distributed_flags(train)
    train.set_defaults(handler=cmd_train, needs=("config", "workdir"))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        if getattr(args, "help_config", False):
            from jaxlm.config import describe_fields  # pylint: disable=import-outside-toplevel
            print(describe_fields())
            return 0
        for name in getattr(args, "needs", ()):
            if not getattr(args, name):
                raise UserError(f"--{name} is required: jaxlm {args.command} --help shows an example")
        setup_logging()
        hide_gpus_from_tensorflow()
        handler: Callable[..., int] = args.handler
        return handler(args, overrides)
    except UserError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # pylint: disable=broad-except
        from jaxlm.train import TrainingDiverged  # pylint: disable=import-outside-toplevel
        if isinstance(e, TrainingDiverged):
            print(f"jaxlm: training diverged: {e}", file=sys.stderr, flush=True)
            return 1
        raise


class _OwnInfoOnly:
    """Keeps INFO lines from jaxlm and clu's progress reports; libraries' INFO chatter (orbax
    logs a dozen lines per save) is dropped. Warnings and errors always pass.
    JAXLM_LOG_LEVEL=debug shows everything."""

    KEEP = (os.sep + "jaxlm" + os.sep, "periodic_actions.py", "logging_writer.py")

    def filter(self, record) -> bool:
        import logging as py_logging  # pylint: disable=import-outside-toplevel
        return record.levelno >= py_logging.WARNING or any(k in record.pathname for k in self.KEEP)


def setup_logging() -> None:
    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.use_absl_handler()
    level = os.environ.get("JAXLM_LOG_LEVEL", "info")
    logging.set_verbosity(level)
    handler = logging.get_absl_handler()
    handler.python_handler.stream = sys.stderr
    if level != "debug":
        handler.addFilter(_OwnInfoOnly())


if __name__ == "__main__":
    sys.exit(main())
