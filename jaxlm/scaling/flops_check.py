"""The FLOPs a sweep counts for a run, against XLA's cost analysis of its compiled train step.

The run's config (DIR/runs/<name>/config.json) is compiled for one CPU device at its real global
batch and sequence length: AOT compilation allocates nothing, so even a large run's step
compiles on a host, and the FLOPs of a program do not depend on the mesh it is split over. XLA
counts a loop body once; `loop_weighted_flops` weights each while loop (the layers' scan, the
micro-batch scan) by its trip count. A multiply-add counts 2 FLOPs in both figures; the compiled
one also has the elementwise work (softmax, norms, the optimizer) the analytic count leaves out.
"""

import hashlib
import json
import os
from typing import Optional

from jaxlm import io
from jaxlm.models.config import ModelConfig
from jaxlm.scaling.sizes import run_flops_per_token

CHECK_FILE = "flops_check.json"
TOLERANCE = 0.05


def analytic_flops_per_step(config: dict) -> float:
    cfg = ModelConfig.from_dict(config["model"])
    return config["global_batch_size"] * config["seq_len"] * run_flops_per_token(cfg, config["seq_len"])


def compiled_flops_per_step(config: dict) -> tuple[float, list[dict]]:
    """XLA's FLOPs of one train step of `config` (a run's config.json), loops weighted."""
    import jax  # pylint: disable=import-outside-toplevel
    import ml_collections  # pylint: disable=import-outside-toplevel

    from jaxlm import sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.hlo_analysis import HloProgram, loop_weighted_flops  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import Trainer  # pylint: disable=import-outside-toplevel

    config = ml_collections.ConfigDict(config)
    config.mesh.update(data=1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices("cpu")[:1])
    trainer = Trainer(config, mesh)
    compiled = trainer.compile_train(trainer.task.batch_spec(config))
    return loop_weighted_flops(HloProgram(compiled.as_text()))


def _config_and_digest(directory: str) -> tuple[bytes, str]:
    with open(os.path.join(directory, "config.json"), "rb") as f:
        raw = f.read()
    return raw, hashlib.sha256(raw).hexdigest()


def cached_check(directory: str) -> Optional[dict]:
    """The run's saved check, if its config has not changed since."""
    _, digest = _config_and_digest(directory)
    cache = os.path.join(directory, CHECK_FILE)
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("config_sha256") == digest:
            return saved
    return None


def check_run(directory: str) -> dict:
    """{analytic, compiled, ratio} per step for the run in `directory`, cached in its
    flops_check.json (keyed by the config's hash) so a refit compiles nothing again."""
    saved = cached_check(directory)
    if saved is not None:
        return saved
    raw, digest = _config_and_digest(directory)
    cache = os.path.join(directory, CHECK_FILE)
    config = json.loads(raw)
    analytic = analytic_flops_per_step(config)
    compiled, loops = compiled_flops_per_step(config)
    result = {"config_sha256": digest, "analytic_per_step": analytic, "compiled_per_step": compiled,
              "ratio": compiled / analytic, "within_tolerance": abs(compiled / analytic - 1) <= TOLERANCE,
              "tolerance": TOLERANCE, "loops": loops}
    io.write_json_atomic(cache, result)
    return result
