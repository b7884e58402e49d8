"""Data on a bucket (data.data_dir=gs://…, data.train_file=gs://…), against a real GCS server on
localhost (tests/gcs_server.py). Each `jaxlm train` process plays one host: its own
JAXLM_CACHE_DIR is that host's disk; only the bucket is shared.

- kill -9 at a random step after the first checkpoint, with the run and its prepared data on the
  bucket; the rerun, on a fresh host (empty cache), stages the dataset from the bucket and logs
  every step's train/loss bitwise as the uninterrupted local run (local workdir and data_dir).
  The run directory on the bucket has what a local one has: config.json, the tokenizer,
  checkpoints, best/, the eval report, jaxlm.log and TensorBoard events with every step's loss.
- train files from a bucket glob: the same prepared dataset (content hash) and the same losses as
  the local file; comma-separated local + bucket mixes hash as the same bytes locally.
- a classification CSV on a bucket, prepared into a bucket data_dir: the rows the local one gives.
- a prepared tfds dataset on a bucket: only the splits read are staged, a rewritten object is
  staged anew, an unchanged one never again.
- several hosts: only process 0 prepares; the others wait for its upload or its error report.
- user mistakes: a bucket glob that matches nothing names the field.
"""

import os
import random
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cli_runner import REPO, cli_env, losses, run_cli
from gcs_server import gcs  # noqa: F401  (the module-scoped fixture)
from sample_data import write_reviews
from test_gcs_runs import STEPS, bucket_losses, kill9_when, tensorboard_losses, train_args

from jaxlm import io, restore
from jaxlm import run as run_lib
from jaxlm.data import bucket_data, builders, classification_data, corpora, sources
from jaxlm.errors import UserError

