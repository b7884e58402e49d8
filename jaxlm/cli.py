"""`jaxlm <command>`: the command line. Thin: parse, set up the process, run the command.

Each command is a module of jaxlm.commands (NAME, HELP, DESCRIPTION, NEEDS, `add_flags(parser)`,
`run(args, overrides)`).
A UserError becomes one line on stderr and exit code 2; a diverged run exits 1 with its reason.
`kill -USR1 PID` prints every thread's Python stack to the console (where a hung host waits).
"""

import argparse
import faulthandler
import os
import signal
import sys
import threading
from typing import Optional

from jaxlm import compat, console
from jaxlm.commands import aot, bench, common, evaluate, export, generate, predict, prepare, scaling, serve, train
from jaxlm.errors import UserError

EXIT_USER_ERROR = 2

# `jaxlm --help` lists the commands in this order; a new command is one more module here.
COMMANDS = (train, evaluate, generate, predict, serve, export, aot, bench, scaling, prepare)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm", description="JAX/Flax training stack for language models.",
        epilog="Run `jaxlm COMMAND --help` for a command's flags.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = common.add_parser(subparsers, command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_flags(sub)
        sub.set_defaults(handler=command.run, needs=command.NEEDS)
    return parser


def _skip_tpu_probe() -> None:
    """On a host without TPUs, keep jax from starting libtpu (installed with the tpu and test
    extras) just to find no TPU: it prints errors. Only before jax is imported, and only when
    the user left JAX_PLATFORMS unset."""
    if "jax" in sys.modules:
        return
    platforms = compat.platforms_without_tpu_probe()
    if platforms is not None:
        os.environ["JAX_PLATFORMS"] = platforms
        console.log_only("JAX_PLATFORMS=%s: no TPU on this host (set JAX_PLATFORMS='' to let jax probe "
                         "every backend)", platforms)


def _stacks_on_sigusr1() -> None:
    """A pod host that hangs (a collective its peers never joined, a stuck bucket read) shows
    nothing on its own; SIGUSR1 makes it print where each thread waits, and it keeps running."""
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        # File descriptor 2: sys.stderr may be an object without one (an embedding program's).
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)


def _help_config(args: argparse.Namespace, overrides: dict[str, str]) -> str:
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    if getattr(args, "config", None):
        return config_lib.describe_fields(config_lib.load_recipe(args.config, overrides))
    return config_lib.describe_fields()


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    code = None
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        if getattr(args, "help_config", False):
            print(_help_config(args, overrides))
            return 0
        for name in args.needs:
            if not getattr(args, name):
                raise UserError(f"--{name} is required: jaxlm {args.command} --help shows an example")
        console.setup()
        _stacks_on_sigusr1()
        _skip_tpu_probe()
        common.hide_gpus_from_tensorflow()
        code = args.handler(args, overrides)
        return code
    except UserError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
        return code
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # pylint: disable=broad-except
        from jaxlm.train import TrainingDiverged  # pylint: disable=import-outside-toplevel
        if isinstance(e, TrainingDiverged):
            print(f"jaxlm: training diverged: {e}", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        console.close(keep_log=code != EXIT_USER_ERROR)  # A user error leaves the run as it was.


if __name__ == "__main__":
    sys.exit(main())
