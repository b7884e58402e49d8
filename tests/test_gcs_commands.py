"""Every command of a finished run on a bucket (`--workdir=gs://bkt/…`) against a real GCS server on
localhost (tests/gcs_server.py), each compared with the same run on local disk: `eval` (figures,
its JSON report and TensorBoard events on the bucket), `generate` (the same sampled text),
`predict` bucket to bucket (the same bytes), `export` (the same files, to a bucket too, weights
uploaded last); `init_from` a Hugging Face directory (the real MiniLM) and a jaxlm run on the
bucket fine-tune with the local run's train/loss, bitwise; data.tokenizer on the bucket; missing
gs:// paths are one-line errors naming the flag or field (exit 2), with nothing written.

Nothing trains on the bucket: two short local runs are trained once and uploaded with io.copy_tree.
Commands run in this process (cli.main) with the endpoint variables set by gcs.environ().
"""

import csv
import os

import numpy as np
import pytest
from cli_runner import losses, runlocal_train
from conftest import minilm_dir
from gcs_server import gcs  # noqa: F401  (the module-scoped fixture)
from sample_data import write_reviews

from jaxlm import cli, io

LM_STEPS, CLS_STEPS, MINILM_STEPS = 6, 6, 2
CSV_CONFIG = "configs/csv_classification.py:runlocal"
# tests/test_classification.py's FAST settings: short rows, one length bucket, synchronous saves.
FAST = ["--config.log_every=1", "--config.checkpoint_every=0", "--config.eval_every=0", "--config.seq_len=16",
        "--config.global_batch_size=32", "--config.data.length_buckets=1", "--config.async_checkpointing=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gcs_commands")


@pytest.fixture(scope="module")
def reviews(root):
    return write_reviews(root / "train.csv", 400, seed=0), write_reviews(root / "eval.csv", 61, seed=1)


def train(*argv: str) -> None:
    assert cli.main(list(argv)) == 0, argv


def classifier_argv(workdir, root, reviews, *extra):
    return ["train", f"--config={CSV_CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={root / 'tfds'}",
            f"--config.data.train_file={reviews[0]}", f"--config.data.eval_file={reviews[1]}",
            "--config.data.text_column=review", "--config.data.label_column=sentiment", *FAST, *extra]


@pytest.fixture(scope="module")
def runs(gcs, root, reviews):  # noqa: F811
    """(local, bucket) URLs of two runs trained here: a tiny causal LM ('lm') and a decoder classifier
    fine-tuned from it ('cls', init_from the local LM run), each uploaded whole to the bucket."""
    local = {"lm": root / "lm", "cls": root / "cls"}
    train(*runlocal_train(local["lm"], root / "tfds", LM_STEPS, "--config.data.bpe_vocab_size=300",
                          "--config.eval_batches=2"))
    train(*classifier_argv(local["cls"], root, reviews, f"--config.init_from={local['lm']}",
                           f"--config.steps={CLS_STEPS}"))
    bucket = {name: gcs.url("runs", name) for name in local}
    with gcs.environ():
        for name in local:
            io.copy_tree(local[name], bucket[name])
    return {name: str(path) for name, path in local.items()}, bucket


def jaxlm(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *argv: str) -> str:
    code, out, err = jaxlm(capsys, *argv)
    assert code == 0, err[-3000:]
    return out


