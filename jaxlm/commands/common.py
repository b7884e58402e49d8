"""Flags and start-up steps that several commands share."""

import argparse
import importlib.abc
import importlib.util
import os
import sys

from jaxlm import deferred_imports
from jaxlm.errors import UserError


class HelpWithDefaults(argparse.HelpFormatter):
    """Appends "(default: …)" to each flag's help that has a default worth showing (not None,
    not empty, not an on/off switch) and does not describe its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, "", argparse.SUPPRESS) or isinstance(default, bool)
                or "default" in text or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


def add_parser(subparsers, name: str, *, help: str, description: str) -> argparse.ArgumentParser:  # noqa: A002
    """A command's parser, whose --help shows the flags' defaults."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpWithDefaults)


def add_recipe_flags(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", required=False, help=f"recipe file, e.g. {example}")
    parser.add_argument("--help_config", action="store_true",
                        help="list every config field with its value (the recipe's, with --config) and exit")


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """--workdir of a finished run and which of its checkpoints: --step N or --best."""
    parser.add_argument("--workdir", required=False, help="run directory written by `jaxlm train`")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    which.add_argument("--best", action="store_true", help="the best checkpoint (DIR/best, kept with best_metric)")


def check_bucket_exists(flag: str, path: str) -> None:
    """An output on a bucket (gs://b/…) needs bucket b: a missing one is a UserError before any
    work, not a failed upload after it. Local paths pass (their commands check them)."""
    from jaxlm import io  # pylint: disable=import-outside-toplevel
    if not path or not io.is_remote(path):
        return
    bucket = "/".join(path.split("/")[:3])  # scheme://name
    if not io.is_dir(bucket):
        raise UserError(f"{flag}={path}: bucket {bucket} does not exist (or these credentials cannot see it)")


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (GPU clusters and tests; TPU VMs need none)")
    group.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int, default=None, help="total number of processes")
    group.add_argument("--process_id", type=int, default=None, help="this process's index")
    group.add_argument("--initialization_timeout", type=int, default=300,
                       help="seconds to wait for the other processes at start-up")
    group.add_argument("--heartbeat_timeout", type=int, default=30,
                       help="seconds without a peer's heartbeat before the run stops with an error")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins the other processes of a multi-host run, with timeouts so a dead peer is an error.

    On CPU the collectives go through gloo (tests run several processes on localhost).
    """
    import jax  # pylint: disable=import-outside-toplevel
    from jaxlm import compat  # pylint: disable=import-outside-toplevel
    explicit = [args.coordinator_address, args.num_processes, args.process_id]
    multi_host_tpu = (os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
                      or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
    if all(v is None for v in explicit) and not multi_host_tpu:
        return
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise UserError("--coordinator_address, --num_processes and --process_id go together: give all three")
    compat.use_gloo_cpu_collectives()
    kwargs = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                  process_id=args.process_id, initialization_timeout=args.initialization_timeout,
                  heartbeat_timeout_seconds=args.heartbeat_timeout)
    # On a TPU slice the runtime knows the peers: only the timeouts are passed.
    jax.distributed.initialize(**compat.supported_kwargs(jax.distributed.initialize, kwargs))


def is_primary() -> bool:
    """Whether this is process 0 (call after initialize_distributed)."""
    import jax  # pylint: disable=import-outside-toplevel
    return jax.process_index() == 0


# The clu modules jaxlm uses that import TensorFlow (metric_writers; periodic_actions through it).
CLU_MODULES = ("clu.metric_writers", "clu.periodic_actions")


def hide_gpus_from_tensorflow() -> None:
    """TensorFlow (pulled in by tfds and clu) must never take GPU memory from JAX. Its native
    start-up lines (oneDNN, CPU features) go to the log file, not the console.

    Done when TensorFlow is imported, not by importing it here, and that import is deferred
    until something uses it (jaxlm.deferred_imports): commands then start without its ~9 s
    import on a 2-core host, although clu imports it."""
    if "tensorflow" in sys.modules:
        _hide_gpus(sys.modules["tensorflow"])
        return
    deferred_imports.import_deferring(CLU_MODULES)  # First: its find_spec would use up the hook.
    if not any(isinstance(finder, _HideGpusOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HideGpusOnImport())


def _hide_gpus(tf) -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, AttributeError):
        pass  # Already initialised elsewhere with no GPU visible, or a partial stub: nothing to hide.


class _HideGpusOnImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the import system would, and hides the GPUs once its module has run."""

    def find_spec(self, fullname, path, target=None):  # pylint: disable=unused-argument
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders take it from here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            from jaxlm import console  # pylint: disable=import-outside-toplevel
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            with console.native_output_to_log("tensorflow"):
                run_module(module)
                _hide_gpus(module)

        spec.loader.exec_module = exec_module
        return spec