TEXT_BUILDER = "jaxlm_text_files"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The uninterrupted run with everything local: (workdir, data_dir)."""
    workdir, data_dir = str(tmp_path_factory.mktemp("local")), str(tmp_path_factory.mktemp("local_tfds"))
    run_cli(train_args(workdir, data_dir))
    return workdir, data_dir


def host_env(gcs, cache_dir) -> dict:  # noqa: F811
    """One host's environment: the bucket's endpoint and its own disk cache."""
    return {**gcs.env, "JAXLM_CACHE_DIR": str(cache_dir)}


def only_version_dir(root) -> str:
    """The one NAME/CONFIG/VERSION directory of the text builder under a tfds data_dir."""
    found = [os.path.join(dirpath) for dirpath, _, files in os.walk(root) if "dataset_info.json" in files]
    assert len(found) == 1, found
    return found[0]


def test_kill9_with_data_on_a_bucket_then_rerun_on_a_fresh_host_is_bitwise_the_local_run(
        gcs, local_run, tmp_path):  # noqa: F811
    prefix = gcs.fresh_prefix()
    workdir, data_dir = f"{prefix}/runs/a", f"{prefix}/tfds"
    killed_host, fresh_host = tmp_path / "host_a_cache", tmp_path / "host_b_cache"
    kill_after = random.Random().randint(7, STEPS - 6)  # After the first checkpoint (step 5).
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm", *train_args(workdir, data_dir)], cwd=REPO,
                            env=cli_env(1, host_env(gcs, killed_host)), stdout=open(tmp_path / "killed.log", "w"),
                            stderr=subprocess.STDOUT)
    kill9_when(proc, lambda: max(bucket_losses(gcs, workdir), default=0) >= kill_after, f"step {kill_after}")
    logged_before_kill = max(bucket_losses(gcs, workdir))
    assert logged_before_kill < STEPS

    # The bucket holds the preparation, its marker uploaded last.
    local_version = only_version_dir(local_run[1])
    relative = os.path.relpath(local_version, local_run[1])
    assert relative.startswith(f"{TEXT_BUILDER}/tiny_shakespeare_")
    uploaded = gcs.objects(f"{data_dir}/{relative}/")
    generations = {name.rsplit("/", 1)[1]: int(meta["generation"]) for name, meta in uploaded.items()}
    assert sorted(generations) == sorted(os.listdir(local_version))
    assert max(generations, key=generations.get) == "dataset_info.json"

    proc = run_cli(train_args(workdir, data_dir), env=host_env(gcs, fresh_host))
    assert proc.stdout.startswith(f"final (step {STEPS},"), proc.stdout
    assert "resuming from step" in proc.stderr
    want, got = losses(local_run[0]), bucket_losses(gcs, workdir)
    assert sorted(got) == list(range(1, STEPS + 1)), f"killed after step {logged_before_kill}"
    for step in range(1, STEPS + 1):  # Bitwise: the JSON floats are the float32 losses, exactly.
        assert got[step] == want[step], f"step {step} differs after a kill at {logged_before_kill}"
    assert bucket_losses(gcs, workdir, "eval/loss") == losses(local_run[0], "eval/loss")
    assert_bucket_run_dir_matches_the_local_one(gcs, workdir, local_run[0], tmp_path / "events")

    # The fresh host staged its own copy from the bucket: the same bytes as the bucket's objects,
    # and the shards are the local preparation's.
    staged = only_version_dir(fresh_host / "bucket_data")
    assert os.path.relpath(staged, os.path.dirname(os.path.dirname(os.path.dirname(staged)))) == relative
    with gcs.environ():
        for name in generations:
            assert open(os.path.join(staged, name), "rb").read() == io.read_bytes(f"{data_dir}/{relative}/{name}")
        log = io.read_text(f"{workdir}/jaxlm.log")
    for name in os.listdir(staged):
        if ".array_record-" in name:
            assert open(os.path.join(staged, name), "rb").read() == open(os.path.join(local_version, name),
                                                                          "rb").read()
    assert "data: staged 5 files" in log and f"{data_dir}/{relative} -> {fresh_host}" in log
    # Token caches stay on the host; the bucket holds the preparation only.
    assert not [n for n in gcs.object_names(data_dir) if "token_cache" in n]
    host_caches = [f for _, _, files in os.walk(fresh_host / "bucket_data") for f in files if f.endswith(".npy")]
    assert len(host_caches) == 1, host_caches  # The eval split's, for the final evaluation.


def assert_bucket_run_dir_matches_the_local_one(gcs, workdir, local_workdir, scratch):  # noqa: F811
    """A killed-and-rerun run on the bucket holds what the uninterrupted local run holds."""
    with gcs.environ():
        records = io.read_jsonl(f"{workdir}/metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "each step once, in order"
        saved, local = io.read_json(f"{workdir}/config.json"), io.read_json(os.path.join(local_workdir, "config.json"))
        assert saved["data"].pop("data_dir") != local["data"].pop("data_dir") and saved == local
        assert io.read_bytes(f"{workdir}/tokenizer/tokenizer.json") == io.read_bytes(
            os.path.join(local_workdir, "tokenizer", "tokenizer.json"))
        assert restore.checkpoint_steps(workdir) == restore.checkpoint_steps(local_workdir) == [10, 15, 20]
        assert io.read_json(f"{workdir}/eval_report.json") == io.read_json(os.path.join(local_workdir, "eval_report.json"))
        # best/ (orbax, synchronous) and best.json; the params read back from the bucket as a
        # finished run is opened (config.json, the tokenizer's local copy, a partial restore).
        best = io.read_json(f"{workdir}/best.json")
        assert best["step"] == STEPS and best["params"] == f"{workdir}/best/{STEPS}/params"
        assert best["value"] == io.read_json(os.path.join(local_workdir, "best.json"))["value"]
        opened, local_opened = run_lib.open_run(workdir, best=True), run_lib.open_run(local_workdir, best=True)
        assert opened.step == STEPS and opened.tokenizer.get_vocab() == local_opened.tokenizer.get_vocab()
        for a, b in zip(jax.tree.leaves(opened.params), jax.tree.leaves(local_opened.params), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        # jaxlm.log: uploaded when the command ended; the killed command never got there.
        log = io.read_text(f"{workdir}/jaxlm.log")
        assert log.count("resuming from step") == 1 and log.count("model: 182,016 parameters") == 1
        assert f"checkpoint: saving step {STEPS} to {workdir}/checkpoints" in log
    # TensorBoard: two event files (killed run, rerun), every step's loss the local run's.
    events = tensorboard_losses(gcs, workdir, scratch)
    assert len({name for name, _, _ in events}) == 2
    assert {step for _, step, _ in events} == set(range(1, STEPS + 1))
    want = losses(local_workdir)
    for name, step, loss in events:
        assert loss == want[step], f"{name}: step {step}"


def test_train_files_from_a_bucket_glob_are_the_local_files_dataset_and_losses(gcs, local_run, tmp_path):  # noqa: F811
    prefix = gcs.fresh_prefix()
    corpus = corpora.path("tiny_shakespeare")
    with gcs.environ():
        io.copy_file(corpus, f"{prefix}/corpus/tiny_shakespeare.txt")
        io.write_text_atomic(f"{prefix}/corpus/notes.md", "not text for training\n")  # The glob skips it.
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    # The reference's own flags (its losses depend on the step count through the schedule).
    run_cli([*train_args(str(workdir), str(data_dir)), f"--config.data.train_file={prefix}/corpus/*.txt"],
            env=host_env(gcs, tmp_path / "cache"))
    assert os.listdir(data_dir / TEXT_BUILDER) == os.listdir(os.path.join(local_run[1], TEXT_BUILDER))
    assert losses(str(workdir)) == losses(local_run[0])

    # Comma-separated mixes of local paths and bucket globs; the hash is of the bytes, not the place.
    for i, text in enumerate(["first part\n\nof a corpus\n", "second part\n"]):
        (tmp_path / f"part{i}.txt").write_text(text)
    with gcs.environ():
        for i in range(2):
            io.copy_file(tmp_path / f"part{i}.txt", f"{prefix}/parts/part{i}.txt")
        mixed = builders.resolve_files(f"{tmp_path / 'part0.txt'}, {prefix}/parts/part[1-9].txt", "data.train_file")
        assert mixed == (str(tmp_path / "part0.txt"), f"{prefix}/parts/part1.txt")
        in_bucket = builders.resolve_files(f"{prefix}/parts/**/*.txt", "data.train_file")
        assert in_bucket == (f"{prefix}/parts/part0.txt", f"{prefix}/parts/part1.txt")
        local = builders.resolve_files(str(tmp_path / "part*.txt"), "data.train_file")
        assert builders.content_hash({}, in_bucket) == builders.content_hash({}, local)
        assert builders.content_hash({}, in_bucket) != builders.content_hash({}, local[::-1])


def labeled_config(train_file, eval_file, data_dir):
    return ml_collections.ConfigDict(dict(
        train_file=train_file, eval_file=eval_file, eval_fraction=0.1, file_format="auto", text_column="review",
        text_pair_column="", label_column="sentiment", label_names=(), num_labels=0, label_kind="", tfds_name="",
        data_dir=data_dir))


def test_a_classification_csv_on_a_bucket_gives_the_local_files_rows(gcs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    train, evaluation = write_reviews(tmp_path / "train.csv", 120, seed=0), write_reviews(tmp_path / "eval.csv", 30, 1)
    local = classification_data.load_labeled_corpus(labeled_config(train, evaluation, str(tmp_path / "tfds")),
                                                    str(tmp_path / "tfds"))
    prefix = gcs.fresh_prefix()
    with gcs.environ():
        io.copy_file(train, f"{prefix}/csv/train.csv")
        io.copy_file(evaluation, f"{prefix}/csv/eval.csv")
        config = labeled_config(f"{prefix}/csv/train.csv", f"{prefix}/csv/eval.csv", f"{prefix}/tfds")
        remote = classification_data.load_labeled_corpus(config, config.data_dir)
        assert gcs.object_names(f"{prefix}/tfds/{remote.dataset_id}/")  # Prepared into the bucket.
    assert remote.dataset_id == local.dataset_id and remote.label_names == local.label_names
    for a, b in ((remote.train, local.train), (remote.eval, local.eval)):
        assert a.texts == b.texts and a.labels.tolist() == b.labels.tolist()


class JaxlmBucketSentences(tfds.core.GeneratorBasedBuilder):
    """A tiny registered tfds dataset with three splits (a run reads two of them)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in (("train", 40), ("test", 8), ("extra", 5))}

    def _generate_examples(self, split, count):
        for i in range(count):
            yield i, {"text": f"{split} sentence {i}: to be or not to be"}


