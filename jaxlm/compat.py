"""Every place where jaxlm depends on which jax release is installed, in one module.

jaxlm supports jax 0.10.x (the version it is tested with) and newer releases (0.11+). Each shim
says which releases take which path; everything else in jaxlm calls these instead of probing jax.
Nothing here imports jax at module import time: the CLI imports this before choosing platforms.
"""

import inspect
import os
from typing import Any, Callable, Optional

# == Backends ========================================================================================

# Device files through which a TPU VM exposes its chips: /dev/accel0… (v2-v4, v5p) or numbered
# VFIO groups /dev/vfio/0… (v5e, v6e). /dev/vfio/vfio alone is the VFIO control node, on any host.
_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_HOST_BOUNDS",
            "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_NAME", "MEGASCALE_COORDINATOR_ADDRESS")
_NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # as jax's hardware_utils checks
# PCI ids of TPU chips (vendor Google), as jax's hardware_utils lists them: v3 … TPU7x. Other
# Google PCI devices (the gVNIC network card of any GCE VM) are not TPUs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def looks_like_tpu_host() -> bool:
    """Whether this machine may have TPU chips (then jax must probe for them)."""
    if any(os.environ.get(name) for name in _TPU_ENV):
        return True
    if os.path.isdir("/dev") and any(n.startswith("accel") for n in os.listdir("/dev")):
        return True
    if os.path.isdir("/dev/vfio") and any(n.isdigit() for n in os.listdir("/dev/vfio")):
        return True
    return any(_pci_id(dev, "vendor") == _GOOGLE_PCI_VENDOR and _pci_id(dev, "device") in _TPU_PCI_DEVICES
               for dev in (os.listdir("/sys/bus/pci/devices") if os.path.isdir("/sys/bus/pci/devices") else ()))


def _pci_id(device: str, kind: str) -> str:
    try:
        with open(os.path.join("/sys/bus/pci/devices", device, kind)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _plugin_modules() -> list[str]:
    """Names of the installed jax PJRT plugins (`jax_plugins.*` modules and entry points), found
    without importing jax or the plugins."""
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    import importlib.util  # pylint: disable=import-outside-toplevel
    import pkgutil  # pylint: disable=import-outside-toplevel
    names = set()
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names.update(m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations)))
    try:
        names.update(ep.value for ep in importlib.metadata.entry_points(group="jax_plugins"))
    except TypeError:  # Python < 3.10 has no group= (jaxlm needs 3.10+, kept for safety).
        pass
    return sorted(names)


def platforms_without_tpu_probe() -> Optional[str]:
    """A JAX_PLATFORMS value that skips the TPU probe on a host without TPUs, or None to leave
    jax's own choice alone.

    With JAX_PLATFORMS unset or "", jax (0.3.22 and later, 0.10 included) initialises every
    registered backend, and the TPU one starts libtpu whenever libtpu is installed: on a host
    without TPUs it prints errors on native stderr and gives up. A list value makes jax
    initialise exactly those platforms and fail loudly if one of them cannot start. So:
    "cpu" when no GPU plugin is installed or no NVIDIA device is visible; "cuda,cpu" when the
    CUDA plugin (jax[cuda12] / jax[cuda13]) is installed and an NVIDIA device is visible (jax
    0.10 would skip "cuda" without a device anyway; the device check keeps that true for any
    release); None (jax decides) for any other plugin, whose platform name we cannot know.
    """
    if "JAX_PLATFORMS" in os.environ or "JAX_PLATFORM_NAME" in os.environ or looks_like_tpu_host():
        return None
    plugins = [p for p in _plugin_modules() if "tpu" not in p.lower()]
    if any("cuda" not in p.lower() for p in plugins):
        return None
    if plugins and any(os.path.exists(d) for d in _NVIDIA_DEVICE_FILES):
        return "cuda,cpu"
    return "cpu"


# == Meshes ==========================================================================================

def mesh_context(mesh):
    """The context that makes `mesh` current while tracing (activation constraints need it).

    jax 0.7 and later (0.10, 0.11): jax.set_mesh. Some releases before it had only
    jax.sharding.use_mesh; older ones used the Mesh itself as the context manager.
    """
    import jax  # pylint: disable=import-outside-toplevel
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh


# == Multi-process start-up ==========================================================================

def supported_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without the None values and the names `fn` does not take.

    For jax.distributed.initialize: jax 0.10 takes initialization_timeout and
    heartbeat_timeout_seconds; releases before heartbeat_timeout_seconds existed get it dropped
    (their own default applies) rather than a TypeError.
    """
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def use_gloo_cpu_collectives() -> None:
    """CPU collectives across processes go through gloo (multi-process runs on CPU, the tests).

    jax 0.10 has the jax_cpu_collectives_implementation option (set here before the backend
    starts); releases without the option are left as they are.
    """
    import jax  # pylint: disable=import-outside-toplevel
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# == Compiled programs ===============================================================================

def compiled_cost(compiled) -> dict:
    """`Compiled.cost_analysis()` as one dict: jax 0.10 returns the dict; older releases
    returned a list with one dict per program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def hlo_text_cost(module_text: str) -> dict:
    """XLA's HloCostAnalysis of an HLO module given as text, run by the CPU client.

    It is the analysis `Compiled.cost_analysis()` runs (on a whole compiled TPU program the two
    agree to the FLOP), reached through private bindings, which move between releases:
    jax 0.10 parses with jaxlib.xla_client.hlo.hlo_module_from_text and analyses with
    jax._src.lib._jax.hlo_module_cost_analysis; releases before the `_jax` extension (up to
    0.6) had both in jaxlib.xla_client._xla. A release with neither raises NotImplementedError,
    and the caller reports the figure as unavailable.
    """
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import lib as jax_lib  # pylint: disable=import-outside-toplevel
    from jaxlib import xla_client  # pylint: disable=import-outside-toplevel
    ext = getattr(jax_lib, "_jax", None) or getattr(xla_client, "_xla", None)
    parse = (getattr(getattr(xla_client, "hlo", None), "hlo_module_from_text", None)
             or getattr(ext, "hlo_module_from_text", None))
    analyse = getattr(ext, "hlo_module_cost_analysis", None)
    if parse is None or analyse is None:
        raise NotImplementedError(f"this jax ({jax.__version__}) exposes no HLO text parser / cost analysis")
    return dict(analyse(jax.devices("cpu")[0].client, parse(module_text)))


# == optax ===========================================================================================

def global_norm(tree) -> Any:
    """The L2 norm over every leaf of `tree`: optax.tree.norm from optax 0.2.5 on (where
    optax.global_norm is deprecated), optax.global_norm before it."""
    import optax  # pylint: disable=import-outside-toplevel
    tree_module = getattr(optax, "tree", None)
    norm = getattr(tree_module, "norm", None)
    return norm(tree) if norm is not None else optax.global_norm(tree)
