"""The text-file tfds builder: splitting, cleaning, dedup counts, reuse, and user errors."""

import json
import os
import unicodedata

import pytest

from jaxlm.data import builders, text_builder
from jaxlm.errors import UserError


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def prepare(tmp_path, train_file, eval_file="", eval_fraction=0.1, doc_split="blank_line"):
    config = text_builder.make_text_files_config(train_file, eval_file, eval_fraction, doc_split)
    return text_builder.prepare_text_dataset(config, str(tmp_path / "tfds"))


def texts(prepared, split):
    return [record["text"].decode("utf-8") for record in prepared.builder.as_data_source(split)]


def test_blank_line_split_cleans_dedups_and_holds_out_the_end(tmp_path):
    decomposed = unicodedata.normalize("NFD", "Café")
    assert decomposed != "Café"
    paragraphs = [
        f"{decomposed} one  ",  # NFC and trailing spaces: becomes 'Café one'.
        "second\nparagraph",
        "Café one",  # Duplicate of the first once cleaned.
        "fourth",
        "fifth",
        "second\nparagraph",  # In validation and in train: dropped from validation.
        "last",
    ]
    train_file = write(tmp_path / "in" / "a.txt", "\n\n\n".join(paragraphs) + "\n  \n")
    prepared = prepare(tmp_path, train_file, eval_fraction=0.3)  # round(7 * 0.3) = 2 held out.

    kept_train = ["Café one", "second\nparagraph", "fourth", "fifth"]
    assert texts(prepared, "train") == kept_train
    assert texts(prepared, "validation") == ["last"]
    splits = prepared.report["splits"]
    assert splits["train"] == {
        "documents_read": 5, "empty_dropped": 0, "duplicates_dropped": 1, "in_train_dropped": 0,
        "kept": 4, "bytes": sum(len(text.encode()) for text in kept_train),
    }
    assert splits["validation"] == {
        "documents_read": 2, "empty_dropped": 0, "duplicates_dropped": 0, "in_train_dropped": 1,
        "kept": 1, "bytes": 4,
    }
    saved = json.loads((prepared.builder.data_path / text_builder.REPORT_FILENAME).read_text())
    assert saved == prepared.report
    assert prepared.builder.info.file_format.value == "array_record"


def test_line_split_with_eval_file_counts_empties_and_crlf(tmp_path):
    train_file = write(tmp_path / "train.txt", "a\r\n\r\nb  \n\t\na\nc\n", mode="w")
    eval_file = write(tmp_path / "eval.txt", "c\nd\nd\n\ne\n")
    prepared = prepare(tmp_path, train_file, eval_file=eval_file, doc_split="line")

    assert texts(prepared, "train") == ["a", "b", "c"]
    assert texts(prepared, "validation") == ["d", "e"]
    train, validation = prepared.report["splits"]["train"], prepared.report["splits"]["validation"]
    counted = ("documents_read", "empty_dropped", "duplicates_dropped", "in_train_dropped", "kept")
    assert [train[key] for key in counted] == [6, 2, 1, 0, 3]
    assert [validation[key] for key in counted] == [5, 1, 1, 1, 2]


def test_file_split_and_globs_in_sorted_order(tmp_path):
    files = {"b.txt": "bee\n\nbuzz\n", "a.txt": "ant\n", "c.txt": "cat\n", "z.txt": "zebra\n"}
    for name, text in files.items():
        write(tmp_path / "docs" / name, text)
    pattern = str(tmp_path / "docs" / "[abc].txt")
    prepared = prepare(tmp_path, pattern, eval_file=str(tmp_path / "docs" / "z.txt"), doc_split="file")
    assert texts(prepared, "train") == ["ant", "bee\n\nbuzz", "cat"]
    assert texts(prepared, "validation") == ["zebra"]
    assert builders.resolve_files(f"{pattern}, {tmp_path}/docs/a.txt", "data.train_file") == tuple(
        str(tmp_path / "docs" / n) for n in ("a.txt", "b.txt", "c.txt")
    )


