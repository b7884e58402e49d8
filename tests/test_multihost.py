"""Several processes on localhost (gloo collectives), as hosts of a pod slice would be.

A pod on one machine: 2 processes x 4 CPU devices, each with its own HOME, TMPDIR and caches,
workdir and data on a bucket (a real GCS server on localhost, tests/gcs_server.py), must train
(20 steps) like 1 process x 8 devices on the same mesh; SIGTERM to both saves one agreed step and
the rerun resumes it exactly; a truncated newest checkpoint falls back to the one before. A dead
peer stops the survivor; classification metrics summed over both hosts' shards equal
scikit-learn's.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import sklearn.metrics

from cli_runner import REPO, cli_env, losses, read_metrics, run_cli, runlocal_train
from gcs_server import gcs  # noqa: F401  (the module-scoped fixture)

from jaxlm import cli, io, restore
from sample_data import write_reviews

MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
STEPS = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def train_args(workdir, data_dir):
    return runlocal_train(workdir, data_dir, STEPS, "--config.checkpoint_every=5", *MESH)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(workdir, data_dir, log_dir, args=None, envs=None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    os.makedirs(log_dir, exist_ok=True)
    for i in range(2):
        args_i = (args or train_args(workdir, data_dir)) + [
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
            "--heartbeat_timeout=10"]
        log = open(os.path.join(log_dir, f"process{i}.log"), "w")
        env = cli_env(4, envs[i] if envs else None)
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxlm", *args_i], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_for_step(workdir, procs, step: int, timeout: float = 300) -> None:
    """Returns once process 0 has logged `step` (or a process ended, or time ran out)."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(losses(workdir), default=0) >= step:
            return
        time.sleep(0.05)


