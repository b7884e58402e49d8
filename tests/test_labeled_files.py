"""Classification data: the generic example loader (per host, resumable, length buckets), a
prepared tfds dataset by name, and the labelled-files builder (CSV/TSV/JSONL, quoting, label
names and kinds, integer labels from 1, rows named in errors). Headerless CSVs and Parquet:
tests/test_headerless_files.py, tests/test_parquet_files.py; classification runs:
tests/test_classification.py."""

import csv
import json

import numpy as np
import pytest

from conftest import minilm_dir
from jaxlm.data import example_loader, labeled_builder, table_files
from jaxlm.errors import UserError
from sample_data import BAD, GOOD, write_reviews


# -- the generic example loader: per host, resumable, length buckets ------------------------------------
def _plan_iter(lengths, process_index=0, process_count=1, buckets=(8, 16, 32)):
    plan = example_loader.GlobalBatchPlan(len(lengths), 8, seed=3, lengths=lengths, buckets=buckets)
    read = lambda ids, length, batch, first: {"ids": ids.copy(), "length": np.full(len(ids), length)}  # noqa: E731
    return example_loader.make_train_iterator(plan, read, global_batch_size=8, process_index=process_index,
                                              process_count=process_count, layout={"n": len(lengths)})


def test_bucketed_loader_epochs_hosts_and_resume():
    lengths = np.random.default_rng(0).integers(1, 33, 101)
    single = [next(it) for it in [_plan_iter(lengths)] for _ in range(30)]  # 12 batches per epoch.
    for batch in single:
        assert batch["length"][0] in (8, 16, 32) and (lengths[batch["ids"]] <= batch["length"][0]).all()
    epoch = np.concatenate([b["ids"] for b in single[:12]])
    assert len(set(epoch.tolist())) == 96  # A permutation; the 5 left over are dropped this epoch.
    assert any(b["length"][0] == 8 for b in single), "short batches run short"
    hosts = [_plan_iter(lengths, h, 2) for h in range(2)]
    for batch in single[:15]:
        halves = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([h["ids"] for h in halves]), batch["ids"])
    resumed_from = _plan_iter(lengths)
    for _ in range(13):
        next(resumed_from)
    state = json.loads(json.dumps(resumed_from.get_state()))
    resumed = _plan_iter(lengths)
    resumed.set_state(state)
    for batch in single[13:]:
        np.testing.assert_array_equal(next(resumed)["ids"], batch["ids"])
    with pytest.raises(UserError, match="n: 101 -> 100"):
        _plan_iter(lengths[:100]).set_state(state)


def test_tfds_dataset_by_name_and_feature_keys(tmp_path):
    """A prepared tfds dataset (here a tiny local one) through data.tfds_name and the column keys."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from etils import epath  # pylint: disable=import-outside-toplevel
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.data.classification_data import build_classification_data  # pylint: disable=import-outside-toplevel

    class TinySentiment(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40), "validation": self._generate_examples(9)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"sentence": f"{GOOD[i % 6] if i % 2 else BAD[i % 6]} film {i}", "label": i % 2}

    data_dir = str(tmp_path / "tfds")
    TinySentiment(data_dir=data_dir, file_format="array_record").download_and_prepare()
    config = config_lib.base_config()
    config.task, config.seq_len, config.global_batch_size = "classification", 16, 8
    config.data.update(tfds_name="tiny_sentiment", text_column="sentence", label_column="label",
                       data_dir=data_dir, tokenizer=minilm_dir())
    data = build_classification_data(config, str(tmp_path / "run"))
    assert data.label_names == ("neg", "pos") and data.positive_index == 1
    assert data.num_train_examples == 40 and data.num_eval_examples == 9
    assert data.class_counts == {"train": [20, 20], "eval": [5, 4]}
    batch = next(iter(data.eval_batches()))
    assert (batch["inputs"][:, 0] == data.tokenizer.cls_token_id).all()
    config.data.text_column = "text"
    with pytest.raises(UserError, match="data.text_column='text' is not a feature of tiny_sentiment"):
        build_classification_data(config, str(tmp_path / "run"))


# -- the labelled-files builder --------------------------------------------------------------------------
def _data_config(train_file, eval_file="", **overrides):
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    data = config_lib.base_config().data
    data.train_file, data.eval_file = str(train_file), str(eval_file)
    for key, value in overrides.items():
        data[key] = value
    return data


def _records(prepared, split):
    return [(r["text"].decode(), r["text_pair"].decode(), int(r["label"]))
            for r in prepared.builder.as_data_source(split)]


def test_csv_quoted_newlines_tabs_and_label_names(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"line one\nline two",positive\n"a, b\tc ""quoted""",negative\n'
                     'plain,positive\n\nlast,negative\n', encoding="utf-8")
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text('text,label\nok,negative\n', encoding="utf-8")
    options = labeled_builder.make_labeled_files_config(_data_config(train, evaluation))
    prepared = labeled_builder.prepare_labeled_dataset(options, str(tmp_path / "tfds"))
    assert prepared.vocab.names == ("negative", "positive")  # Sorted names.
    assert _records(prepared, "train") == [("line one\nline two", "", 1), ('a, b\tc "quoted"', "", 0),
                                           ("plain", "", 1), ("last", "", 0)]
    assert _records(prepared, "validation") == [("ok", "", 0)]
    saved = json.loads((prepared.builder.data_path / labeled_builder.LABELS_FILENAME).read_text())
    assert saved["names"] == ["negative", "positive"] and saved["integer"] is False
    assert prepared.builder.info.features["label"].names == ["negative", "positive"]
    again = labeled_builder.prepare_labeled_dataset(
        labeled_builder.make_labeled_files_config(_data_config(train, evaluation)), str(tmp_path / "tfds"))
    assert again.reused


