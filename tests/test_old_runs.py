"""Run directories written by an earlier jaxlm resume exactly, or are refused with one line.

tests/data/run_v0_1 was written by jaxlm 0.1.0 as it was before the Task protocol / resolved
config / open_run change (commit 08a745e): 20 steps of configs/tiny_shakespeare.py:runlocal at a
toy size, one checkpoint (step 20) with its data-iterator state. The same code then resumed it to
step 30; tests/data/run_v0_1_resumed_to_30.json holds that run's per-step train/loss and final
eval/loss, which today's code must reproduce: bit for bit on the CPU that recorded them, to 1e-5
elsewhere (XLA's CPU kernels round differently per instruction set: an AMD EPYC gives the same
losses to 1e-7 from step 24 on; a wrong data position or a changed step would be off by 1e-2).
A run from 0.1 has no data.loader in its config.json and resumes with data.loader=token_cache,
the loader that wrote its data position. Its config.json names no local path
(data.train_file and data_dir were blanked), so commands that read data get the corpus by flag.
"""

import json
import os
import shutil

import numpy as np
import pytest

from cli_runner import losses, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "run_v0_1")
REFERENCE = os.path.join(HERE, "data", "run_v0_1_resumed_to_30.json")


@pytest.fixture(scope="module")
def reference():
    with open(REFERENCE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, reference, data_dir):
    workdir = str(tmp_path_factory.mktemp("old") / "run")
    shutil.copytree(FIXTURE, workdir)
    # :runlocal ran 32 rows of 128 tokens when the run was written (16 of 64 today).
    flags = reference["command_flags"].split() + ["--config.global_batch_size=32", "--config.seq_len=128"]
    proc = run_cli(["train", *flags, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"])
    return workdir, flags, proc


def test_an_old_run_resumes_where_it_stopped(resumed, reference):
    workdir, _, _ = resumed
    got = losses(workdir)
    want = {int(k): v for k, v in reference["train_loss"].items()}
    steps = sorted(want)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5, atol=0)
    np.testing.assert_allclose(losses(workdir, "eval/loss")[30], reference["eval_loss"]["30"], rtol=1e-5)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["loader"] == "token_cache"


def test_rerunning_a_finished_run_says_so(resumed, data_dir):
    workdir, flags, _ = resumed
    proc = run_cli(["train", *flags, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"])
    final = proc.stdout.strip().splitlines()[-1]
    assert final.startswith("final (step 30, already finished): train/loss=4.521"), final
    assert "eval/loss=4.489" in final


def test_an_unreadable_run_config_is_refused_in_one_line(tmp_path, reference):
    workdir = str(tmp_path / "run")
    shutil.copytree(FIXTURE, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"task": "causal_lm", "model": ')  # cut short
    before = sorted(os.listdir(workdir))
    proc = run_cli(["train", *reference["command_flags"].split(), f"--workdir={workdir}"], check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxlm: error:")]
    assert len(errors) == 1 and "config.json" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(workdir)) == before


def test_a_workdir_of_another_kind_is_refused_in_one_line(tmp_path, reference):
    workdir = str(tmp_path / "run")
    shutil.copytree(FIXTURE, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2"}, f)  # e.g. a Hugging Face directory
    proc = run_cli(["train", *reference["command_flags"].split(), f"--workdir={workdir}"], check=False)
    assert proc.returncode == 2
    assert "not a jaxlm run config" in proc.stderr and "Traceback" not in proc.stderr
