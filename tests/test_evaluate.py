"""`jaxlm eval`: checkpoints written on 8 devices (fsdp=8; data=2,fsdp=2,tensor=2) evaluate on one
device to the in-training eval/loss; params-only restore into any sharding; another eval file;
the results files; user errors (one line, exit 2, nothing written)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runner import REPO, cli_env, read_metrics
from jaxlm import cli, restore, sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.trainer import Trainer

CONFIG = "configs/tiny_shakespeare.py:runlocal"
MESHES = {
    "fsdp8": ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"],
    "d2f2t2": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
               "--config.best_metric=eval/accuracy"],  # also keeps DIR/best for --best
}
EVAL_STEP = {"fsdp8": 5, "d2f2t2": 10}  # one earlier checkpoint (--step), one latest (default)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory, data_dir):
    """10 steps on 8 fake devices, evaluated in training at steps 5 and 10 (this process has 8)."""
    runs = {}
    for name, flags in MESHES.items():
        workdir = str(tmp_path_factory.mktemp(name))
        if runs:  # The same BPE the first run trained: no need to train it again.
            shutil.copytree(os.path.join(next(iter(runs.values())), "tokenizer"), os.path.join(workdir, "tokenizer"))
        assert cli.main(["train", f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                         "--config.steps=10", "--config.log_every=5", "--config.eval_every=5",
                         "--config.checkpoint_every=5", *flags]) == 0
        runs[name] = workdir
    return runs


@pytest.fixture(scope="module")
def one_device_evals(mesh_runs):
    """`jaxlm eval` of each run in a 1-device subprocess (both at once: they mostly wait on imports)."""
    procs = {}
    for name, workdir in mesh_runs.items():
        step = ["--step=5"] if EVAL_STEP[name] == 5 else []
        procs[name] = subprocess.Popen([sys.executable, "-m", "jaxlm", "eval", f"--workdir={workdir}", *step],
                                       cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = stdout
    return out


@pytest.mark.parametrize("mesh", list(MESHES))
def test_one_device_eval_equals_in_training_eval(mesh, mesh_runs, one_device_evals):
    workdir, step = mesh_runs[mesh], EVAL_STEP[mesh]
    in_training = {r["step"]: r for r in read_metrics(workdir) if "eval/loss" in r}
    assert sorted(in_training) == [5, 10]
    with open(os.path.join(workdir, "eval", f"eval_step{step}.json")) as f:
        result = json.load(f)
    assert result["step"] == step and result["devices"] == 1 and result["split"] == "eval"
    for key in ("eval/loss", "eval/accuracy", "eval/bits_per_byte", "eval/perplexity"):
        want, got = in_training[step][key], result[key]
        assert abs(got - want) <= 1e-5 * abs(want), f"{key}: one device {got} vs {mesh} in training {want}"
    printed = one_device_evals[mesh]
    assert f"eval at step {step}" in printed and "eval/loss" in printed
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "eval", "eval")))


def test_params_restore_into_another_sharding(mesh_runs, eight_devices):
    """fsdp=8's checkpoint read straight into data=4,tensor=2 shardings: params only, the same values."""
    workdir = mesh_runs["fsdp8"]
    config = restore.load_run_config(workdir, {"mesh.data": "4", "mesh.tensor": "2"})
    trainer = Trainer(config, sharding.make_mesh(config.mesh))
    params = restore.restore_params(restore.find_checkpoint(workdir), trainer.abstract_params,
                                    trainer.param_shardings)
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), params, trainer.param_shardings)
    checkpointer = Checkpointer(workdir, with_data=False)
    state = checkpointer.restore(10, trainer.abstract_sharded_state())  # the full TrainState
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, params, state.params)
    # A kernel sharded over tensor actually is (so the restore did not just replicate everything).
    kernel = params["body"]["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_eval_of_another_file(tmp_path, mesh_runs, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(mesh_runs["d2f2t2"], workdir)
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Sonnet {i}: shall I compare thee to a summer's day?" for i in range(300)))
    assert cli.main(["eval", f"--workdir={workdir}", f"--config.data.eval_file={other}"]) == 0
    with open(os.path.join(workdir, "eval", "eval_step10.json")) as f:
        result = json.load(f)
    with open(os.path.join(mesh_runs["d2f2t2"], "eval", "eval_step10.json")) as f:
        original = json.load(f)
    assert np.isfinite(result["eval/loss"]) and result["eval/loss"] != original["eval/loss"]
    assert "eval at step 10" in capsys.readouterr().out


def test_eval_of_the_best_checkpoint(tmp_path, mesh_runs):
    workdir = str(tmp_path / "run")
    shutil.copytree(mesh_runs["d2f2t2"], workdir)
    with open(os.path.join(workdir, "best.json")) as f:
        best = json.load(f)
    assert cli.main(["eval", f"--workdir={workdir}", "--best"]) == 0
    with open(os.path.join(workdir, "eval", f"eval_step{best['step']}.json")) as f:
        result = json.load(f)
    assert result["checkpoint"].endswith(os.path.join("best", str(best["step"]), "params"))
    in_training = {r["step"]: r for r in read_metrics(workdir) if "eval/loss" in r}[best["step"]]
    assert abs(result["eval/loss"] - in_training["eval/loss"]) <= 1e-5 * in_training["eval/loss"]
    assert result["eval/accuracy"] == pytest.approx(best["value"], rel=1e-5)


def snapshot(directory: str) -> dict:
    return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
            for root, _, files in os.walk(directory) for f in files}


@pytest.mark.parametrize("args,needle", [
    (["--step=7"], "--step=7: no such checkpoint"),
    (["--best"], "best.json not found"),
    (["--split=test"], "--split=test"),
    (["--config.data.eval_file=/nonexistent/eval.txt"], "/nonexistent/eval.txt"),
    (["--config.model.nonsense=1"], "unknown config field"),
], ids=["missing-step", "no-best", "split-of-files", "missing-eval-file", "unknown-field"])
def test_eval_user_errors_write_nothing(capsys, mesh_runs, args, needle):
    workdir = mesh_runs["fsdp8"]
    before = snapshot(workdir)
    code = cli.main(["eval", f"--workdir={workdir}", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("jaxlm: error: ") and needle in lines[-1], lines[-3:]
    assert snapshot(workdir) == before


def test_eval_without_checkpoint(capsys, tmp_path, mesh_runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["eval", f"--workdir={empty}"]) == 2
    assert "config.json not found" in capsys.readouterr().err.strip().splitlines()[-1]
    shutil.copy(os.path.join(mesh_runs["fsdp8"], "config.json"), empty / "config.json")
    assert cli.main(["eval", f"--workdir={empty}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(os.listdir(empty)) == ["config.json"]