def test_tsv_pairs_integer_labels_and_jsonl(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('premise\thypothesis\tlabel\n"tab\there"\tsecond\t2\nx\ty\t0\nz\tw\t1\n', encoding="utf-8")
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"premise": "p", "hypothesis": "h", "label": 1}\n\n{"premise": "q", "hypothesis": "", '
                     '"label": 2}\n', encoding="utf-8")
    options = labeled_builder.make_labeled_files_config(_data_config(
        tsv, jsonl, text_column="premise", text_pair_column="hypothesis"))
    prepared = labeled_builder.prepare_labeled_dataset(options, str(tmp_path / "tfds"))
    assert prepared.vocab.names == ("0", "1", "2") and prepared.vocab.integer
    assert _records(prepared, "train") == [("tab\there", "second", 2), ("x", "y", 0), ("z", "w", 1)]
    assert _records(prepared, "validation") == [("p", "h", 1), ("q", "", 2)]


def test_hold_out_and_explicit_label_order(tmp_path):
    path = write_reviews(tmp_path / "r.csv", 50, seed=1)
    options = labeled_builder.make_labeled_files_config(_data_config(
        path, text_column="review", label_column="sentiment", label_names="positive,negative", eval_fraction=0.2))
    prepared = labeled_builder.prepare_labeled_dataset(options, str(tmp_path / "tfds"))
    assert prepared.vocab.names == ("positive", "negative")
    train, held = _records(prepared, "train"), _records(prepared, "validation")
    assert len(train) == 40 and len(held) == 10
    rows = list(csv.reader(open(path, encoding="utf-8")))[1:]
    assert sorted(t for t, _, _ in train + held) == sorted(r[0] for r in rows)


