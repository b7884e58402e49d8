"""TensorFlow off the start-up path of a `jaxlm` command.

clu imports TensorFlow at module level (its SummaryWriter is tf.summary), and with it
tensorboard's hparams API, whose Keras callback touches `tf.keras` as it is defined; jaxlm uses
clu's writers and progress, but writes its TensorBoard events itself (jaxlm.tensorboard_events),
and reads its data through tfds and grain without TensorFlow. Importing TensorFlow (with Keras)
is ~9 s of every command's start on a 2-core host.

`import_deferring()` imports clu's modules with stand-ins for those two in sys.modules, then
takes the stand-ins out again: clu's modules keep them as their `tf`, and the first attribute
read from one imports the real module (through the import system, so jaxlm.commands.common's
hook still hides the GPUs from it) and answers from that. Out of sys.modules, because libraries
take "tensorflow" in sys.modules to mean it is loaded and then use it (tfds's dtype checks, via
etils' `enp.lazy.has_tf`). `importlib.util.LazyLoader` cannot do this: the import statement
itself reads the module's `__spec__`.
"""

import importlib
import importlib.util
import sys
import threading
import types

# Both, as clu imports both: the hparams API's own import reads tf.keras, which would load TensorFlow.
DEFERRED = ("tensorboard.plugins.hparams.api", "tensorflow")
_LOCK = threading.Lock()


class _Deferred(types.ModuleType):
    """Answers every attribute it does not hold itself (name, spec) from the real module."""

    def __getattr__(self, attr: str):
        return getattr(load(self.__name__), attr)


def load(name: str) -> types.ModuleType:
    """The real module `name`, imported now if its stand-in is still in sys.modules."""
    with _LOCK:
        if isinstance(sys.modules.get(name), _Deferred):
            del sys.modules[name]
        return importlib.import_module(name)


def import_deferring(modules: tuple[str, ...], deferred: tuple[str, ...] = DEFERRED) -> None:
    """Imports `modules` with stand-ins for the `deferred` ones not yet imported."""
    stand_ins = {}
    for name in deferred:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # Imports the parent packages (light).
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__, stand_in.__loader__, stand_in.__package__ = spec, spec.loader, spec.parent
        stand_ins[name] = sys.modules[name] = stand_in
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
