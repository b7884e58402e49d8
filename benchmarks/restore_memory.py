"""Peak host memory of restoring a 124M-parameter (GPT-2 small) checkpoint on one CPU device:
params only (what `jaxlm eval/generate/export` do) against the whole TrainState (a resume).

    python benchmarks/restore_memory.py save runs/m124      # once: config.json + a step-1 checkpoint
    python benchmarks/restore_memory.py params runs/m124    # one JSON line: peak growth in MB
    python benchmarks/restore_memory.py state runs/m124

Each measurement is its own process; the kernel's high-water mark (VmHWM) is reset just before
the restore, so `peak_increase_MB` is the restore's own. Linux only.
"""

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import restore  # noqa: E402
from jaxlm.checkpoint import Checkpointer  # noqa: E402
from jaxlm.trainer import Trainer  # noqa: E402


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def gpt2_small_config():
    config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt2_small.py"))
    config.model.dtype, config.model.remat_policy, config.seq_len = "float32", "none", 128
    config.mesh = config_lib.base_config().mesh
    return config


def main(mode: str, workdir: str) -> None:
    if mode == "save":
        config = gpt2_small_config()
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))
        state = Trainer(config, restore.inference_mesh(config, {})).init_state(0)
        checkpointer = Checkpointer(workdir, asynchronous=False, with_data=False)
        checkpointer.save(1, state, force=True)
        checkpointer.close()
        return
    config = restore.load_run_config(workdir, {})
    trainer = Trainer(config, restore.inference_mesh(config, {}))
    source = restore.find_checkpoint(workdir)
    params_mb = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(trainer.abstract_params)) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets VmHWM to the current RSS.
    before, start = status_mb("VmRSS"), time.perf_counter()
    if mode == "params":
        out = restore.restore_params(source, trainer.abstract_params, trainer.param_shardings)
    else:
        checkpointer = Checkpointer(workdir, with_data=False)
        out = checkpointer.restore(source.step, trainer.abstract_sharded_state())
    jax.block_until_ready(out)
    print(json.dumps({"mode": mode, "params_MB": round(params_mb), "seconds": round(time.perf_counter() - start, 1),
                      "peak_increase_MB": round(status_mb("VmHWM") - before),
                      "held_after_MB": round(status_mb("VmRSS") - before)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