def test_a_tfds_dataset_on_a_bucket_is_staged_once_per_content(gcs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    local_dir = str(tmp_path / "local_tfds")
    tfds.disable_progress_bar()
    JaxlmBucketSentences(data_dir=local_dir, file_format="array_record").download_and_prepare()
    config = ml_collections.ConfigDict(dict(train_file="", tfds_name="jaxlm_bucket_sentences", text_key="text",
                                            train_split="train[:50%]", eval_split="test", data_dir=""))
    local = sources.load_corpus(config, local_dir)
    prefix = gcs.fresh_prefix()
    with gcs.environ():
        with pytest.raises(UserError, match=r"not prepared in data\.data_dir=gs://.*then copy DIR/jaxlm_bucket_sen"):
            sources.load_corpus(config, f"{prefix}/tfds")
        io.copy_tree(os.path.join(local_dir, "jaxlm_bucket_sentences"), f"{prefix}/tfds/jaxlm_bucket_sentences",
                     last="1.0.0/dataset_info.json")
        remote = sources.load_corpus(config, f"{prefix}/tfds")
        assert remote.dataset_id == local.dataset_id
        assert list(remote.train) == list(local.train) and list(remote.eval) == list(local.eval)
        staged = only_version_dir(tmp_path / "cache" / "bucket_data")
        assert not [n for n in os.listdir(staged) if "-extra." in n]  # Only the splits the run reads.
        assert sorted(n for n in os.listdir(staged) if ".array_record-" in n) == [
            "jaxlm_bucket_sentences-test.array_record-00000-of-00001",
            "jaxlm_bucket_sentences-train.array_record-00000-of-00001"]
        stamp = os.stat(os.path.join(staged, "dataset_info.json")).st_mtime_ns
        sources.load_corpus(config, f"{prefix}/tfds")  # Unchanged on the bucket: nothing copied again.
        assert only_version_dir(tmp_path / "cache" / "bucket_data") == staged
        assert os.stat(os.path.join(staged, "dataset_info.json")).st_mtime_ns == stamp
        # A shard rewritten on the bucket (a new generation) gets a fresh copy beside the old one.
        shard = "1.0.0/jaxlm_bucket_sentences-train.array_record-00000-of-00001"
        io.copy_file(os.path.join(local_dir, "jaxlm_bucket_sentences", shard),
                     f"{prefix}/tfds/jaxlm_bucket_sentences/{shard}")
        again = sources.load_corpus(config, f"{prefix}/tfds")
        assert list(again.train) == list(local.train)
        copies = [d for d, _, files in os.walk(tmp_path / "cache" / "bucket_data") if "dataset_info.json" in files]
        assert len(copies) == 2 and staged in copies


def test_only_process_0_prepares_the_others_wait_for_its_upload_or_error(gcs, tmp_path, monkeypatch):  # noqa: F811
    import threading  # pylint: disable=import-outside-toplevel
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    relative = "made/cfg/1.0.0"
    prepared = []

    def prepare_locally(local_dir):  # A dataset's files, as tfds lays them out; the marker too.
        os.makedirs(os.path.join(local_dir, relative))
        for name in ("made-train.array_record-00000-of-00001", "dataset_info.json"):
            with open(os.path.join(local_dir, relative, name), "w") as f:
                f.write(name)
        prepared.append(local_dir)

    def failing(local_dir):
        raise UserError("data.train_file: no documents left after cleaning")

    def host_1(results, data_dir, **wait):
        results.append(bucket_data.prepare_on_bucket(data_dir, relative, prepare_locally, process_index=1, **wait))

    with gcs.environ():
        data_dir = f"{gcs.fresh_prefix()}/tfds"
        with pytest.raises(UserError, match=r"data\.data_dir: gs://.*/made/cfg/1\.0\.0/dataset_info\.json did not "
                                            r"appear in 0 s .*JAXLM_DATA_WAIT_S"):
            bucket_data.prepare_on_bucket(data_dir, relative, prepare_locally, process_index=1, attempt=1,
                                          wait_s=0.2, poll_s=0.05)
        # Process 0 fails: its error report ends the others' wait at once, with its reason.
        with pytest.raises(UserError, match="no documents left"):
            bucket_data.prepare_on_bucket(data_dir, relative, failing, process_index=0, attempt=1)
        with pytest.raises(UserError, match=r"process 0 could not prepare gs://.*: data\.train_file: no documents"):
            bucket_data.prepare_on_bucket(data_dir, relative, prepare_locally, process_index=1, attempt=1, wait_s=60)
        assert not prepared
        # The next run (attempt 2): a host that starts before process 0 has removed that report
        # goes on waiting, however recent the report is.
        with pytest.raises(UserError, match="did not appear in 0 s"):
            bucket_data.prepare_on_bucket(data_dir, relative, prepare_locally, process_index=1, attempt=2,
                                          wait_s=0.3, poll_s=0.05)
        # Process 0 succeeds (the old report goes); a host waiting meanwhile finds the upload.
        results = []
        waiter = threading.Thread(target=host_1, args=(results, data_dir),
                                  kwargs=dict(attempt=2, wait_s=60, poll_s=0.05))
        waiter.start()
        assert bucket_data.prepare_on_bucket(data_dir, relative, prepare_locally, process_index=0, attempt=2) is False
        waiter.join(timeout=60)
        assert results == [True] and len(prepared) == 1
        assert not gcs.object_names(f"{data_dir}/jaxlm_prepare_errors/")
        assert bucket_data.prepare_on_bucket(data_dir, relative, prepare_locally, process_index=0) is True
        # Process 0 kept its own preparation as its staged copy: staging finds it, copies nothing.
        staged_root = os.path.join(bucket_data.local_root(data_dir), "staged")
        kept = os.listdir(staged_root)
        assert len(kept) == 1 and bucket_data.stage(data_dir, relative) == os.path.join(staged_root, kept[0])
        assert open(os.path.join(staged_root, kept[0], relative, "dataset_info.json")).read() == "dataset_info.json"


def test_a_bucket_glob_matching_nothing_names_the_field(gcs):  # noqa: F811
    with gcs.environ():
        prefix = gcs.fresh_prefix()
        io.write_text_atomic(f"{prefix}/corpus/a.txt", "text\n")
        with pytest.raises(UserError, match=r"^data\.train_file: glob 'gs://.*/corpus/\*\.md' matches no file"):
            builders.resolve_files(f"{prefix}/corpus/a.txt,{prefix}/corpus/*.md", "data.train_file")
        with pytest.raises(UserError, match=r"^data\.eval_file: file not found: gs://.*/corpus/b\.txt"):
            builders.resolve_files(f"{prefix}/corpus/b.txt", "data.eval_file")
