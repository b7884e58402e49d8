"""`jaxlm bench --mode=train`: the real train step on synthetic batches, its figures and JSON."""

import json

import numpy as np
import pytest
from cli_runner import run_cli

from jaxlm import config as config_lib
from jaxlm import metrics, sharding, train_bench
from jaxlm.errors import UserError
from jaxlm.trainer import Trainer

RECIPE = "configs/tiny_shakespeare.py:runlocal"
SMALL = {"global_batch_size": "8", "seq_len": "16", "model.vocab_size": "256"}


def test_bench_train_prints_figures_and_one_json_line_last():
    proc = run_cli(["bench", "--mode=train", f"--config={RECIPE}", "--steps=3", "--warmup=1",
                    *[f"--config.{k}={v}" for k, v in SMALL.items()]])
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["mode"] == "train" and report["steps"] == 3 and report["devices"] == 1
    assert report["global_batch_size"] == 8 and report["seq_len"] == 16
    assert report["step_s_min"] <= report["step_s_median"] <= report["step_s_max"]
    assert report["tokens_per_s"] == pytest.approx(128 / report["step_s_median"])
    config = config_lib.load_recipe(RECIPE, SMALL)
    trainer = Trainer(config, sharding.make_mesh(config.mesh))
    assert report["params"] == trainer.num_params
    assert report["model_flops_per_step"] == metrics.train_flops_per_token(trainer.model_config, 16) * 128
    assert report["mfu"] == pytest.approx(
        report["model_flops_per_step"] / report["step_s_median"] / report["peak_flops"])
    assert "measured cpu float32 matmul peak" in report["peak_source"] and report["peak_memory_bytes"] is None
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout


def test_the_benched_step_is_the_training_step():
    """Four steps of the bench on its synthetic batch give the loss of Trainer's own step on it."""
    config = config_lib.load_recipe(RECIPE, SMALL)
    got = train_bench.train_bench(config, steps=3, warmup=1)["last_loss"]
    trainer = Trainer(config, sharding.make_mesh(config.mesh))
    batch = train_bench.synthetic_batch(trainer.task.batch_spec(config), 256, config.seed)
    step = trainer.compile_train(batch)
    state = trainer.init_state(config.seed)
    for _ in range(4):
        state, out = step(state, batch)
    assert got == float(out.compute()["loss"])
    assert np.isfinite(got)


def test_bench_train_user_errors():
    config = config_lib.load_recipe(RECIPE, {**SMALL, "model.vocab_size": "0", "data.tokenizer": "gpt2"})
    with pytest.raises(UserError, match="model.vocab_size"):
        train_bench.train_bench(config)
    proc = run_cli(["bench", "--mode=train"], check=False)
    assert proc.returncode == 2 and "--mode=train needs --config" in proc.stderr