def event_scalars(gcs, directory, scratch) -> dict:  # noqa: F811
    """{tag: (step, value)} of the TensorBoard event files under `directory` on the bucket."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    os.makedirs(scratch, exist_ok=True)
    with gcs.environ():
        names = io.list_dir(directory)
        for name in names:
            io.copy_file(f"{directory}/{name}", os.path.join(scratch, name))
    assert names and all(n.startswith("events.out.tfevents.") for n in names), names
    found = {}
    for name in names:
        for event in tf.compat.v1.train.summary_iterator(os.path.join(scratch, name)):
            for value in event.summary.value:
                found[value.tag] = (event.step, float(np.float32(tf.make_ndarray(value.tensor))))
    return found


def test_eval_of_a_bucket_run_equals_the_local_run(gcs, runs, capsys, tmp_path):  # noqa: F811
    local, bucket = runs
    for name, step in (("lm", LM_STEPS), ("cls", CLS_STEPS)):
        ok(capsys, "eval", f"--workdir={local[name]}")
        want = io.read_json(os.path.join(local[name], "eval", f"eval_step{step}.json"))
        with gcs.environ():
            printed = ok(capsys, "eval", f"--workdir={bucket[name]}")
            got = io.read_json(f"{bucket[name]}/eval/eval_step{step}.json")
        assert f"wrote {bucket[name]}/eval/eval_step{step}.json" in printed
        assert got.pop("checkpoint") == f"{bucket[name]}/checkpoints/{step}/state"
        want.pop("checkpoint")
        assert got == want and "eval/loss" in got, name  # Every figure (and the classifier's report) equal.
        events = event_scalars(gcs, f"{bucket[name]}/eval/eval", tmp_path / name)
        assert events["eval/loss"] == (step, float(np.float32(want["eval/loss"]))), name
    # data.tokenizer on the bucket: the LM run's own tokenizer, read from its bucket copy.
    with gcs.environ():
        ok(capsys, "eval", f"--workdir={local['lm']}", f"--config.data.tokenizer={bucket['lm']}/tokenizer")
        want = io.read_json(f"{bucket['lm']}/eval/eval_step{LM_STEPS}.json")
    with_bucket_tokenizer = io.read_json(os.path.join(local["lm"], "eval", f"eval_step{LM_STEPS}.json"))
    assert with_bucket_tokenizer.pop("checkpoint") != want.pop("checkpoint")
    assert with_bucket_tokenizer == want


def test_generate_from_a_bucket_run_prints_the_local_text(gcs, runs, capsys, tmp_path):  # noqa: F811
    local, bucket = runs
    sampled = ["--temperature=1.0", "--top_k=40", "--seed=3", "--num_samples=2", "--max_new_tokens=16"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: O\n", encoding="utf-8")
    want = ok(capsys, "generate", f"--workdir={local['lm']}", f"--prompts_file={prompts}", *sampled)
    with gcs.environ():
        io.copy_file(prompts, f"{bucket['lm']}-prompts/prompts.txt")
        got = ok(capsys, "generate", f"--workdir={bucket['lm']}", f"--prompts_file={bucket['lm']}-prompts/prompts.txt",
                 *sampled)
    assert got == want
    assert want.count("[") == 4 and len(want) > 4 * len("JULIET: O") + 16  # 2 prompts x 2 samples of new text.


def test_predict_bucket_to_bucket_writes_the_local_bytes(gcs, runs, reviews, capsys, tmp_path):  # noqa: F811
    local, bucket = runs
    out = tmp_path / "predictions.csv"
    ok(capsys, "predict", f"--workdir={local['cls']}", f"--input={reviews[1]}", f"--output={out}")
    with gcs.environ():
        source, target = f"{bucket['cls']}-io/eval.csv", f"{bucket['cls']}-io/predictions.csv"
        io.copy_file(reviews[1], source)
        printed = ok(capsys, "predict", f"--workdir={bucket['cls']}", f"--input={source}", f"--output={target}")
        got = io.read_bytes(target)
    assert f"labelled 61 rows with step {CLS_STEPS}" in printed and printed.rstrip().endswith(f"wrote {target}")
    assert got == out.read_bytes()
    rows = list(csv.DictReader(out.read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 61 and {"review", "sentiment", "label", "score", "prob_negative"} <= set(rows[0])


def test_export_of_a_bucket_run_to_a_bucket_writes_the_local_files(gcs, runs, capsys, tmp_path):  # noqa: F811
    local, bucket = runs
    ok(capsys, "export", f"--workdir={local['lm']}", f"--out={tmp_path / 'local'}")
    names = sorted(os.listdir(tmp_path / "local"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(names)
    out = f"{bucket['lm']}-hf"
    with gcs.environ():
        ok(capsys, "export", f"--workdir={bucket['lm']}", f"--out={tmp_path / 'from_bucket'}")
        printed = ok(capsys, "export", f"--workdir={bucket['lm']}", f"--out={out}")
        assert io.list_dir(out) == names
        for name in names:
            want = (tmp_path / "local" / name).read_bytes()
            assert io.read_bytes(f"{out}/{name}") == want, name
            assert (tmp_path / "from_bucket" / name).read_bytes() == want, name
    assert f"exported step {LM_STEPS} as a Hugging Face gpt2 model to {out}: {', '.join(names)}" in printed
    generations = {n.rsplit("/", 1)[1]: int(m["generation"]) for n, m in gcs.objects(f"{out}/").items()}
    assert max(generations, key=generations.get) == "model.safetensors"  # Uploaded last: its presence = complete.
    assert os.listdir(os.path.join(io.cache_dir(), "exports")) == []  # The local scratch went.


def minilm_argv(workdir, root, reviews, init_from):
    return classifier_argv(workdir, root, reviews, f"--config.init_from={init_from}",
                           f"--config.steps={MINILM_STEPS}", "--config.optim.learning_rate=1e-4",
                           "--config.optim.warmup_steps=1", "--config.classification.pooling=cls",
                           "--config.classification.pooler=true", "--config.model.dropout=0.0",
                           # One row per device, one eval batch, no best/ copy: 22M params are slow here.
                           "--config.global_batch_size=8", "--config.eval_batches=1", "--config.best_metric=")


def test_init_from_a_hugging_face_model_on_a_bucket_fine_tunes_bitwise_as_from_local(
        gcs, root, reviews, tmp_path):  # noqa: F811
    model = gcs.url("models", "minilm")
    with gcs.environ():
        io.copy_tree(minilm_dir(), model, last="model.safetensors")
        train(*minilm_argv(tmp_path / "from_bucket", root, reviews, model))
    train(*minilm_argv(tmp_path / "from_local", root, reviews, minilm_dir()))
    want, got = losses(str(tmp_path / "from_local")), losses(str(tmp_path / "from_bucket"))
    assert sorted(want) == list(range(1, MINILM_STEPS + 1))
    assert got == want  # Bitwise: JSON floats are the float32 losses, exactly.
    saved = io.read_json(tmp_path / "from_bucket" / "config.json")
    assert saved["init_from"] == model and saved["data"]["tokenizer"] == model
    assert saved["model"] == io.read_json(tmp_path / "from_local" / "config.json")["model"]
    # The tokenizer was read from a copy of the directory's small files only, not its weights.
    copies = os.path.join(io.cache_dir(), "bucket_copies")
    tokenizer_copies = [d for d in os.listdir(copies) if d.startswith("tokenizer-")]
    assert tokenizer_copies and not any(
        os.path.exists(os.path.join(copies, d, "model.safetensors")) for d in tokenizer_copies)


def test_init_from_a_jaxlm_run_on_a_bucket_fine_tunes_bitwise_as_from_local(
        gcs, runs, root, reviews, capsys, tmp_path):  # noqa: F811
    local, bucket = runs
    workdir = tmp_path / "cls_from_bucket"
    with gcs.environ():
        train(*classifier_argv(workdir, root, reviews, f"--config.init_from={bucket['lm']}",
                               f"--config.steps={CLS_STEPS}"))
        saved = io.read_json(workdir / "config.json")
        assert saved["data"]["tokenizer"] == f"{bucket['lm']}/tokenizer"  # The LM run's, on the bucket.
        assert losses(str(workdir)) == losses(local["cls"]) and len(losses(str(workdir))) == CLS_STEPS
        # Its tokenizer stays on the bucket: predict reads it from there, with the local run's output.
        ok(capsys, "predict", f"--workdir={workdir}", f"--input={reviews[1]}", f"--output={tmp_path / 'a.jsonl'}")
    ok(capsys, "predict", f"--workdir={local['cls']}", f"--input={reviews[1]}", f"--output={tmp_path / 'b.jsonl'}")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_missing_bucket_paths_are_one_line_errors_naming_the_flag(gcs, runs, reviews, root, capsys, tmp_path):  # noqa: F811
    local, bucket = runs
    gone, table = gcs.url("nothing", "here"), f"{bucket['cls']}-errors/eval.csv"
    cases = [
        (["eval", f"--workdir={gone}"], f"{gone}/config.json not found: --workdir"),
        (["generate", f"--workdir={bucket['lm']}", f"--prompts_file={gone}.txt"], f"--prompts_file={gone}.txt: no such file"),
        (["predict", f"--workdir={bucket['cls']}", f"--input={gone}.csv", f"--output={tmp_path / 'p.csv'}"],
         f"--input={gone}.csv: no such file"),
        (["predict", f"--workdir={bucket['cls']}", f"--input={table}", f"--output={tmp_path / 'p.csv'}",
          "--text_column=body"], f"{table}: no column 'body'"),
        (["predict", f"--workdir={bucket['cls']}", f"--input={reviews[1]}", "--output=gs://no-such-bucket/p.csv"],
         "--output=gs://no-such-bucket/p.csv: bucket gs://no-such-bucket does not exist"),
        (["export", f"--workdir={bucket['lm']}", "--out=gs://no-such-bucket/hf"],
         "--out=gs://no-such-bucket/hf: bucket gs://no-such-bucket does not exist"),
        (["export", f"--workdir={bucket['lm']}", f"--out={bucket['lm']}"], f"--out={bucket['lm']} is not empty"),
        (["eval", f"--workdir={local['lm']}", f"--config.data.tokenizer={gone}"],
         f"data.tokenizer={gone}: no such directory"),
        (classifier_argv(tmp_path / "run", root, reviews, f"--config.init_from={gone}"),
         f"init_from={gone}: no such directory"),
    ]
    with gcs.environ():
        io.copy_file(reviews[1], table)
        before = {name: m["generation"] for name, m in gcs.objects().items()}
        for argv, needle in cases:
            code, _, err = jaxlm(capsys, *argv)
            lines = err.strip().splitlines()
            assert code == 2 and "Traceback" not in err, (argv, err[-2000:])
            assert lines[-1].startswith("jaxlm: error: ") and needle in lines[-1], (needle, lines[-1])
        after = {name: m["generation"] for name, m in gcs.objects().items()}
    assert after == before  # Nothing written to the bucket (no log, no half output).
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "run").exists()
