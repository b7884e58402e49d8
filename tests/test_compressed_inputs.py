"""Corpora as they ship: compressed files (.gz, .bz2, .xz, .zst), JSON lines and Parquet rows
(doc_split=jsonl).

Prepared LM datasets from a compressed copy hold the same documents as from the plain file; a
JSON-lines corpus (C4's {"text": ...} per line, or another key with jsonl:KEY) gives one document
per line, a Parquet corpus (FineWeb's layout) one per row; a classification CSV may be
compressed too. Errors: a truncated
stream, a line that is not JSON, a missing key, an unknown doc_split, each one line naming the
file and the fix. Through the CLI: `jaxlm prepare` of a .jsonl.zst corpus.
"""

import bz2
import gzip
import json
import lzma
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.data import labeled_builder, table_files, text_builder
from jaxlm.errors import UserError

DOCS = ["First document,\nover two lines.", "Second one.", "Café, third.", "Fourth: the end."]
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def prepare(tmp_path, train_file, doc_split, name="tfds"):
    config = text_builder.make_text_files_config(train_file, "", 0.25, doc_split)
    return config, text_builder.prepare_text_dataset(config, str(tmp_path / name))


def texts(prepared, split):
    return [record["text"].decode("utf-8") for record in prepared.builder.as_data_source(split)]


@pytest.mark.parametrize("suffix", sorted(COMPRESS))
def test_a_compressed_text_file_prepares_as_the_plain_one(tmp_path, suffix):
    data = ("\n\n".join(DOCS) + "\n").encode("utf-8")
    plain = tmp_path / "corpus.txt"
    plain.write_bytes(data)
    packed = tmp_path / f"corpus.txt{suffix}"
    packed.write_bytes(COMPRESS[suffix](data))
    _, want = prepare(tmp_path, str(plain), "blank_line", "plain")
    config, got = prepare(tmp_path, str(packed), "blank_line", "packed")
    assert texts(got, "train") == texts(want, "train") == DOCS[:3]
    assert texts(got, "validation") == texts(want, "validation") == DOCS[3:]
    assert config.name.startswith("corpus_txt_")  # named by the file, hashed by its (compressed) bytes


def test_json_lines_give_one_document_per_line_under_their_key(tmp_path):
    rows = [{"text": doc, "url": f"https://example.org/{i}", "meta": {"i": i}} for i, doc in enumerate(DOCS)]
    corpus = tmp_path / "c4-train.00000-of-00001.json.gz"  # C4's naming: JSON lines, gzipped
    corpus.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n\n").encode()))
    _, prepared = prepare(tmp_path, str(corpus), "jsonl", "c4")
    assert texts(prepared, "train") == DOCS[:3] and texts(prepared, "validation") == DOCS[3:]

    stack = tmp_path / "code.jsonl"
    stack.write_text("".join(json.dumps({"content": doc, "text": "not this"}) + "\n" for doc in DOCS))
    _, prepared = prepare(tmp_path, str(stack), "jsonl:content", "stack")
    assert texts(prepared, "train") == DOCS[:3]
    # The key is part of what identifies the preparation.
    assert (text_builder.make_text_files_config(str(stack), "", 0.25, "jsonl").name
            != text_builder.make_text_files_config(str(stack), "", 0.25, "jsonl:content").name)


def test_parquet_rows_are_documents(tmp_path):
    corpus = tmp_path / "000_00000.parquet"  # FineWeb's layout: text, id, dump, url, ...
    table = pa.table({"id": [f"<urn:{i}>" for i in range(len(DOCS) + 1)], "text": DOCS[:2] + [None] + DOCS[2:],
                      "url": ["https://example.org"] * (len(DOCS) + 1)})
    pq.write_table(table, corpus, row_group_size=2)  # several row groups, read one at a time
    _, prepared = prepare(tmp_path, str(corpus), "jsonl", "fineweb")
    assert texts(prepared, "train") + texts(prepared, "validation") == DOCS  # the null text: an empty document
    assert prepared.report["splits"]["train"]["empty_dropped"] + \
        prepared.report["splits"]["validation"]["empty_dropped"] == 1
    with pytest.raises(UserError) as e:
        prepare(tmp_path, str(corpus), "blank_line")
    assert str(e.value) == (f"data.train_file: {corpus} is a Parquet file: its rows are documents; set "
                            "data.doc_split=jsonl (the 'text' column) or jsonl:COLUMN")
    with pytest.raises(UserError) as e:
        prepare(tmp_path, str(corpus), "jsonl:content")
    assert str(e.value) == (f"data.train_file: {corpus}: no column 'content' (the file has 'id', 'text', 'url'); "
                            "set data.doc_split=jsonl:COLUMN to the column that holds the text")


