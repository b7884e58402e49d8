"""Classification: exact P/R/F1 against scikit-learn over 8 devices, the labelled-files builder
(CSV/TSV/JSONL, quoting, label names and kinds), every bad input through the CLI (exit 2, file
and row named, nothing written), and short end-to-end runs: from scratch (also on integer labels
named by data.label_names, evaluated later on files of either kind), from a jaxlm causal-LM run
(decoder classifier) and from the real MiniLM."""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
import sklearn.metrics

from cli_runner import read_metrics
from conftest import minilm_dir
from jaxlm import cli, sharding
from jaxlm.data import example_loader, labeled_builder, table_files
from jaxlm.errors import UserError
from jaxlm.metrics import classification_scores
from jaxlm.tasks.classification import ClassificationTask
from sample_data import BAD, GOOD, write_reviews

CSV_CONFIG = "configs/csv_classification.py"


def snapshot(directory) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size, st.st_mtime_ns)
    return out


# -- metrics: exact, over the whole eval set, padding masked out, 8 devices ----------------------------
@pytest.mark.parametrize("num_classes, positive, num_examples", [(2, 1, 37), (2, 0, 50), (3, 1, 45), (5, 0, 29)])
def test_scores_equal_sklearn_over_eight_devices(eight_devices, num_classes, positive, num_examples):
    """37 examples in global batches of 16: the last batch has 11 padding rows (weight 0)."""
    rng = np.random.default_rng(num_classes * 100 + num_examples)
    labels = rng.integers(0, num_classes, num_examples)
    logits = rng.normal(size=(num_examples, num_classes)).astype(np.float32)
    if num_classes == 5:
        labels[labels == 4] = 3  # Class 4 never occurs in the labels ...
        logits[:, 4] = -10.0  # ... nor in the predictions: sklearn leaves it out of the averages.
    mesh = sharding.make_mesh(_mesh_config(), eight_devices)
    task = ClassificationTask()

    def read_rows(ids):
        valid = ids < num_examples
        safe = np.where(valid, ids, 0)
        junk = rng.normal(size=(len(ids), num_classes)).astype(np.float32)  # Padding rows: random logits.
        return {"logits": np.where(valid[:, None], logits[safe], junk),
                "labels": np.where(valid, labels[safe], rng.integers(0, num_classes, len(ids))).astype(np.int32),
                "weights": valid.astype(np.float32)}

    step = jax.jit(lambda batch: task.eval_metrics(batch["logits"], batch))
    totals = None
    batches = list(example_loader.eval_batches(num_examples, read_rows, global_batch_size=16))
    assert len(batches) == -(-num_examples // 16)
    for batch in batches:
        update = step(sharding.to_global(batch, mesh))
        totals = update if totals is None else totals.merge(update)
    computed = jax.device_get(totals.compute())
    names = [f"c{i}" for i in range(num_classes)]
    scores = classification_scores(computed["confusion"], names, positive)
    predictions = logits.argmax(-1)

    np.testing.assert_array_equal(computed["confusion"],
                                  sklearn.metrics.confusion_matrix(labels, predictions, labels=range(num_classes)))
    assert scores["num_examples"] == num_examples
    assert scores["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions), abs=1e-12)
    average = "binary" if num_classes == 2 else "macro"
    extra = {"pos_label": positive} if average == "binary" else {}
    for name, fn in (("precision", sklearn.metrics.precision_score), ("recall", sklearn.metrics.recall_score),
                     ("f1", sklearn.metrics.f1_score)):
        assert scores[name] == pytest.approx(fn(labels, predictions, average=average, zero_division=0, **extra),
                                             abs=1e-12), name
        assert scores[f"{name}_weighted"] == pytest.approx(
            fn(labels, predictions, average="weighted", zero_division=0), abs=1e-12), name
        assert scores[f"{name}_macro"] == pytest.approx(
            fn(labels, predictions, average="macro", zero_division=0), abs=1e-12), name
        per_class = fn(labels, predictions, average=None, labels=range(num_classes), zero_division=0)
        np.testing.assert_allclose([scores["per_class"][n][name] for n in names], per_class, atol=1e-12)
    # The weighted loss over real rows only.
    shifted = logits - logits.max(-1, keepdims=True)
    ce = -(shifted[np.arange(num_examples), labels] - np.log(np.exp(shifted).sum(-1)))
    assert float(computed["loss"]) == pytest.approx(ce.mean(), rel=1e-5)


def _mesh_config():
    import ml_collections  # pylint: disable=import-outside-toplevel
    return ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))


