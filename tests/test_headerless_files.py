"""CSV/TSV files without a header line (data.header=false): columns are numbered from 1.

The classic text-classification CSVs (AG News, DBpedia, Yelp, Yahoo Answers as released by
Zhang et al., 2015) have no header: class index from 1, title, text. Through the builder: the
rows, the classes (1..4 name their classes), the eval file, a separate preparation from the
same file read with a header. The errors name the field and the fix. Through the CLI: a run
trains on such files, `jaxlm eval` reads a headerless eval file and `jaxlm predict` labels one.
"""

import csv
import json

import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.data import labeled_builder
from jaxlm.errors import UserError

CSV_CONFIG = "configs/csv_classification.py"
TOPICS = {1: "world", 2: "sports", 3: "business", 4: "science"}


def write_news(path, rows: int, seed: int = 0) -> list[tuple[int, str, str]]:
    """Headerless "class index","title","description" rows; the words give the topic away."""
    out = []
    for i in range(rows):
        label = 1 + (i * 7 + seed) % 4
        topic = TOPICS[label]
        out.append((label, f"{topic} headline {i}", f"{topic} story, with a comma, number {i}"))
    path.write_text("".join(f'"{c}","{t}","{d}"\n' for c, t, d in out), encoding="utf-8")
    return out


def data_config(train_file, eval_file="", **overrides):
    data = config_lib.base_config().data
    data.train_file, data.eval_file = str(train_file), str(eval_file)
    data.update(header=False, label_column="1", text_column="2", text_pair_column="3")
    data.update(overrides)
    return data


def records(prepared, split):
    return [(r["text"].decode(), r["text_pair"].decode(), int(r["label"]))
            for r in prepared.builder.as_data_source(split)]


def test_headerless_rows_classes_and_eval_file(tmp_path):
    train, evaluation = tmp_path / "train.csv", tmp_path / "test.csv"
    rows = write_news(train, 12)
    held = write_news(evaluation, 3, seed=1)
    options = labeled_builder.make_labeled_files_config(data_config(train, evaluation))
    prepared = labeled_builder.prepare_labeled_dataset(options, str(tmp_path / "tfds"))
    assert prepared.vocab.names == ("1", "2", "3", "4") and not prepared.vocab.integer
    assert records(prepared, "train") == [(t, d, c - 1) for c, t, d in rows]  # the first row is data
    assert [c for c, _, _ in held] == [2, 1, 4]
    assert records(prepared, "validation") == [("sports headline 0", "sports story, with a comma, number 0", 1),
                                               ("world headline 1", "world story, with a comma, number 1", 0),
                                               ("science headline 2", "science story, with a comma, number 2", 3)]
    # The same file read with a header is another preparation (its first row is then a header).
    with_header = labeled_builder.make_labeled_files_config(data_config(
        train, "", header=True, label_column="1", text_column="world headline 0",
        text_pair_column="world story, with a comma, number 0"))
    headerless_alone = labeled_builder.make_labeled_files_config(data_config(train))
    assert with_header.name != headerless_alone.name
    assert with_header.num_train_rows == 11 and headerless_alone.num_train_rows == 12


def test_headerless_errors_name_the_field_and_the_fix(tmp_path):
    train = tmp_path / "train.csv"
    write_news(train, 8)
    with pytest.raises(UserError) as e:
        labeled_builder.make_labeled_files_config(data_config(train, text_column="text"))
    assert str(e.value) == (f"{train}: data.header=false numbers the columns 1..3, so data.text_column='text' "
                            "names none; set data.text_column to a number from 1 to 3")
    with pytest.raises(UserError) as e:  # A headerless file read with the default header=true.
        labeled_builder.make_labeled_files_config(data_config(train, header=True, text_column="text",
                                                              label_column="label", text_pair_column=""))
    assert "no column 'text'" in str(e.value) and "data.header=false, columns numbered from 1" in str(e.value)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('"1","a","b"\n"2","c"\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        labeled_builder.make_labeled_files_config(data_config(ragged))
    assert str(e.value) == (f"{ragged}, row 2 (line 2): 2 field(s) but the first row has 3; "
                            "quote fields that contain the delimiter")


def test_train_and_eval_headerless_files_through_the_cli(tmp_path, capsys):
    train, evaluation = tmp_path / "train.csv", tmp_path / "test.csv"
    write_news(train, 64)
    write_news(evaluation, 16, seed=1)
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    columns = ["--config.data.header=false", "--config.data.label_column=1", "--config.data.text_column=2",
               "--config.data.text_pair_column=3"]
    code = cli.main(["train", f"--config={CSV_CONFIG}:runlocal", f"--workdir={workdir}",
                     f"--config.data.data_dir={data_dir}", f"--config.data.train_file={train}",
                     f"--config.data.eval_file={evaluation}", "--config.steps=20", "--config.eval_every=20",
                     "--config.checkpoint_every=20", *columns])
    assert code == 0, capsys.readouterr().err[-2000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["header"] is False and saved["data"]["label_names"] == ["1", "2", "3", "4"]
    trained = json.loads((workdir / "eval_report.json").read_text())
    assert trained["step"] == 20 and sum(map(sum, trained["confusion_matrix"])) == 16
    capsys.readouterr()
    # jaxlm eval of the same headerless file gives the run's own final evaluation.
    code = cli.main(["eval", f"--workdir={workdir}", f"--config.data.eval_file={evaluation}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    again = json.loads((workdir / "eval" / "eval_step20.json").read_text())
    assert again["report"]["confusion_matrix"] == trained["confusion_matrix"]
    assert again["eval/accuracy"] == pytest.approx(trained["accuracy"], abs=1e-12)
    assert again["eval/loss"] == pytest.approx(trained["loss"], rel=1e-5)
    capsys.readouterr()
    # jaxlm predict reads a headerless input as the run's data did, and names its columns 1..3.
    out = tmp_path / "predictions.csv"
    code = cli.main(["predict", f"--workdir={workdir}", f"--input={evaluation}", f"--output={out}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    with open(out, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["1", "2", "3", "label", "score", "prob_1", "prob_2", "prob_3", "prob_4"]
    assert len(rows) == 17
    correct = sum(r[0] == r[3] for r in rows[1:])
    assert correct / 16 == pytest.approx(trained["accuracy"], abs=1e-12)
    # A headerless input read with a header: one line naming --header.
    code = cli.main(["predict", f"--workdir={workdir}", f"--input={evaluation}", f"--output={tmp_path / 'p2.csv'}",
                     "--header=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("jaxlm: error: ") and "--header=false" in err[-1], err[-3:]
    assert not (tmp_path / "p2.csv").exists()