def test_corpus_errors_name_the_file_and_the_fix(tmp_path):
    broken = tmp_path / "cut.txt.gz"
    broken.write_bytes(gzip.compress(("\n\n".join(DOCS * 50)).encode())[:-30])
    with pytest.raises(UserError, match=r"data.train_file: .*cut.txt.gz: cannot read past line \d+ .*"
                                        r"check that the file is complete"):
        prepare(tmp_path, str(broken), "blank_line")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2: not valid JSON .*one JSON object per line"):
        prepare(tmp_path, str(bad), "jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "a"}\n')
    with pytest.raises(UserError) as e:
        prepare(tmp_path, str(other), "jsonl")
    assert str(e.value) == (f"data.train_file: {other} line 1: no key 'text' (the line has 'body'); "
                            "set data.doc_split=jsonl:KEY to the key that holds the text")
    for wrong in ("json", "line:text", "jsonl:"):
        with pytest.raises(UserError, match=f"data.doc_split='{wrong}' is invalid; use one of blank_line, line, "
                                            "file, jsonl"):
            text_builder.make_text_files_config(str(other), "", 0.25, wrong)


def test_a_compressed_classification_file_reads_as_the_plain_one(tmp_path):
    rows = "review,sentiment\n" + "".join(f"text {i},{'positive' if i % 2 else 'negative'}\n" for i in range(20))
    plain, packed = tmp_path / "r.csv", tmp_path / "r.csv.xz"
    plain.write_text(rows)
    packed.write_bytes(lzma.compress(rows.encode()))
    data = config_lib.base_config().data
    data.update(text_column="review", label_column="sentiment", eval_fraction=0.25)
    configs = []
    for path in (plain, packed):
        data.train_file = str(path)
        configs.append(labeled_builder.make_labeled_files_config(data))
    assert configs[0].label_names == configs[1].label_names == ("negative", "positive")
    assert configs[0].num_train_rows == configs[1].num_train_rows == 20
    assert [r.values for r in table_files.read_rows(str(packed), "csv", {})] == \
        [r.values for r in table_files.read_rows(str(plain), "csv", {})]
    truncated = tmp_path / "t.csv.gz"
    truncated.write_bytes(gzip.compress(rows.encode())[:-10])
    with pytest.raises(UserError, match=r"t.csv.gz: cannot read it .*that the file is complete"):
        list(table_files.read_rows(str(truncated), table_files.file_format(str(truncated)), {}))


def test_prepare_a_zstd_json_lines_corpus_through_the_cli(tmp_path, capsys):
    corpus = tmp_path / "shard-0000.jsonl.zst"
    lines = [json.dumps({"text": f"document {i}: " + " ".join(["words"] * (i % 7 + 1))}) for i in range(40)]
    corpus.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    data_dir = tmp_path / "tfds"
    code = cli.main(["prepare", "--config=configs/tiny_shakespeare.py", f"--config.data.train_file={corpus}",
                     "--config.data.doc_split=jsonl", f"--config.data.data_dir={data_dir}",
                     "--config.data.eval_fraction=0.1"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    reports = [os.path.join(root, text_builder.REPORT_FILENAME) for root, _, files in os.walk(data_dir)
               if text_builder.REPORT_FILENAME in files]
    assert len(reports) == 1
    with open(reports[0], encoding="utf-8") as f:
        report = json.load(f)
    assert report["splits"]["train"]["kept"] + report["splits"]["validation"]["kept"] == 40
    assert report["splits"]["validation"]["documents_read"] == 4