def test_positive_label_defaults():
    from jaxlm.data.labels import positive_index  # pylint: disable=import-outside-toplevel
    assert positive_index(["negative", "positive"]) == 1
    assert positive_index(["positive", "negative"]) == 0
    assert positive_index(["0", "1"]) == 1
    assert positive_index(["spam", "ham"], "spam") == 0
    with pytest.raises(UserError, match="positive_label='x'"):
        positive_index(["a", "b"], "x")


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


# -- bad input through the CLI: one line, exit 2, file (and row) named, nothing written -------------------
@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    root = tmp_path_factory.mktemp("reviews")
    return write_reviews(root / "train.csv", 400, seed=0), write_reviews(root / "eval.csv", 61, seed=1)


def train_argv(workdir, data_dir, train_file, eval_file="", *extra):
    return ["train", f"--config={CSV_CONFIG}:runlocal", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.data.train_file={train_file}", f"--config.data.eval_file={eval_file}",
            "--config.data.text_column=review", "--config.data.label_column=sentiment", *extra]


def expect_exit_2(capsys, tmp_path, argv_maker, *needles):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    data_dir.mkdir(exist_ok=True)
    before = snapshot(data_dir)
    code = cli.main(argv_maker(workdir, data_dir))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    line = err[-1]
    assert line.startswith("jaxlm: error: ") and "Traceback" not in "\n".join(err), line
    for needle in needles:
        assert str(needle) in line, f"{needle!r} not in {line!r}"
    assert not workdir.exists(), "nothing may be written into the run"
    assert snapshot(data_dir) == before, "nothing may be written into the data_dir"
    return line


def test_csv_without_the_named_column(capsys, tmp_path, reviews):
    expect_exit_2(capsys, tmp_path, lambda w, d: train_argv(w, d, reviews[0], reviews[1],
                                                           "--config.data.text_column=body"),
                  reviews[0], "'body'", "'review'", "data.text_column")


def test_empty_file(capsys, tmp_path, reviews):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    expect_exit_2(capsys, tmp_path, lambda w, d: train_argv(w, d, empty, reviews[1]), str(empty), "empty")


def test_label_name_at_eval_never_seen_in_training(capsys, tmp_path, reviews):
    bad_eval = tmp_path / "eval.csv"
    shutil.copy(reviews[1], bad_eval)
    with open(bad_eval, "a", encoding="utf-8") as f:
        f.write("so so film,neutral\n")
    expect_exit_2(capsys, tmp_path, lambda w, d: train_argv(w, d, reviews[0], bad_eval),
                  str(bad_eval), "row 62 (line 63)", "'neutral'", "negative, positive")


def test_integer_label_out_of_range(capsys, tmp_path, reviews):
    train, evaluation = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text("review,sentiment\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    evaluation.write_text("review,sentiment\ngood,1\nodd,7\n")
    expect_exit_2(capsys, tmp_path, lambda w, d: train_argv(w, d, train, evaluation),
                  str(evaluation), "row 2 (line 3)", "label 7 is out of range", "0..1")


def test_invalid_utf8(capsys, tmp_path, reviews):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("review,sentiment\nfine,positive\ncaf\xe9 au lait,negative\n".encode("latin-1"))
    expect_exit_2(capsys, tmp_path, lambda w, d: train_argv(w, d, bad, reviews[1]),
                  str(bad), "line 3", "invalid UTF-8")


def _tiny_hf_bert(path):
    import transformers  # pylint: disable=import-outside-toplevel
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    model.save_pretrained(str(path), safe_serialization=True)
    for name in os.listdir(minilm_dir()):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(minilm_dir(), name), path / name)
    return path