def wait_all(procs, timeout=300) -> list[int]:
    """Exit codes; processes still running at the deadline first print their threads' stacks
    into their logs (SIGUSR1, jaxlm/cli.py), then are killed: a hang shows where each host waited."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            running = [q for q in procs if q.poll() is None]
            for q in running:
                q.send_signal(signal.SIGUSR1)
            time.sleep(3)
            for q in running:
                q.kill()
            break
    return [p.wait() for p in procs]


def log_text(log_dir, i) -> str:
    with open(os.path.join(log_dir, f"process{i}.log")) as f:
        return f.read()


def log_tails(log_dir, chars: int = 8000) -> str:
    """Both hosts' last lines, without XLA's sharding-propagation warnings, for a failure."""
    tails = []
    for i in range(2):
        lines = [line for line in log_text(log_dir, i).splitlines() if "spmd_partitioner" not in line]
        tails.append(f"--- process {i} ---\n" + "\n".join(lines)[-chars:])
    return "\n".join(tails)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("one_process"))
    run_cli(train_args(workdir, data_dir), devices=8)
    return workdir


def host_env(root, i: int, gcs) -> dict:  # noqa: F811
    """Host i of a pod: its own HOME, TMPDIR, jaxlm cache and compilation cache; only the
    bucket in common with the other host."""
    env = dict(gcs.env)
    for name, sub in (("HOME", "home"), ("TMPDIR", "tmp"), ("JAXLM_CACHE_DIR", "cache"),
                      ("JAX_COMPILATION_CACHE_DIR", "compile_cache")):
        env[name] = os.path.join(root, f"host{i}", sub)
        os.makedirs(env[name], exist_ok=True)
    return env


def start_pod(hosts, log_dir, workdir, data_dir, gcs) -> list[subprocess.Popen]:  # noqa: F811
    """The two hosts (their directories under `hosts`, kept from one start to the next, as a
    host's disk is) start `jaxlm train`; their consoles go to `log_dir`."""
    args = runlocal_train(workdir, data_dir, STEPS, "--config.checkpoint_every=5", *MESH)
    return start_two(workdir, data_dir, log_dir, args, envs=[host_env(hosts, i, gcs) for i in range(2)])


def bucket_losses(gcs, workdir):  # noqa: F811
    with gcs.environ():
        return {r["step"]: r["train/loss"] for r in io.read_jsonl(f"{workdir}/metrics.jsonl") if "train/loss" in r}


def assert_within_1e6(got, want, steps):
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_a_pod_on_a_bucket_matches_one_process_resumes_sigterm_and_skips_a_corrupt_checkpoint(
        tmp_path, one_process_run, gcs):  # noqa: F811
    """2 processes x 4 devices, each with its own HOME/TMPDIR/caches, workdir and data on the
    bucket. SIGTERM to both saves one agreed step; the rerun resumes it and every step is the
    1 x 8 run's within 1e-6. A copy of the stopped run with its newest checkpoint truncated
    resumes from the one before, again within 1e-6 of the reference at every step."""
    root, prefix = str(tmp_path), gcs.fresh_prefix()
    hosts = os.path.join(root, "hosts")
    workdir, data_dir = f"{prefix}/runs/pod", f"{prefix}/tfds"
    procs = start_pod(hosts, os.path.join(root, "first"), workdir, data_dir, gcs)
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if max(bucket_losses(gcs, workdir) if gcs.object_names(f"{workdir}/metrics.jsonl") else {0: 0}) >= 12:
            break
        time.sleep(0.3)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = wait_all(procs, timeout=180)
    assert codes == [0, 0], log_tails(os.path.join(root, "first"))
    stopped = max(bucket_losses(gcs, workdir))
    with gcs.environ():
        saved = restore.checkpoint_steps(workdir)
    assert saved[-1] == stopped and 12 <= stopped < STEPS, (saved, stopped)
    # Both hosts wrote their data-iterator state into the agreed step, on the bucket.
    names = gcs.object_names(f"{workdir}/checkpoints/{stopped}/data/")
    assert sum(n.endswith(("process_0-of-2.json", "process_1-of-2.json")) for n in names) == 2, names
    # Data: prepared once by process 0 into the bucket; each host staged its own copy.
    assert any(n.endswith("dataset_info.json") for n in gcs.object_names(f"{data_dir}/")), "no prepared data"
    for i in range(2):
        staged = [f for _, _, fs in os.walk(os.path.join(hosts, f"host{i}", "cache")) for f in fs]
        assert any(".array_record" in f for f in staged), f"host {i} has no local copy of the data"

    # A copy of the stopped run whose newest checkpoint lost bytes of one file.
    corrupt = f"{prefix}/runs/corrupt"
    with gcs.environ():
        io.copy_tree(workdir, corrupt)
        victim = max((n for n in gcs.object_names(f"{corrupt}/checkpoints/{stopped}/")
                      if "/state/" in n or "/params/" in n), key=lambda n: int(gcs.objects(n)[n]["size"]))
        url = f"gs://{gcs.bucket}/{victim}"
        io.write_bytes_atomic(url, io.read_bytes(url)[:7])

    procs = start_pod(hosts, os.path.join(root, "resume"), workdir, data_dir, gcs)
    codes = wait_all(procs)
    assert codes == [0, 0], log_tails(os.path.join(root, "resume"))
    assert f"resuming from step {stopped}" in log_text(os.path.join(root, "resume"), 0)
    want, got = losses(one_process_run), bucket_losses(gcs, workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_within_1e6(got, want, range(1, STEPS + 1))

    procs = start_pod(hosts, os.path.join(root, "corrupt"), corrupt, data_dir, gcs)
    codes = wait_all(procs)
    text = log_text(os.path.join(root, "corrupt"), 0)
    assert codes == [0, 0], log_tails(os.path.join(root, "corrupt"))
    previous = max(s for s in saved if s < stopped)
    assert f"step {stopped}" in text and f"resuming from step {previous}" in text, text[-3000:]
    got = bucket_losses(gcs, corrupt)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_within_1e6(got, want, range(1, STEPS + 1))


def test_kill9_of_one_process_stops_the_other_within_60s(tmp_path, data_dir):
    workdir = str(tmp_path / "killed")
    procs = start_two(workdir, data_dir, str(tmp_path))
    wait_for_step(workdir, procs, 3)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        code = procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 still running 60 s after its peer died:\n" + log_text(tmp_path, 0)[-3000:])
    took = time.time() - killed_at
    assert code != 0
    text = log_text(tmp_path, 0)
    # JAX's coordination service stops the survivor and says why (a C++ fatal error: Python
    # cannot add to it, so the test pins jax's own words). Their wording varies by release
    # ("heartbeat timeout", "stopped sending heartbeats"); "another task died" and
    # "heartbeat" appear in each.
    assert "another task died" in text and "heartbeat" in text, text[-3000:]
    assert took < 60


def test_classification_scores_over_two_processes_equal_sklearn(tmp_path, data_dir):
    """A classifier trained and evaluated by 2 processes x 4 devices: 61 eval rows in global
    batches of 16, so each host feeds 8 rows of every batch and the last one is padded. The
    report's confusion matrix and P/R/F1 equal scikit-learn's on the labels that `jaxlm predict`
    (this process, one device) gives the same rows."""
    train_file = write_reviews(tmp_path / "train.csv", 200, seed=0)
    eval_file = write_reviews(tmp_path / "eval.csv", 61, seed=1)
    workdir = str(tmp_path / "classifier")
    args = ["train", "--config=configs/csv_classification.py:runlocal", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.data.train_file={train_file}",
            f"--config.data.eval_file={eval_file}", "--config.data.text_column=review",
            "--config.data.label_column=sentiment", "--config.steps=12", "--config.global_batch_size=16",
            "--config.seq_len=16", "--config.log_every=4", "--config.eval_every=0", "--config.checkpoint_every=0",
            "--config.optim.learning_rate=3e-3", "--config.optim.warmup_steps=2", "--config.mesh.data=8",
            "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
    codes = wait_all(start_two(workdir, data_dir, str(tmp_path), args))
    assert codes == [0, 0], log_text(tmp_path, 0)[-3000:] + log_text(tmp_path, 1)[-3000:]
    final = read_metrics(workdir)[-1]
    with open(os.path.join(workdir, "eval_report.json")) as f:
        report = json.load(f)
    assert final["step"] == 12 and report["num_examples"] == 61

    out = str(tmp_path / "predicted.csv")
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={eval_file}", f"--output={out}"]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = ["negative", "positive"]
    truth = [names.index(r["sentiment"]) for r in rows]
    predicted = [names.index(r["label"]) for r in rows]
    assert set(predicted) == {0, 1}, "a classifier that predicts one class would test little"
    np.testing.assert_array_equal(report["confusion_matrix"], sklearn.metrics.confusion_matrix(truth, predicted))
    assert report["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(truth, predicted), abs=1e-12)
    for name, fn in (("precision", sklearn.metrics.precision_score), ("recall", sklearn.metrics.recall_score),
                     ("f1", sklearn.metrics.f1_score)):
        assert report[name] == pytest.approx(fn(truth, predicted, pos_label=1, zero_division=0), abs=1e-12), name
        assert report[f"{name}_macro"] == pytest.approx(
            fn(truth, predicted, average="macro", zero_division=0), abs=1e-12), name
    assert final["eval/f1"] == pytest.approx(report["f1"])
