"""TPU slices as compile-only devices on any machine: topology names, libtpu start-up, HBM per chip.

`topology_devices("v5p:2x2x2")` returns abstract TPU devices of that slice (from
`jax.experimental.topologies`) for compiling, with no TPU attached: libtpu (the `tpu` extra)
compiles for them. libtpu's native start-up chatter on a host without TPUs is kept off the
console, and shown only with JAXLM_LOG_LEVEL=debug when the topology is refused.
"""

import os
import re
import tempfile
from typing import Any

from jaxlm.console import library_output, native_stderr_to
from jaxlm.errors import UserError

# HBM per chip (Cloud TPU system architecture pages), GiB.
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# device_kind of the compile-only devices -> chip name.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
# Chips with two TensorCores that JAX drives as one device (megacore), as on Cloud TPU VMs.
MEGACORE = ("v4", "v5p")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:2x4, v5e:4x4, v5p:2x2x2, v5p:4x4x4, v4:2x2x1, v6e:2x2"
_TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e)[:=_](\d+(?:x\d+){1,2})$")


def parse_topology(topology: str) -> tuple[str, str]:
    """'v5p:2x2x2' -> ('v5p', '2x2x2'); a UserError naming --topology otherwise."""
    m = _TOPOLOGY_RE.match((topology or "").strip().lower())
    if not m:
        raise UserError(f"--topology={topology!r}: expected CHIP:SHAPE with CHIP one of "
                        f"{', '.join(CHIP_HBM_GIB)}, e.g. {TOPOLOGY_EXAMPLES}")
    return m.group(1), m.group(2)


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices for `topology` (x num_slices slices)."""
    chip, _ = parse_topology(topology)
    name = topology.strip().lower()
    if num_slices < 1:
        raise UserError(f"--num_slices={num_slices}: must be 1 or more")
    import importlib.util  # pylint: disable=import-outside-toplevel
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise UserError("jaxlm aot compiles for TPUs with libtpu, which is not installed: "
                        "pip install 'jaxlm[tpu]'")
    # Compiling needs no chip: skip libtpu's one-process-per-TPU lock (/tmp/libtpu_lockfile),
    # which any other jax process on this machine that probed for a TPU may hold, and the
    # GCE metadata queries.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if chip in MEGACORE else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    # libtpu logs "could not determine TPU worker hostnames" etc. when it starts on a machine
    # without TPUs: library output (JAXLM_LOG_LEVEL=debug shows it), never the report's.
    with tempfile.NamedTemporaryFile(prefix="jaxlm_libtpu_", suffix=".log", delete=False) as log:
        log_path = log.name
    try:
        with native_stderr_to(log_path):
            try:
                jax.devices()  # Backends first (a TPU probe happens here), then the topology.
                devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                            **kwargs).devices)
                error = None
            except Exception as e:  # pylint: disable=broad-except
                devices, error = [], e
        with open(log_path, errors="replace") as f:
            library_output("libtpu", f.read())
        if error is not None:
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "TPU support not installed" in text:
                raise UserError("jaxlm aot compiles for TPUs with libtpu, which is not installed: "
                                "pip install 'jaxlm[tpu]'") from error
            raise UserError(f"--topology={topology}{f' --num_slices={num_slices}' if num_slices > 1 else ''}: "
                            f"libtpu refused it ({text}); examples: {TOPOLOGY_EXAMPLES}") from error
    finally:
        os.unlink(log_path)
    return devices


def chip_of(devices: list, fallback: str) -> str:
    return DEVICE_KINDS.get(getattr(devices[0], "device_kind", ""), fallback)