@pytest.mark.parametrize("breakage, needles", [
    ("no_weights", ["model.safetensors not found"]),
    ("no_config", ["config.json not found"]),
    ("no_tokenizer", ["tokenizer.json not found", "tokenizer files"]),
    ("unsupported", ["config.json", "model_type 't5'", "not supported"]),
])
def test_bad_hugging_face_directory(capsys, tmp_path, reviews, breakage, needles):
    hf = _tiny_hf_bert(tmp_path / "hf")
    if breakage == "no_weights":
        os.remove(hf / "model.safetensors")
    elif breakage == "no_config":
        os.remove(hf / "config.json")
    elif breakage == "no_tokenizer":
        for name in os.listdir(hf):
            if name.startswith(("tokenizer", "vocab", "special_tokens")):
                os.remove(hf / name)
    else:
        config = json.loads((hf / "config.json").read_text())
        config.update(model_type="t5", architectures=["T5Model"])
        (hf / "config.json").write_text(json.dumps(config))
    expect_exit_2(capsys, tmp_path, lambda w, d: train_argv(w, d, reviews[0], reviews[1], f"--config.init_from={hf}"),
                  str(hf), *needles)


# -- end to end --------------------------------------------------------------------------------------------
def run(workdir, *argv) -> dict:
    assert cli.main(["train", f"--workdir={workdir}", *argv]) == 0
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


FAST = ["--config.log_every=10", "--config.checkpoint_every=0", "--config.eval_every=0", "--config.seq_len=16",
        "--config.global_batch_size=32", "--config.data.length_buckets=1", "--config.async_checkpointing=false"]


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, reviews):
    """The `:runlocal` recipe as it is (80 steps; FAST only drops its mid-run evals and
    checkpoints) on the review rule; predict's tests reuse the run."""
    tmp_path = tmp_path_factory.mktemp("scratch_run")
    workdir = tmp_path / "scratch"
    saved = run(workdir, f"--config={CSV_CONFIG}:runlocal", f"--config.data.data_dir={tmp_path / 'tfds'}",
                f"--config.data.train_file={reviews[0]}", f"--config.data.eval_file={reviews[1]}",
                "--config.data.text_column=review", "--config.data.label_column=sentiment", *FAST)
    return workdir, saved


def test_from_scratch_learns_the_rule(scratch_run):
    workdir, saved = scratch_run
    assert saved["data"]["label_names"] == ["negative", "positive"] and saved["data"]["num_labels"] == 2
    assert saved["data"]["label_kind"] == "name" and saved["steps"] == 80
    assert saved["classification"]["pooling"] == "mean"  # Encoder + BPE without [CLS].
    final = read_metrics(workdir)[-1]
    assert final["step"] == 80 and final["eval/accuracy"] >= 0.95, final
    report = json.loads((workdir / "eval_report.json").read_text())
    assert report["step"] == 80 and report["labels"] == ["negative", "positive"]
    assert np.sum(report["confusion_matrix"]) == 61  # Every eval example once: 61 is not a multiple of 32.
    best = json.loads((workdir / "best.json").read_text())
    assert best["metric"] == "eval/f1" and os.path.isdir(best["params"])
    assert final["eval/f1"] == pytest.approx(report["f1"])


# -- jaxlm predict ----------------------------------------------------------------------------------
def read_table(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def test_predict_labels_the_eval_file_as_eval_counts_it(tmp_path, reviews, scratch_run, capsys):
    """Predicted labels over the eval file give the run's final confusion matrix exactly; the
    probabilities do not depend on the batch size (other batch compositions and padded lengths)."""
    workdir, _ = scratch_run
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={reviews[1]}", f"--output={out}"]) == 0
    assert "labelled 61 rows with step 80" in capsys.readouterr().out
    rows, given = read_table(out), read_table(reviews[1])
    assert [r["review"] for r in rows] == [g["review"] for g in given]  # Input columns kept, in order.
    names = ["negative", "positive"]
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r["label"] for r in rows] == [names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([float(r["score"]) for r in rows], probs.max(1), atol=1e-6)
    confusion = np.zeros((2, 2), int)
    for r in rows:
        confusion[names.index(r["sentiment"]), names.index(r["label"])] += 1
    report = json.loads((workdir / "eval_report.json").read_text())
    assert confusion.tolist() == report["confusion_matrix"]

    out7 = tmp_path / "predictions.jsonl"
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={reviews[1]}", f"--output={out7}",
                     "--batch_size=7", "--best"]) == 0  # best = the last step here (eval only at the end).
    records = [json.loads(line) for line in out7.read_text().splitlines()]
    np.testing.assert_allclose([[r[f"prob_{n}"] for n in names] for r in records], probs, atol=1e-5)

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(g["review"] for g in given[:9]) + "\n\n")
    out_txt = tmp_path / "from_text.tsv"
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={texts}", f"--output={out_txt}"]) == 0
    assert [r["label"] for r in read_table(out_txt, "\t")] == [r["label"] for r in rows[:9]]


