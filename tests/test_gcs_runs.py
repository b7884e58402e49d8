"""A run directory on a bucket (`--workdir=gs://bkt/…`), one process, against a real GCS server
on localhost (tests/gcs_server.py); the data stays local. The endpoint variables go only to the
`jaxlm train` processes; this process reads the bucket through jaxlm.io inside gcs.environ().

- kill -9 at a random step after the first checkpoint, rerun: every step's train/loss is bitwise
  the uninterrupted local run's, and the run directory's pieces are on the bucket: that test runs
  with the data on the bucket too (test_gcs_data.py), one run covering both.
- kill -9 while the step-10 checkpoint is being uploaded: the rerun resumes from step 5.
- the run's tokenizer and the TensorBoard writer at library level.
"""

import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from cli_runner import REPO, cli_env, losses, run_cli, runlocal_train
from gcs_server import gcs  # noqa: F401  (the module-scoped fixture)

from jaxlm import io, restore, writers
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

STEPS = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def train_args(workdir, data_dir):
    return runlocal_train(workdir, data_dir, STEPS, "--config.checkpoint_every=5", "--config.best_metric=eval/loss",
                          "--config.best_mode=min")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("local"))
    run_cli(train_args(workdir, data_dir))
    return workdir


def bucket_losses(gcs, workdir, key="train/loss"):  # noqa: F811
    with gcs.environ():
        return {r["step"]: r[key] for r in io.read_jsonl(f"{workdir}/metrics.jsonl") if key in r}


def start_train(gcs, workdir, data_dir, log_path):  # noqa: F811
    """`jaxlm train` on the bucket; the endpoint variables in its environment only."""
    return subprocess.Popen([sys.executable, "-m", "jaxlm", *train_args(workdir, data_dir)], cwd=REPO,
                            env=cli_env(1, gcs.env), stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def kill9_when(proc, ready, what: str) -> None:
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before {what}"
        proc.kill()  # SIGKILL
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def tensorboard_losses(gcs, workdir, tmp_path):  # noqa: F811
    """(event file, step, train/loss) for every train/loss event in the bucket's event files."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    found = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    with gcs.environ():
        names = [n for n in io.list_dir(workdir) if n.startswith("events.out.tfevents.")]
        for name in names:
            io.copy_file(f"{workdir}/{name}", tmp_path / name)
    for name in names:
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / name)):
            for value in event.summary.value:
                if value.tag == "train/loss":
                    found.append((name, event.step, float(np.float32(tf.make_ndarray(value.tensor)))))
    return found


def test_kill9_during_a_checkpoint_upload_resumes_from_the_previous(gcs, data_dir, local_run, tmp_path):  # noqa: F811
    workdir = gcs.url("runs/mid_save")
    log = tmp_path / "killed.log"
    proc = start_train(gcs, workdir, data_dir, str(log))
    kill9_when(proc, lambda: "saving step 10" in log.read_text(), "the step-10 save")
    step10 = gcs.object_names(f"{workdir}/checkpoints/10/")
    assert step10 and not any(n.endswith("/10/commit_success.txt") for n in step10), step10  # Cut mid-upload.
    with gcs.environ():
        assert restore.checkpoint_steps(workdir) == [5]
    proc = run_cli(train_args(workdir, data_dir), env=gcs.env)
    assert "resuming from step 5" in proc.stderr
    assert bucket_losses(gcs, workdir) == losses(local_run)
    with gcs.environ():
        assert restore.checkpoint_steps(workdir) == [10, 15, 20]


def test_the_runs_tokenizer_is_uploaded_whole_and_loaded_back(gcs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    texts = [f"document {i}: to be or not to be, that is question {i % 7}" for i in range(200)]
    data_config = ml_collections.ConfigDict(dict(tokenizer="bpe", bpe_vocab_size=300, bpe_sample_mb=1))
    with gcs.environ():
        workdir = gcs.fresh_prefix()
        with pytest.raises(UserError, match=r"data\.tokenizer=bpe: gs://.*/tokenizer is missing"):
            tokenizer_lib.load_tokenizer("bpe", workdir)
        trained = tokenizer_lib.run_tokenizer(data_config, [(texts, 1.0)], workdir)
        meta = {n.rsplit("/", 1)[1]: int(m["generation"]) for n, m in gcs.objects(f"{workdir}/tokenizer/").items()}
        assert "tokenizer_config.json" in meta and max(meta, key=meta.get) == "tokenizer.json"  # The marker last.
        first = io.read_bytes(f"{workdir}/tokenizer/tokenizer.json")
        loaded = tokenizer_lib.load_tokenizer("bpe", workdir)
        assert loaded.name_or_path.startswith(str(tmp_path / "cache" / "bucket_copies"))
        sample = "to be or not to be, that is document 12"
        assert loaded.encode(sample) == trained.encode(sample) and len(loaded) == len(trained) == 300
        assert os.listdir(tmp_path / "cache") == ["bucket_copies"]  # The training scratch is gone.
        # An upload cut before its marker counts as no tokenizer: trained again, to the same bytes.
        io.remove(f"{workdir}/tokenizer/tokenizer.json")
        with pytest.raises(UserError, match="is missing"):
            tokenizer_lib.load_tokenizer("bpe", workdir)
        tokenizer_lib.run_tokenizer(data_config, [(texts, 1.0)], workdir)
        assert io.read_bytes(f"{workdir}/tokenizer/tokenizer.json") == first


def test_tensorboard_events_reach_the_bucket_at_each_flush(gcs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    with gcs.environ():
        workdir = gcs.fresh_prefix()
        writer = writers.BucketSummaryWriter(workdir)
        assert writer.local_dir.startswith(str(tmp_path / "cache" / "tensorboard"))
        writer.write_scalars(1, {"train/loss": np.float32(2.5)})
        writer.flush()
        assert tensorboard_losses(gcs, workdir, tmp_path / "first") == [(os.listdir(writer.local_dir)[0], 1, 2.5)]
        writer.write_scalars(2, {"train/loss": np.float32(2.25)})
        writer.close()
        assert [e[1:] for e in tensorboard_losses(gcs, workdir, tmp_path / "second")] == [(1, 2.5), (2, 2.25)]
        assert os.listdir(tmp_path / "cache" / "tensorboard") == []  # The scratch directory went at close.
