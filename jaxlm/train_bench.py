"""`jaxlm bench --mode=train`: the real train step of a config on synthetic batches.

The step is the one `jaxlm train` runs (Trainer.compile_train: same model, shardings, optimizer,
donation), fed random token batches of the config's shapes that are placed on the devices before
the clock starts, so the figure is the step and nothing else. Reported: compile seconds, the
median and spread of the step time, tokens/s, model FLOPs per step (6N + attention, as
train/mfu counts them), MFU against the device's peak (jaxlm.metrics.PEAK_FLOPS for TPUs and
GPUs; on a CPU the float32 matmul peak measured in this process, and said so), and the peak
device memory where the backend reports one. The last printed line is one JSON object.
"""

import copy
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError


def _checked(config) -> Any:
    from jaxlm import config_checks  # pylint: disable=import-outside-toplevel
    config = copy.deepcopy(config)
    if config.model.vocab_size <= 0:
        bpe = int(config.data.get("bpe_vocab_size", 0)) if config.data.get("tokenizer", "") == "bpe" else 0
        if not bpe:
            raise UserError(f"model.vocab_size={config.model.vocab_size}: bench reads no tokenizer, so give "
                            f"the vocabulary size, e.g. --config.model.vocab_size=32000")
        config.model.vocab_size = bpe  # The size the run's BPE will have.
    config_checks.validate(config)
    return config


def synthetic_batch(spec: dict, vocab_size: int, seed: int = 0) -> dict:
    """Random tokens (uniform over the vocabulary), weights 1, masks True, labels 0/1: a batch
    that exercises every row and position as real data does."""
    rng = np.random.default_rng(seed)
    batch = {}
    for key, s in spec.items():
        if s.dtype == jnp.bool_:
            batch[key] = np.ones(s.shape, np.bool_)
        elif key in ("inputs", "targets"):
            batch[key] = rng.integers(0, vocab_size, s.shape, dtype=np.int32)
        elif key == "labels":
            batch[key] = rng.integers(0, 2, s.shape, dtype=np.int32)
        elif key == "segment_ids":
            batch[key] = np.ones(s.shape, np.int32)
        elif jnp.issubdtype(s.dtype, jnp.floating):
            batch[key] = np.ones(s.shape, s.dtype)
        else:
            batch[key] = np.zeros(s.shape, s.dtype)
    return batch


def _peak_memory_bytes() -> int | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def train_bench(config, steps: int = 20, warmup: int = 2) -> dict:
    """Times `steps` train steps of `config` (after `warmup` untimed ones) and returns the figures."""
    from jaxlm import metrics, sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.resolve import check_batch_layout  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import Trainer  # pylint: disable=import-outside-toplevel
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps={steps} --warmup={warmup}: give at least one timed step and warmup >= 0")
    config = _checked(config)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_layout(config, mesh)
    trainer = Trainer(config, mesh)
    cfg = trainer.model_config
    spec = trainer.task.batch_spec(config)
    host_batch = synthetic_batch(spec, cfg.vocab_size, config.seed)
    shardings, _ = trainer.batch_layout(host_batch)
    batch = jax.device_put(host_batch, shardings)

    start = time.perf_counter()
    train = trainer.compile_train(host_batch)
    compile_s = time.perf_counter() - start
    state = trainer.init_state(config.seed)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, step_metrics = train(state, batch)
        jax.block_until_ready(step_metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    loss = float(step_metrics.compute()["loss"])  # Finite on random tokens: the step really trained.

    tokens = config.global_batch_size * config.seq_len
    flops = metrics.train_flops_per_token(cfg, config.seq_len, trainer.task.vocab_head) * tokens
    peak, peak_source = metrics.device_peak_flops()
    median = statistics.median(times)
    devices = mesh.devices.size
    return {
        "mode": "train", "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
        "devices": int(devices), "params": int(trainer.num_params),
        "dtype": cfg.dtype, "matmul_dtype": cfg.matmul_dtype or cfg.dtype, "param_dtype": cfg.param_dtype,
        "global_batch_size": int(config.global_batch_size), "seq_len": int(config.seq_len),
        "compile_s": round(compile_s, 3), "steps": steps,
        "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
        "tokens_per_s": tokens / median, "examples_per_s": config.global_batch_size / median,
        "model_flops_per_step": flops, "mfu": flops / median / (peak * devices), "peak_flops": peak,
        "peak_source": peak_source, "peak_memory_bytes": _peak_memory_bytes(), "last_loss": loss,
    }


def format_report(r: dict) -> str:
    memory = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "not reported by this backend"
    return "\n".join([
        f"train step: {r['params']:,} params, batch {r['global_batch_size']} x {r['seq_len']}, {r['dtype']} compute"
        f"{' with ' + r['matmul_dtype'] + ' matmuls' if r.get('matmul_dtype', r['dtype']) != r['dtype'] else ''}, "
        f"{r['devices']} {r['device_kind']} device(s)",
        f"compile {r['compile_s']:.1f} s; step median {r['step_s_median'] * 1e3:.1f} ms over {r['steps']} "
        f"(min {r['step_s_min'] * 1e3:.1f}, max {r['step_s_max'] * 1e3:.1f})",
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['examples_per_s']:,.1f} examples/s; "
        f"MFU {100 * r['mfu']:.1f}% of {r['peak_source']}",
        f"peak device memory: {memory}",
        json.dumps(r, sort_keys=True),
    ])
