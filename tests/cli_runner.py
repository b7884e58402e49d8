"""Runs `python -m jaxlm …` in a subprocess with a chosen number of fake CPU devices."""

import json
import os
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(devices: int = 1, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"  # Don't probe for TPUs when libtpu is installed.
    env.update(extra or {})
    return env


def run_cli(args: list[str], devices: int = 1, timeout: float = 600, check: bool = True,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jaxlm", *args], cwd=REPO, env=cli_env(devices, env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"jaxlm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def start_cli(args: list[str], devices: int = 1, log_path: Optional[str] = None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "jaxlm", *args], cwd=REPO, env=cli_env(devices),
                            stdout=out, stderr=subprocess.STDOUT)


def saved_state(workdir: str, step: int) -> dict:
    """The arrays of checkpoint `step`'s train state as numpy, keyed by their tree path."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    from jaxlm import io  # pylint: disable=import-outside-toplevel
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    tree = ocp.PyTreeCheckpointHandler().metadata(io.path(path)).tree  # as jaxlm.pretrained.restore_params reads it
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(path, restore_args=args)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(workdir: str, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def runlocal_train(workdir: str, data_dir: str, steps: int, *flags: str) -> list[str]:
    """`jaxlm train` of the tiny runlocal recipe, a train/loss line per step, no periodic eval."""
    return ["train", "--config=configs/tiny_shakespeare.py:runlocal", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.steps={steps}", "--config.log_every=1",
            "--config.eval_every=0", *flags]