def test_reuses_identical_inputs_and_rebuilds_changed_content(tmp_path):
    train_file = write(tmp_path / "t.txt", "one\n\ntwo\n\nthree\n\nfour\n")
    first = prepare(tmp_path, train_file, eval_fraction=0.25)
    record_file = next(first.builder.data_path.glob("*train.array_record*"))
    mtime = os.stat(record_file).st_mtime_ns

    again = prepare(tmp_path, train_file, eval_fraction=0.25)
    assert again.reused and not first.reused
    assert again.builder.data_path == first.builder.data_path
    assert os.stat(record_file).st_mtime_ns == mtime
    assert again.report == first.report

    other_options = prepare(tmp_path, train_file, eval_fraction=0.5)
    assert not other_options.reused and other_options.builder.data_path != first.builder.data_path

    write(tmp_path / "t.txt", "one\n\ntwo\n\nthree\n\nFOUR\n")
    changed = prepare(tmp_path, train_file, eval_fraction=0.25)
    assert not changed.reused
    assert changed.builder.data_path != first.builder.data_path
    assert texts(changed, "validation") == ["FOUR"]
    assert texts(first, "validation") == ["four"]  # The old preparation is untouched.


@pytest.mark.parametrize(
    "setup, message",
    [
        (dict(train_file="missing.txt"), ["data.train_file", "missing.txt"]),
        (dict(train_file="*.nothing"), ["data.train_file", "*.nothing", "matches no file"]),
        (dict(train_file="ok.txt", eval_file="no.txt"), ["data.eval_file", "no.txt"]),
        (dict(train_file="ok.txt", doc_split="sentence"), ["data.doc_split", "blank_line"]),
        (dict(train_file="ok.txt", eval_fraction=1.5), ["data.eval_fraction"]),
    ],
)
def test_config_errors_name_the_field(tmp_path, setup, message):
    write(tmp_path / "ok.txt", "a\n\nb\n")
    options = {key: str(tmp_path / value) if key.endswith("_file") else value for key, value in setup.items()}
    with pytest.raises(UserError) as error:
        text_builder.make_text_files_config(**options)
    text = str(error.value)
    assert "\n" not in text and all(part in text for part in message), text


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.txt", b"fine\n\nalso fine\n\xff\xfe broken\n", mode="wb")
    with pytest.raises(UserError, match=r"data.train_file: .*bad.txt line 4: invalid UTF-8"):
        prepare(tmp_path, path)
    assert not (tmp_path / "tfds" / "jaxlm_text_files").exists() or not any(
        (tmp_path / "tfds" / "jaxlm_text_files").rglob("dataset_info.json")
    )


def test_empty_file_and_no_documents_left(tmp_path):
    empty = write(tmp_path / "empty.txt", " \n\n\t\n")
    with pytest.raises(UserError, match=r"data.train_file: .*empty.txt is empty"):
        prepare(tmp_path, empty)

    train_file = write(tmp_path / "train.txt", "same\n\nother\n")
    eval_file = write(tmp_path / "eval.txt", "same\n")
    with pytest.raises(UserError, match=r"data.eval_file: no documents left after cleaning"):
        prepare(tmp_path, train_file, eval_file=eval_file)

    single = write(tmp_path / "single.txt", "only one paragraph\nof two lines\n")
    with pytest.raises(UserError, match=r"too few to hold some out.*data.doc_split=line"):
        prepare(tmp_path, single)


def test_resolve_files_drops_repeats_and_rejects_empty_spec(tmp_path):
    path = write(tmp_path / "a.txt", "x\n")
    assert builders.resolve_files(f"{path},{path}", "data.train_file") == (path,)
    with pytest.raises(UserError, match="data.train_file is empty"):
        builders.resolve_files(" , ", "data.train_file")
