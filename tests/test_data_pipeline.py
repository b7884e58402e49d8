"""build_lm_data end to end: text files or a prepared tfds dataset -> tokenizer, caches, loaders."""

import hashlib
import os
import random

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm.data import build_lm_data, corpora, sources
from jaxlm.errors import UserError

WORDS = "the king queen speak hear me lord good night day love war peace sword crown".split()


class JaxlmTestSentences(tfds.core.GeneratorBasedBuilder):
    """A tiny registered tfds dataset standing in for lm1b & co (text under another key)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(60, 0), "test": self._generate_examples(9, 1)}

    def _generate_examples(self, count, salt):
        rng = random.Random(salt)
        for i in range(count):
            yield i, {"sentence": " ".join(rng.choice(WORDS) for _ in range(12)), "label": i % 2}


def data_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(train_file="", eval_file="", eval_fraction=0.1, doc_split="blank_line", tfds_name="",
             text_key="text", train_split="train", eval_split="validation", data_dir="",
             tokenizer="bpe", bpe_vocab_size=300, prefetch=2)
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(200)]
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return str(path)


def inner_words(tokenizer, ids):
    """The words of a decoded window, less the first and last (a window may cut them)."""
    return tokenizer.decode(ids).replace("<|endoftext|>", " ").split()[1:-1]


def build(config, workdir, **overrides):
    kwargs = dict(seq_len=16, global_batch_size=4, seed=0, workdir=str(workdir))
    kwargs.update(overrides)
    return build_lm_data(config, **kwargs)


def test_text_files_end_to_end(corpus_file, tmp_path):
    config = data_config(train_file=corpus_file, data_dir=str(tmp_path / "data"))
    data = build(config, tmp_path / "run")

    assert (data.vocab_size, data.eos_id, data.pad_id) == (300, 0, 1)
    assert os.path.isfile(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    assert data.prep_report["splits"]["validation"]["kept"] == 20  # The last 10% of 200.
    batch = next(data.train_iter)
    assert batch["inputs"].shape == (4, 16) and data.host_batch_size == 4
    assert set(inner_words(data.tokenizer, batch["inputs"][0])) <= set(WORDS)

    eval_batches = list(data.eval_batches())
    assert len(eval_batches) == data.num_eval_batches
    predicted = sum(float(b["weights"].sum()) for b in eval_batches)
    eval_bytes = data.prep_report["splits"]["validation"]["bytes"]
    assert data.eval_tokens_per_byte == pytest.approx(predicted / eval_bytes)
    assert 0.1 < data.eval_tokens_per_byte < 1.0
    again = list(data.eval_batches())  # A fresh, identical pass.
    assert [b["weights"].sum() for b in again] == [b["weights"].sum() for b in eval_batches]


def test_second_start_reuses_everything_and_hosts_agree(corpus_file, tmp_path):
    config = data_config(train_file=corpus_file, data_dir=str(tmp_path / "data"))
    first = build(config, tmp_path / "run")
    expected = [next(first.train_iter) for _ in range(3)]
    tokenizer_json = tmp_path / "run" / "tokenizer" / "tokenizer.json"
    cache_files = sorted((tmp_path / "data" / "jaxlm_token_cache").rglob("*.npy"))
    stamps = [os.stat(p).st_mtime_ns for p in [tokenizer_json, *cache_files]]

    hosts = [build(config, tmp_path / "run", process_index=h, process_count=2) for h in range(2)]
    assert [os.stat(p).st_mtime_ns for p in [tokenizer_json, *cache_files]] == stamps
    assert cache_files == []  # The stream loader tokenizes while training; nothing before.
    for step in range(3):
        rows = [next(host.train_iter) for host in hosts]
        joined = np.concatenate([r["inputs"] for r in rows])
        np.testing.assert_array_equal(joined, expected[step]["inputs"])
    list(first.eval_batches())  # The first evaluation tokenizes the eval split once, into the cache.
    assert len(list((tmp_path / "data" / "jaxlm_token_cache").rglob("*.npy"))) == 1


def test_hub_or_directory_tokenizer_is_used_as_given(corpus_file, tmp_path):
    config = data_config(train_file=corpus_file, data_dir=str(tmp_path / "data"))
    build(config, tmp_path / "first")
    tokenizer_dir = str(tmp_path / "first" / "tokenizer")
    config = data_config(train_file=corpus_file, data_dir=str(tmp_path / "data"), tokenizer=tokenizer_dir)
    data = build(config, tmp_path / "second")
    assert data.vocab_size == 300
    assert not os.path.exists(tmp_path / "second" / "tokenizer")  # Nothing trained for this run.


def tfds_config(data_dir, **overrides):
    fields = dict(tfds_name="jaxlm_test_sentences", text_key="sentence", eval_split="test", data_dir=data_dir)
    return data_config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.disable_progress_bar()
    JaxlmTestSentences(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_prepared_tfds_dataset_by_name(tfds_dir, tmp_path):
    config = tfds_config(tfds_dir)
    data = build(config, tmp_path / "run")
    assert data.prep_report == {}
    batch = next(data.train_iter)
    assert set(inner_words(data.tokenizer, batch["targets"][0])) <= set(WORDS)
    predicted = sum(float(b["weights"].sum()) for b in data.eval_batches())
    assert predicted > 9 * 12  # 9 sentences of 12 words, plus separators.
    cache_root = os.path.join(tfds_dir, "jaxlm_token_cache", "tfds", "jaxlm_test_sentences", "1.0.0")
    cached = sorted(name.split("-")[0] for name in os.listdir(cache_root) if name.endswith(".npy"))
    assert cached == ["test"]  # The train split streams: only the eval split has a token cache.

    sliced = build(tfds_config(tfds_dir, train_split="train[:50%]"), tmp_path / "run")
    documents = lambda d: d.train_iter.get_state()["layout"]["sources"][0][2]  # noqa: E731
    assert 0 < documents(sliced) < documents(data)


def test_tfds_user_errors(tfds_dir, tmp_path):
    def error_for(**overrides):
        config = tfds_config(overrides.pop("data_dir", tfds_dir), **overrides)
        with pytest.raises(UserError) as error:
            sources.load_corpus(config, config.data_dir)
        assert "\n" not in str(error.value)
        return str(error.value)

    message = error_for(text_key="text")
    assert "data.text_key='text' is not a feature of jaxlm_test_sentences (it has" in message
    assert "data.eval_split='validation': not a split" in error_for(eval_split="validation")
    assert "unknown tfds dataset" in error_for(tfds_name="no_such_dataset_xyz")
    message = error_for(data_dir=str(tmp_path / "empty"))
    assert "not prepared in data.data_dir=" in message and "tfds build jaxlm_test_sentences" in message
    assert "--file_format=array_record" in message

    tfrecord_dir = str(tmp_path / "tfrecord")
    JaxlmTestSentences(data_dir=tfrecord_dir, file_format="tfrecord").download_and_prepare()
    message = error_for(data_dir=tfrecord_dir)
    assert "prepared as tfrecord" in message and "--file_format=array_record" in message


def test_no_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.train_file and data.tfds_name are both empty"):
        build(data_config(data_dir=str(tmp_path)), tmp_path / "run")


def test_embedded_tiny_shakespeare():
    path = corpora.path("tiny_shakespeare")
    with open(path, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == "6fb458f1232090904fb40fe944165e91"
    with pytest.raises(UserError, match="unknown embedded corpus 'nope'"):
        corpora.path("nope")