def test_label_kinds(tmp_path):
    """Integer labels from 0 are class indices (named by data.label_names), and an eval file may
    name them instead; integers that do not start at 0 (stars 1..10) name their classes (3
    classes, by value), as data.label_kind=name does; data.label_kind=integer keeps them indices."""
    train, evaluation = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text("text,label\na,0\nb,1\nc,1\n")
    evaluation.write_text("text,label\nd,positive\ne,0\n")
    options = labeled_builder.make_labeled_files_config(_data_config(train, evaluation,
                                                                     label_names="negative,positive"))
    prepared = labeled_builder.prepare_labeled_dataset(options, str(tmp_path / "tfds"))
    assert prepared.vocab.names == ("negative", "positive") and prepared.vocab.integer
    assert _records(prepared, "train") == [("a", "", 0), ("b", "", 1), ("c", "", 1)]
    assert _records(prepared, "validation") == [("d", "", 1), ("e", "", 0)]

    stars = tmp_path / "stars.csv"
    stars.write_text("text,label\na,10\nb,1\nc,2\nd,1\n")
    named = labeled_builder.make_labeled_files_config(_data_config(stars, label_kind="name", eval_fraction=0.25))
    assert named.label_names == ("1", "2", "10") and not named.integer_labels
    assert labeled_builder.make_labeled_files_config(_data_config(stars, eval_fraction=0.25)) == named
    indices = labeled_builder.make_labeled_files_config(_data_config(stars, label_kind="integer", eval_fraction=0.25))
    assert indices.label_names == tuple(str(i) for i in range(11)) and indices.integer_labels  # 11 classes
    with pytest.raises(UserError, match=r"row 1 \(line 2\): label 'x' is not an integer, but data.label_kind"):
        (tmp_path / "mixed.csv").write_text("text,label\na,x\nb,1\n")
        labeled_builder.make_labeled_files_config(_data_config(tmp_path / "mixed.csv", label_kind="integer"))
    with pytest.raises(UserError, match="data.label_kind='index': use integer"):
        labeled_builder.make_labeled_files_config(_data_config(stars, label_kind="index"))


def test_integer_labels_from_one_name_their_classes_and_a_resume_keeps_its_own(tmp_path):
    """A news-topic CSV with classes 1..4 gets 4 classes (no empty class 0), the eval file's 1..4
    map to them; a run that started when such labels were indices (0..4) resumes with those."""
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm import config_checks  # pylint: disable=import-outside-toplevel
    train, evaluation = tmp_path / "news.csv", tmp_path / "news_test.csv"
    train.write_text("title,topic\n" + "".join(f"story {i},{1 + i % 4}\n" for i in range(12)))
    evaluation.write_text("title,topic\nx,4\ny,1\n")
    data = _data_config(train, evaluation, text_column="title", label_column="topic")
    prepared = labeled_builder.prepare_labeled_dataset(labeled_builder.make_labeled_files_config(data),
                                                       str(tmp_path / "tfds"))
    assert prepared.vocab.names == ("1", "2", "3", "4") and not prepared.vocab.integer
    assert [label for _, _, label in _records(prepared, "train")][:5] == [0, 1, 2, 3, 0]
    assert _records(prepared, "validation") == [("x", "", 3), ("y", "", 0)]
    (tmp_path / "zero.csv").write_text("title,topic\nz,0\n")  # 0 was a class after all: say how to keep indices
    with pytest.raises(UserError, match=r"label '0' never occurs in data.train_file \(labels: 1, 2, 3, 4\).*"
                                        r"data.label_kind=integer if the labels are class indices"):
        labeled_builder.make_labeled_files_config(_data_config(train, tmp_path / "zero.csv", text_column="title",
                                                               label_column="topic"))
    for labels, names in (("-1,1,-1", ("-1", "1")), ("0,2,1", ("0", "1", "2"))):
        (tmp_path / "s.csv").write_text("text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate(labels.split(","))))
        assert labeled_builder.make_labeled_files_config(_data_config(tmp_path / "s.csv", eval_fraction=0.34)
                                                         ).label_names == names

    config = config_lib.base_config()
    config.task, config.data = "classification", data
    saved = {"task": "classification", "data": {"label_names": ["0", "1", "2", "3", "4"], "label_kind": "integer"}}
    config_checks.keep_saved_labels("DIR", saved, config)
    old = labeled_builder.make_labeled_files_config(config.data)
    assert old.label_names == ("0", "1", "2", "3", "4") and old.integer_labels  # as the run was trained
    fresh = config_lib.base_config()
    fresh.task, fresh.data = "classification", _data_config(train, evaluation, text_column="title",
                                                             label_column="topic", label_kind="name")
    config_checks.keep_saved_labels("DIR", saved, fresh)  # the command line's choice wins
    assert fresh.data.label_kind == "name" and not fresh.data.label_names


def test_rows_report_file_row_and_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text('text,label\n"multi\nline",a\nonly-one-field\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"short.csv, row 2 \(line 4\): 1 field\(s\) but the header has 2"):
        list(table_files.read_rows(str(path), "csv", {}))
