"""`jaxlm scaling run|list`: the size rule, the counted N and FLOPs (against the model and the
compiled step), and a real sweep of two micro runs killed with SIGKILL in its second run, then
rerun: the finished run is left alone, the killed one resumes from its checkpoint."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cli_runner import REPO, cli_env, read_metrics
from conftest import tiny_bert_config, tiny_config, tiny_llama_config
from jaxlm import config as config_lib
from jaxlm.errors import UserError
from jaxlm.models import Model, ModelConfig
from jaxlm.scaling import config as scaling_config
from jaxlm.scaling import settings as scaling_settings
from jaxlm.scaling import points, sizes
from jaxlm.scaling.flops_check import analytic_flops_per_step, compiled_flops_per_step
from jaxlm.scaling.progress import SweepProgress

RECIPE = "configs/scaling_tiny_shakespeare.py"


@pytest.mark.parametrize("make", [tiny_config, tiny_llama_config, tiny_bert_config], ids=["gpt2", "llama", "bert"])
def test_non_embedding_params_match_the_model(make):
    cfg = make()
    params = nn.unbox(jax.eval_shape(lambda: Model(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    flat = flax.traverse_util.flatten_dict(params)
    embeddings = sum(v.size for k, v in flat.items()
                     if k[:2] == ("body", "embed") and k[2] in ("token", "position", "token_type") or k[0] == "lm_head")
    total = sum(v.size for v in flat.values())
    assert sizes.non_embedding_params(cfg) == total - embeddings
    assert sizes.embedding_params(cfg) == embeddings


def recipe(**overrides):
    config = config_lib.load_recipe(RECIPE, overrides)
    return config, scaling_settings.settings(config, {})


def test_size_rule_and_plan():
    config, s = recipe()
    runs, notes = sizes.plan(config, s, [1e5, 3.3e5, 8e5], [2e5, 6e5], [])
    assert notes == [] and len(runs) == 6 and len({r.name for r in runs}) == 6
    per_step = config.global_batch_size * config.seq_len
    for run in runs:
        layers, width = int(run.overrides["model.num_layers"]), int(run.overrides["model.d_model"])
        assert width % 32 == 0 and int(run.overrides["model.num_heads"]) == width // 32
        assert int(run.overrides["model.d_ff"]) == 4 * width
        assert 0.5 < (width / layers) / s.aspect_ratio < 2
        assert 1 / 1.5 < run.params / run.target_params < 1.5
        assert run.steps == round(run.tokens / per_step) and run.tokens % per_step == 0
        cfg = ModelConfig.from_dict(
            {**config.model.to_dict(), "vocab_size": 1024, "num_layers": layers, "d_model": width,
             "num_heads": width // 32, "d_ff": 4 * width})
        assert run.params == sizes.non_embedding_params(cfg)
        assert run.flops == pytest.approx(run.tokens * sizes.run_flops_per_token(cfg, config.seq_len))
    assert sorted({r.tokens for r in runs}) == [98 * per_step, 293 * per_step]

    iso, notes = sizes.plan(config, s, [], [], [3e12, 1e13])
    # Sizes that round to the same model (widths are multiples of 32) are planned once.
    assert len(iso) + len(notes) == 2 * s.isoflop_sizes and all("same model" in n for n in notes)
    assert len({r.name for r in iso}) == len(iso)
    for run in iso:
        assert run.flops == pytest.approx(run.budget, rel=0.01) and run.name.startswith(f"C{run.budget:.3g}-")


def test_settings_and_flag_errors():
    config, _ = recipe()
    config.scaling = ml_collections.ConfigDict({"aspect_ratio": 64.0})  # As a recipe would set it once merged.
    s = scaling_settings.settings(config, {"scaling.head_dim": "64"})
    assert (s.aspect_ratio, s.head_dim, s.ffn_ratio) == (64.0, 64, 4.0)
    with pytest.raises(UserError, match="scaling.aspect_ratio"):
        scaling_settings.settings(config, {"scaling.aspect_ratio": "-1"})
    with pytest.raises(UserError, match="unknown config field 'scaling.nope'"):
        scaling_settings.settings(config, {"scaling.nope": "1"})
    assert scaling_config.parse_numbers("1e5, 300k,1.5M,2B", "--sizes") == [1e5, 3e5, 1.5e6, 2e9]
    with pytest.raises(UserError, match="--sizes=1e5,abc"):
        scaling_config.parse_numbers("1e5,abc", "--sizes")
    with pytest.raises(UserError, match="--tokens and --budgets"):
        sizes.plan(config, s, [1e5], [1e6], [1e12])


def test_progress_eta_counts_flops_trained_here():
    stream = io.StringIO()
    bar = SweepProgress(total_flops=4e12, done_flops=1e12, stream=stream, plain_interval=0)
    bar.start -= 10.0  # 10 s ago.
    bar.update(2e12, "run 2/4")  # 1e12 trained in 10 s: 2e12 left takes 20 s.
    line = stream.getvalue().strip()
    assert " 50%" in line and "run 2/4" in line and "ETA 0:20" in line and "0:10 elapsed" in line


def test_counted_flops_match_the_compiled_step():
    """The analytic count (6 x matmul params + attention, per token) against XLA's cost analysis
    of the real train step, its layer scan weighted by trip count: within 5% at the recipe's
    head width (32), its smallest width (64) and its batch (16 x 128)."""
    config = config_lib.load_recipe(RECIPE, {"model.num_layers": "2", "model.d_model": "64", "model.num_heads": "2",
                                             "model.d_ff": "256", "model.vocab_size": "1024",
                                             "global_batch_size": "16", "seq_len": "128"})
    saved = json.loads(config_lib.to_json(config))
    compiled, loops = compiled_flops_per_step(saved)
    analytic = analytic_flops_per_step(saved)
    assert [loop["trips"] for loop in loops] == [2, 2]  # Forward and backward scans over the 2 layers.
    assert abs(compiled / analytic - 1) <= 0.05, compiled / analytic


# == A real sweep, killed and resumed ================================================================

MICRO = ["--sizes=3k,12k", "--tokens=51200", "--config.global_batch_size=8", "--config.seq_len=32",
         "--config.log_every=1", "--config.checkpoint_every=50", "--config.keep_checkpoints=5",
         "--config.eval_batches=2", "--config.scaling.head_dim=16", "--config.scaling.width_multiple=16",
         "--config.scaling.aspect_ratio=16"]
STEPS = 200  # 51200 tokens / (8 x 32) a step.


def scaling_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxlm", "scaling", *args]


def planned_run_dirs(workdir: str, timeout: float = 120) -> list[str]:
    """The sweep's run directories in the order it trains them (DIR/sweep.json, written first)."""
    path, deadline = os.path.join(workdir, "sweep.json"), time.time() + timeout
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
    runs = json.loads(_read(path))["runs"]
    return [os.path.join(workdir, "runs", name) for name in sorted(runs, key=lambda n: runs[n]["target_params"])]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_kill9_skips_the_finished_run_and_resumes_the_killed_one(tmp_path):
    workdir = str(tmp_path / "sweep")
    args = ["run", f"--config={RECIPE}", f"--workdir={workdir}", "--no-fit",
            f"--config.data.data_dir={tmp_path / 'tfds'}", *MICRO]
    env = cli_env(1)
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(scaling_cli(*args), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first, second = planned_run_dirs(workdir)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = os.path.join(second, "metrics.jsonl")
            if os.path.exists(metrics) and max((r["step"] for r in read_metrics(second)), default=0) >= 70:
                break
            time.sleep(0.05)
        assert proc.poll() is None, _read(tmp_path / "sweep.log").decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(2)  # The run's process dies with the sweep's (PR_SET_PDEATHSIG): its metrics stop growing.
    killed_metrics = _read(os.path.join(second, "metrics.jsonl"))
    time.sleep(1)
    assert _read(os.path.join(second, "metrics.jsonl")) == killed_metrics
    saved = max(int(s) for s in os.listdir(os.path.join(second, "checkpoints")) if s.isdigit())
    assert 50 <= saved < STEPS
    finished_before = {name: _read(os.path.join(first, name)) for name in ("metrics.jsonl", "console.log")}

    rerun = subprocess.run(scaling_cli(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 2 runs already finished: skipped" in rerun.stderr
    # The finished run: not retrained, not even started again.
    for name, before in finished_before.items():
        assert _read(os.path.join(first, name)) == before, name
    # The killed run: the steps up to its checkpoint kept byte for byte, then continued to the end.
    steps = [r["step"] for r in read_metrics(second)]
    assert steps == list(range(1, STEPS + 1))
    kept = [line for line in killed_metrics.splitlines(keepends=True) if json.loads(line)["step"] <= saved]
    assert _read(os.path.join(second, "metrics.jsonl")).startswith(b"".join(kept))
    assert _read(os.path.join(second, "console.log")).count(b"$ jaxlm train") == 2

    # `list` prints the very commands the sweep ran, now commented out as finished.
    listing = subprocess.run(scaling_cli(*(["list"] + args[1:3] + args[4:])), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    lines = [line for line in listing.stdout.splitlines() if line.startswith("# finished: ")]
    ran = [_read(os.path.join(d, "console.log")).decode().splitlines()[0][2:] for d in (first, second)]
    assert [line[len("# finished: "):] for line in lines] == ran

    # What the fit takes from a run: N from its model, D from its steps, its final eval loss.
    point, why = points.run_point(first)
    config = json.loads(_read(os.path.join(first, "config.json")))
    cfg = config_lib.model_config(ml_collections.ConfigDict(config))
    assert why == "" and point.N == sizes.non_embedding_params(cfg) and point.D == STEPS * 8 * 32
    assert point.loss == read_metrics(first)[-1]["eval/loss"] and point.steps == STEPS
