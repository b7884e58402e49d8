"""Classification: exact P/R/F1 against scikit-learn over 8 devices, every bad input through the
CLI (exit 2, file and row named, nothing written), and short end-to-end runs: from scratch (also
on integer labels named by data.label_names, evaluated later on files of either kind), from a
jaxlm causal-LM run (decoder classifier) and from the real MiniLM. The data itself (loader,
builder, label kinds): tests/test_labeled_files.py."""

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
from jaxlm.data import example_loader
from jaxlm.errors import UserError
from jaxlm.metrics import classification_scores
from jaxlm.tasks.classification import ClassificationTask
from sample_data import write_reviews

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
