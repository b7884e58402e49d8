"""The token cache: EOS after each document, dtype, counts, reuse, and atomic writes."""

import json
import os

import numpy as np
import pytest

from jaxlm.data import token_cache
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import TextSplit
from jaxlm.errors import UserError

DOCS = ["Hello world.", "Ünïcödé text, 日本語.", "Hello world.", "short"] * 300  # 1200 documents.


class FailingSource:
    """A real list of records that fails after `good_reads` batched reads (a crash mid-write)."""

    def __init__(self, records, good_reads):
        self._records = records
        self._good_reads = good_reads

    def __len__(self):
        return len(self._records)

    def __getitems__(self, indices):
        if self._good_reads == 0:
            raise RuntimeError("simulated crash")
        self._good_reads -= 1
        return [self._records[i] for i in indices]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("work") / "tokenizer")
    return tokenizer_lib.train_bpe_tokenizer(iter(DOCS), 300, out_dir)


def cache(texts, tokenizer, data_dir, dataset_id="ds"):
    return token_cache.cached_token_split(texts, tokenizer, data_dir=str(data_dir), dataset_id=dataset_id)


def split_of(docs, name="train"):
    return TextSplit([{"text": d.encode()} for d in docs], "text", name)


def test_stream_has_eos_after_each_document(tokenizer, tmp_path):
    cached = cache(split_of(DOCS), tokenizer, tmp_path, dataset_id="ds/v1")
    expected = []
    for doc in DOCS:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"]
        expected.append(tokenizer_lib.eos_id(tokenizer))
    assert isinstance(cached.tokens, np.memmap) and cached.tokens.dtype == np.uint16
    np.testing.assert_array_equal(cached.tokens, expected)
    assert int(cached.tokens[-1]) == 0
    assert (cached.num_tokens, cached.num_documents) == (len(expected), len(DOCS))
    assert cached.num_bytes == sum(len(d.encode("utf-8")) for d in DOCS)

    fingerprint = tokenizer_lib.fingerprint(tokenizer)[:16]
    stem = tmp_path / "jaxlm_token_cache" / "ds" / "v1" / f"train-{fingerprint}"
    assert sorted(os.listdir(stem.parent)) == [f"train-{fingerprint}.json", f"train-{fingerprint}.npy"]
    metadata = json.loads(stem.with_suffix(".json").read_text())
    assert metadata == {
        "num_documents": 1200, "num_tokens": len(expected), "num_bytes": cached.num_bytes, "dtype": "uint16"
    }


def test_dtype_follows_vocab_size():
    assert token_cache.token_dtype(300) == np.uint16
    assert token_cache.token_dtype(65536) == np.uint16
    assert token_cache.token_dtype(65537) == np.uint32
    assert token_cache.token_dtype(151_000) == np.uint32


def test_existing_cache_is_reused_without_reading_text(tokenizer, tmp_path):
    first = cache(split_of(DOCS), tokenizer, tmp_path)
    unreadable = TextSplit(FailingSource([{"text": b"x"}] * len(DOCS), good_reads=0), "text", "train")
    again = cache(unreadable, tokenizer, tmp_path)
    np.testing.assert_array_equal(first.tokens, again.tokens)


def test_a_crash_mid_write_leaves_no_file(tokenizer, tmp_path):
    records = [{"text": d.encode()} for d in DOCS]  # 1200 documents: two batched reads.
    crashing = TextSplit(FailingSource(records, good_reads=1), "text", "validation")
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache(crashing, tokenizer, tmp_path)
    cache_dir = tmp_path / "jaxlm_token_cache" / "ds"
    assert os.listdir(cache_dir) == []  # Neither partial data nor scratch files remain.

    cached = cache(split_of(DOCS, "validation"), tokenizer, tmp_path)
    assert cached.num_documents == len(DOCS)
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".tmp")]


def test_split_names_with_slices_get_safe_distinct_files(tmp_path):
    a, _ = token_cache.cache_paths(str(tmp_path), "tfds/c4", "train[:10%]", "f" * 64)
    b, _ = token_cache.cache_paths(str(tmp_path), "tfds/c4", "train[:20%]", "f" * 64)
    assert a != b
    assert os.path.basename(a).startswith("train_10_") and "[" not in a and "%" not in a


def test_empty_split_is_a_user_error(tokenizer, tmp_path):
    with pytest.raises(UserError, match="split 'validation' of ds has no documents"):
        cache(split_of([], "validation"), tokenizer, tmp_path)
