"""Parquet classification files, as the Hugging Face Hub stores datasets.

Through the builder: rows and classes of a `datasets`-style file (integer labels, the class
names in its ClassLabel metadata), of a plain file with label names, and the errors (a missing
column, a file that is not Parquet). Through the CLI: a run trains on Parquet files and takes the
Hub's class names, and `jaxlm predict` labels a Parquet input, keeping its columns.
"""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.data import labeled_builder
from jaxlm.errors import UserError

CSV_CONFIG = "configs/csv_classification.py"
NAMES = ["World", "Sports", "Business", "Sci/Tech"]  # ag_news's ClassLabel on the Hub


def write_hub_parquet(path, rows: int, seed: int = 0, class_names=True) -> list[tuple[int, str, int]]:
    """(id, text, label) rows; with class_names, the `datasets` schema metadata naming the labels."""
    out = [(1000 * seed + i, f"{NAMES[(i * 3 + seed) % 4].lower()} news item {i}", (i * 3 + seed) % 4)
           for i in range(rows)]
    table = pa.table({"id": [r[0] for r in out], "text": [r[1] for r in out], "label": [r[2] for r in out]})
    if class_names:
        features = {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"},
                    "label": {"names": NAMES, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table, path)
    return out


def data_config(train_file, eval_file="", **overrides):
    data = config_lib.base_config().data
    data.train_file, data.eval_file = str(train_file), str(eval_file)
    data.update(overrides)
    return data


def records(prepared, split):
    return [(r["text"].decode(), int(r["label"])) for r in prepared.builder.as_data_source(split)]


def test_hub_parquet_rows_and_class_names(tmp_path):
    train, evaluation = tmp_path / "train-00000-of-00001.parquet", tmp_path / "test-00000-of-00001.parquet"
    rows = write_hub_parquet(train, 10)
    held = write_hub_parquet(evaluation, 4, seed=1)
    prepared = labeled_builder.prepare_labeled_dataset(
        labeled_builder.make_labeled_files_config(data_config(train, evaluation)), str(tmp_path / "tfds"))
    assert prepared.vocab.names == tuple(NAMES) and prepared.vocab.integer
    assert records(prepared, "train") == [(text, label) for _, text, label in rows]
    assert records(prepared, "validation") == [(text, label) for _, text, label in held]
    # data.label_names given, or label_kind=integer, win over the file's names.
    given = labeled_builder.make_labeled_files_config(data_config(train, evaluation, label_names="a,b,c,d"))
    assert given.label_names == ("a", "b", "c", "d")
    indices = labeled_builder.make_labeled_files_config(data_config(train, evaluation, label_kind="integer"))
    assert indices.label_names == ("0", "1", "2", "3") and indices.integer_labels


def test_plain_parquet_with_label_names(tmp_path):
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"review": ["good", "bad", "fine", "awful"],
                             "sentiment": ["positive", "negative", "positive", "negative"]}), path)
    options = labeled_builder.make_labeled_files_config(data_config(
        path, text_column="review", label_column="sentiment", eval_fraction=0.25))
    assert options.label_names == ("negative", "positive") and not options.integer_labels


def test_parquet_errors_name_the_field_and_the_fix(tmp_path):
    path = tmp_path / "train.parquet"
    write_hub_parquet(path, 4)
    with pytest.raises(UserError) as e:
        labeled_builder.make_labeled_files_config(data_config(path, text_column="sentence"))
    assert str(e.value) == (f"{path}: no column 'sentence' (the file has 'id', 'text', 'label'); "
                            "set data.text_column to one of them")
    broken = tmp_path / "broken.parquet"
    broken.write_text("text,label\na,0\n")
    with pytest.raises(UserError, match=r"broken.parquet: not a readable Parquet file \(.*\); check the file"):
        labeled_builder.make_labeled_files_config(data_config(broken))


def test_train_and_predict_on_parquet_through_the_cli(tmp_path, capsys):
    train, evaluation = tmp_path / "train.parquet", tmp_path / "test.parquet"
    write_hub_parquet(train, 64)
    held = write_hub_parquet(evaluation, 12, seed=1)
    workdir = tmp_path / "run"
    code = cli.main(["train", f"--config={CSV_CONFIG}:runlocal", f"--workdir={workdir}",
                     f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.train_file={train}",
                     f"--config.data.eval_file={evaluation}", "--config.steps=20", "--config.eval_every=20",
                     "--config.checkpoint_every=20"])
    assert code == 0, capsys.readouterr().err[-2000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["label_names"] == NAMES
    trained = json.loads((workdir / "eval_report.json").read_text())
    capsys.readouterr()
    out = tmp_path / "labelled.csv"
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={evaluation}", f"--output={out}"]) == 0
    with open(out, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = rows[0]  # The input's own "label" column keeps its values as input_label.
    assert header == ["id", "text", "input_label", "label", "score"] + [f"prob_{n}" for n in NAMES]
    assert [r[2] for r in rows[1:]] == [str(label) for _, _, label in held]
    assert [r[header.index("id")] for r in rows[1:]] == [str(i) for i, _, _ in held]
    truth = [NAMES[label] for _, _, label in held]
    predicted = [r[header.index("label")] for r in rows[1:]]
    assert sum(p == t for p, t in zip(predicted, truth)) / len(truth) == pytest.approx(trained["accuracy"])