def test_eval_of_a_file_with_other_columns_needs_no_train_data(tmp_path, reviews, scratch_run, capsys):
    """`jaxlm eval` with an eval file whose columns are named differently, and a train file that is
    gone: the same rows give the metrics training logged at its final step."""
    workdir, _ = scratch_run
    run_copy = tmp_path / "run"
    shutil.copytree(workdir, run_copy)
    renamed = tmp_path / "renamed.jsonl"
    with open(renamed, "w", encoding="utf-8") as f:
        for row in read_table(reviews[1]):
            f.write(json.dumps({"id": len(row["review"]), "body": row["review"], "polarity": row["sentiment"]}) + "\n")
    assert cli.main(["eval", f"--workdir={run_copy}", f"--config.data.eval_file={renamed}",
                     f"--config.data.train_file={tmp_path / 'gone.csv'}", "--config.data.text_column=body",
                     "--config.data.label_column=polarity"]) == 0
    assert "eval at step 80" in capsys.readouterr().out
    result = json.loads((run_copy / "eval" / "eval_step80.json").read_text())
    final = read_metrics(workdir)[-1]
    assert result["report"]["confusion_matrix"] == json.loads((workdir / "eval_report.json").read_text())[
        "confusion_matrix"]
    for key in ("eval/accuracy", "eval/f1", "eval/precision", "eval/recall"):
        assert result[key] == pytest.approx(final[key], abs=1e-12), key
    assert result["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)


@pytest.fixture(scope="module")
def integer_run(tmp_path_factory):
    """A short run on SST-2-style integer labels 0/1 named by data.label_names."""
    tmp_path = tmp_path_factory.mktemp("integer_run")
    names = ("0", "1")
    train = write_reviews(tmp_path / "train.csv", 200, seed=0, label_names=names)
    evaluation = write_reviews(tmp_path / "eval.csv", 40, seed=1, label_names=names)
    workdir = tmp_path / "run"
    saved = run(workdir, f"--config={CSV_CONFIG}:runlocal", f"--config.data.data_dir={tmp_path / 'tfds'}",
                f"--config.data.train_file={train}", f"--config.data.eval_file={evaluation}",
                "--config.data.text_column=review", "--config.data.label_column=sentiment",
                "--config.data.label_names=negative,positive", "--config.steps=20", *FAST)
    return workdir, saved


def test_eval_maps_integer_labels_as_training_named_them(tmp_path, integer_run, capsys):
    """Another file with integer labels, and the same rows with name labels, both evaluate to the
    confusion matrix of predict's labels on it; an integer past the classes is a one-line error."""
    workdir, saved = integer_run
    assert saved["data"]["label_names"] == ["negative", "positive"] and saved["data"]["label_kind"] == "integer"
    names = ["negative", "positive"]
    as_integers = write_reviews(tmp_path / "other_integers.csv", 37, seed=2, label_names=("0", "1"))
    as_names = write_reviews(tmp_path / "other_names.csv", 37, seed=2)
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", f"--workdir={workdir}", f"--input={as_integers}", f"--output={out}"]) == 0
    expected = np.zeros((2, 2), int)
    for given, predicted in zip(read_table(as_integers), read_table(out)):
        expected[int(given["sentiment"]), names.index(predicted["label"])] += 1
    assert expected.sum() == 37 and [r["sentiment"] for r in read_table(as_names)] == [
        names[int(r["sentiment"])] for r in read_table(as_integers)]
    for eval_file in (as_integers, as_names):
        assert cli.main(["eval", f"--workdir={workdir}", f"--config.data.eval_file={eval_file}"]) == 0, eval_file
        result = json.loads((workdir / "eval" / "eval_step20.json").read_text())
        assert result["report"]["confusion_matrix"] == expected.tolist(), eval_file
        assert result["eval/accuracy"] == pytest.approx(np.trace(expected) / 37, abs=1e-12)
    capsys.readouterr()

    out_of_range = tmp_path / "out_of_range.csv"
    out_of_range.write_text(open(as_integers, encoding="utf-8").read() + "a great film,2\n", encoding="utf-8")
    assert cli.main(["eval", f"--workdir={workdir}", f"--config.data.eval_file={out_of_range}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    for needle in ("jaxlm: error: ", str(out_of_range), "row 38 (line 39)", "label 2 is out of range", "0..1"):
        assert needle in err[-1], (needle, err[-1])


@pytest.mark.parametrize("make_args,needle", [
    (lambda d, w: [f"--workdir={w}", f"--input={d / 'in.xml'}", f"--output={d / 'o.csv'}"], "unknown format '.xml'"),
    (lambda d, w: [f"--workdir={w}", f"--input={d / 'in.csv'}", f"--output={d / 'o.parquet'}"], "--output="),
    (lambda d, w: [f"--workdir={w}", f"--input={d / 'in.csv'}", f"--output={d / 'in.csv'}"], "exists"),
    (lambda d, w: [f"--workdir={w}", f"--input={d / 'in.csv'}", f"--output={d / 'o.csv'}", "--text_column=body"],
     "no column 'body'"),
    (lambda d, w: [f"--workdir={w}", f"--input={d / 'missing.csv'}", f"--output={d / 'o.csv'}"], "no such file"),
    (lambda d, w: [f"--workdir={w}", f"--input={d / 'in.csv'}", f"--output={d / 'o.csv'}", "--step=3"],
     "--step=3: no such checkpoint"),
    (lambda d, w: [f"--workdir={d}", f"--input={d / 'in.csv'}", f"--output={d / 'o.csv'}"], "config.json not found"),
])
def test_predict_user_errors(capsys, tmp_path, reviews, scratch_run, make_args, needle):
    workdir, _ = scratch_run
    shutil.copy(reviews[1], tmp_path / "in.csv")
    (tmp_path / "in.xml").write_text("<review>great</review>")
    before = snapshot(tmp_path), snapshot(workdir)
    assert cli.main(["predict", *make_args(tmp_path, workdir)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("jaxlm: error: ") and needle in line, line
    assert (snapshot(tmp_path), snapshot(workdir)) == before


def test_decoder_classifier_from_a_causal_lm_run(tmp_path, reviews):
    """A tiny causal-LM run on the review texts, then fine-tuned as a classifier (last-token pooling)."""
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(row[0] for row in csv.reader(open(reviews[0], encoding="utf-8"))))
    lm = tmp_path / "lm"
    run(lm, "--config=configs/tiny_shakespeare.py:runlocal", f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--config.data.train_file={text}", "--config.data.doc_split=line", "--config.data.bpe_vocab_size=300",
        "--config.steps=10", "--config.seq_len=32", *FAST[:2])
    workdir = tmp_path / "decoder_cls"
    saved = run(workdir, f"--config={CSV_CONFIG}:runlocal", f"--config.init_from={lm}",
                f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.train_file={reviews[0]}",
                f"--config.data.eval_file={reviews[1]}", "--config.data.text_column=review",
                "--config.data.label_column=sentiment", "--config.steps=60", "--config.optim.learning_rate=3e-3",
                "--config.optim.warmup_steps=10", *FAST)
    assert saved["model"]["causal"] is True and saved["model"]["d_model"] == 64  # The LM run's model.
    assert saved["classification"]["pooling"] == "last"
    assert saved["data"]["tokenizer"] == os.path.join(str(lm), "tokenizer")
    final = read_metrics(workdir)[-1]
    assert final["eval/accuracy"] >= 0.9, final


def test_minilm_fine_tunes(tmp_path, reviews):
    """The real MiniLM (init_from its HF directory): its shapes and tokenizer win; the loss drops."""
    workdir = tmp_path / "minilm"
    saved = run(workdir, f"--config={CSV_CONFIG}:runlocal", f"--config.init_from={minilm_dir()}",
                f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.train_file={reviews[0]}",
                f"--config.data.eval_file={reviews[1]}", "--config.data.text_column=review",
                "--config.data.label_column=sentiment", "--config.steps=8", "--config.optim.learning_rate=1e-4",
                "--config.optim.warmup_steps=2", "--config.classification.pooling=cls",
                "--config.classification.pooler=true", "--config.model.dropout=0.0", "--config.log_every=1",
                *FAST[1:])
    assert (saved["model"]["d_model"], saved["model"]["num_layers"], saved["model"]["vocab_size"]) == (384, 6, 30522)
    assert saved["data"]["tokenizer"] == minilm_dir()
    records = read_metrics(workdir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0], losses
    assert records[-1]["eval/accuracy"] >= 0.8, records[-1]
