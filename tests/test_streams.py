"""The stream loader (data.loader=stream) end to end: real text files prepared by jaxlm's tfds
builder, a real trained BPE, real grain worker processes, real CLI runs killed with SIGKILL.

Row r of every global batch is stream r: its rows must be the same whatever the number of hosts
and workers, resume exactly from a JSON-saved state, hold whole documents separated by EOS, and
draw a mixture's documents with its weights."""

import json
import os
import random
import signal
import time

import ml_collections
import numpy as np
import psutil
import pytest
import tensorflow_datasets as tfds

from cli_runner import losses, read_metrics, run_cli, start_cli
from jaxlm.data import build_lm_data
from jaxlm.errors import UserError

# Two sources told apart by their letters: every document of A is lowercase, every one of B uppercase.
WORDS_A = "the king queen speak hear me lord good night day love war peace sword crown".split()
WORDS_B = "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE ZERO HUNDRED".split()
DOCUMENTS = 200  # Per file; eval_fraction 0.1 holds out the last 20, so 180 train documents.
TRAIN_DOCUMENTS = 180


def write_corpus(path, words, seed):
    rng, seen = random.Random(seed), []
    while len(seen) < DOCUMENTS:  # Unique, so cleaning drops none and the split is known exactly.
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        if text not in seen:
            seen.append(text)
    path.write_text("\n\n".join(seen) + "\n")
    return str(path), seen[:TRAIN_DOCUMENTS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    tfds.disable_progress_bar()
    a_file, a_train = write_corpus(root / "plays.txt", WORDS_A, 0)
    b_file, b_train = write_corpus(root / "numbers.txt", WORDS_B, 1)
    return dict(root=root, data_dir=str(root / "data"), a=a_file, b=b_file, a_train=a_train, b_train=b_train,
                mixture=f"file:{a_file}@0.75, file:{b_file}@0.25")


def data_config(corpus, **overrides):
    config = ml_collections.ConfigDict(dict(
        train_file="", eval_file="", eval_fraction=0.1, doc_split="blank_line", tfds_name="", text_key="text",
        train_split="train", eval_split="validation", data_dir=corpus["data_dir"], tokenizer="bpe",
        bpe_vocab_size=300, prefetch=2, mixture="", loader="stream", num_workers=0, packing="concat"))
    config.update(overrides)
    return config


def build(corpus, run, *, seq_len=16, global_batch_size=8, process_index=0, process_count=1, **overrides):
    """build_lm_data; `run` names the workdir, so runs over the same sources share their BPE."""
    return build_lm_data(data_config(corpus, **overrides), seq_len=seq_len, global_batch_size=global_batch_size,
                         seed=0, workdir=str(corpus["root"] / run), process_index=process_index,
                         process_count=process_count)


def take(data, count):
    return [next(data.train_iter) for _ in range(count)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), step
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"batch {step}, {key}")


BATCHES = 12
RESUME_AT = random.Random(20240607).randint(2, BATCHES - 3)  # Random-ish, fixed.


@pytest.fixture(scope="module")
def mix_base(corpus):
    """The mixture's first batches: one host, no worker process."""
    data = build(corpus, "mix", mixture=corpus["mixture"])
    batches = take(data, BATCHES)
    counts = data.train_iter.tokens_by_source()
    data.train_iter.close()
    return batches, counts


@pytest.fixture(scope="module")
def mix_workers2(corpus):
    """The same with 2 worker processes; its state after RESUME_AT batches, as saved (JSON)."""
    data = build(corpus, "mix", mixture=corpus["mixture"], num_workers=2)
    batches = take(data, RESUME_AT)
    state = data.train_iter.get_state()
    saved = json.dumps(state)
    batches += take(data, BATCHES - RESUME_AT)  # get_state() must not disturb the stream.
    data.train_iter.close()
    return batches, state, saved


def test_rows_are_the_same_for_any_workers_and_hosts(corpus, mix_base, mix_workers2):
    base, counts = mix_base
    assert {len(b["inputs"]) for b in base} == {8} and base[0]["inputs"].shape == (8, 16)
    assert len({b["inputs"].tobytes() for b in base}) == BATCHES  # Batches differ from each other.
    assert_same_batches(mix_workers2[0], base)
    one = build(corpus, "mix", mixture=corpus["mixture"], num_workers=1)
    assert_same_batches(take(one, BATCHES), base)
    one.train_iter.close()

    hosts = [build(corpus, "mix", mixture=corpus["mixture"], num_workers=2, process_index=h, process_count=2)
             for h in range(2)]
    assert [h.host_batch_size for h in hosts] == [4, 4]
    per_host = [take(h, BATCHES) for h in hosts]
    joined = [{k: np.concatenate([p[step][k] for p in per_host]) for k in base[step]} for step in range(BATCHES)]
    assert_same_batches(joined, base)
    host_counts = [h.train_iter.tokens_by_source() for h in hosts]
    for h in hosts:
        h.train_iter.close()
    assert {name: host_counts[0][name] + host_counts[1][name] for name in counts} == counts
    assert sum(counts.values()) == BATCHES * 8 * 16 and min(counts.values()) > 0


def test_resume_with_workers_from_json_state_is_exact(corpus, mix_base, mix_workers2):
    base, counts = mix_base
    _, state, saved = mix_workers2
    assert json.loads(saved) == state  # Survives the JSON round trip unchanged.
    data = build(corpus, "mix", mixture=corpus["mixture"], num_workers=2)
    data.train_iter.set_state(json.loads(saved))
    assert_same_batches(take(data, BATCHES - RESUME_AT), base[RESUME_AT:])
    assert data.train_iter.tokens_by_source() == counts  # The counts are part of the state.
    data.train_iter.close()


def test_resume_single_source_in_process_is_exact(corpus):
    straight = build(corpus, "single", train_file=corpus["a"], global_batch_size=4, seq_len=32)
    want = take(straight, BATCHES)
    straight.train_iter.close()
    first = build(corpus, "single", train_file=corpus["a"], global_batch_size=4, seq_len=32)
    assert_same_batches(take(first, RESUME_AT), want[:RESUME_AT])
    saved = json.dumps(first.train_iter.get_state())
    first.train_iter.close()
    resumed = build(corpus, "single", train_file=corpus["a"], global_batch_size=4, seq_len=32)
    resumed.train_iter.set_state(json.loads(saved))
    assert_same_batches(take(resumed, BATCHES - RESUME_AT), want[RESUME_AT:])
    resumed.train_iter.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_with_another_worker_count(corpus, mix_base, mix_workers2, workers):
    """Rows do not depend on data.num_workers, so a state saved with 2 workers must either resume
    exactly with another count or be refused with a UserError naming num_workers."""
    base, _ = mix_base
    data = build(corpus, "mix", mixture=corpus["mixture"], num_workers=workers)
    try:
        try:
            data.train_iter.set_state(json.loads(mix_workers2[2]))
        except UserError as e:
            assert f"num_workers: 2 -> {workers}" in str(e) and "\n" not in str(e)
            return
        assert_same_batches(take(data, BATCHES - RESUME_AT), base[RESUME_AT:])
    finally:
        data.train_iter.close()


def stream(batches, row):
    """Stream `row`'s tokens: the rows' inputs back to back, then the last row's last target."""
    return np.concatenate([b["inputs"][row] for b in batches] + [batches[-1]["targets"][row][-1:]])


def split_documents(tokens, eos):
    """(documents ended by an EOS, the unfinished rest)."""
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)], tokens[starts[-1]:]


def test_rows_pack_whole_documents_in_grain_order(corpus):
    g, seq_len = 4, 32
    data = build(corpus, "single", train_file=corpus["a"], global_batch_size=g, seq_len=seq_len)
    eos, per_epoch = data.eos_id, TRAIN_DOCUMENTS // g  # Stream r reads D[r], D[r+g], ...: 45 per epoch.
    batches = take(data, 8)
    while min(len(split_documents(stream(batches, r), eos)[0]) for r in range(g)) <= 2 * per_epoch:
        batches += take(data, 8)
    data.train_iter.close()

    for step, b in enumerate(batches):
        assert b["inputs"].shape == b["targets"].shape == (g, seq_len) and "segment_ids" not in b
        np.testing.assert_array_equal(b["weights"], np.ones((g, seq_len), np.float32))
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # Targets: inputs shifted.
        if step + 1 < len(batches):  # Consecutive rows of a stream overlap by exactly one token.
            np.testing.assert_array_equal(b["targets"][:, -1], batches[step + 1]["inputs"][:, 0])

    epochs = [[], []]
    for r in range(g):
        docs = [data.tokenizer.decode(d) for d in split_documents(stream(batches, r), eos)[0]]
        assert all(d in corpus["a_train"] for d in docs), "every document is a whole train document"
        epochs[0].append(docs[:per_epoch])
        epochs[1].append(docs[per_epoch:2 * per_epoch])
    # The streams' first epochs together read every train document exactly once; so do the
    # second epochs, in a fresh order.
    for epoch in epochs:
        assert sorted(d for docs in epoch for d in docs) == sorted(corpus["a_train"])
    assert epochs[0] != epochs[1]


def source_of(text):
    if text and all(c.islower() or c == " " for c in text):
        return 0
    if text and all(c.isupper() or c == " " for c in text):
        return 1
    raise AssertionError(f"a document mixes sources or is empty: {text!r}")


def test_mixture_follows_weights_and_counts_tokens(corpus):
    g, seq_len, steps = 8, 32, 64
    data = build(corpus, "mix", mixture=corpus["mixture"], global_batch_size=g, seq_len=seq_len)
    batches = take(data, steps)
    counts = data.train_iter.tokens_by_source()
    batches += take(data, 4)  # Enough to see the end of each stream's last document.
    data.train_iter.close()
    names = [f"file:{corpus['a']}", f"file:{corpus['b']}"]
    assert sorted(counts) == sorted(names)
    assert sum(counts.values()) == steps * g * seq_len

    tokens_per_source, docs_per_source = np.zeros(2, np.int64), np.zeros(2, np.int64)
    for r in range(g):
        tokens = stream(batches, r)
        docs, _ = split_documents(tokens, data.eos_id)
        sources = [source_of(data.tokenizer.decode(d)) for d in docs]
        for d, s in zip(docs, sources):
            assert data.tokenizer.decode(d) in corpus[("a_train", "b_train")[s]]
        # Input token t of the first `steps` rows belongs to the document its preceding EOSes end.
        consumed = tokens[:steps * seq_len]
        doc_of = np.cumsum(consumed == data.eos_id) - (consumed == data.eos_id)
        assert doc_of[-1] < len(docs)
        np.add.at(tokens_per_source, np.asarray(sources)[doc_of], 1)
        np.add.at(docs_per_source, np.asarray(sources)[: doc_of[-1] + 1], 1)
    assert dict(zip(names, tokens_per_source.tolist())) == counts  # Exact, token by token.
    doc_share, token_share = docs_per_source / docs_per_source.sum(), tokens_per_source / tokens_per_source.sum()
    assert docs_per_source.sum() > 700, docs_per_source  # Enough documents for the shares to mean something.
    assert abs(doc_share[0] - 0.75) < 0.05, doc_share
    # Weights pick documents, so the token share weighs them by each source's tokens per document.
    length = [np.mean([len(data.tokenizer.encode(t)) + 1 for t in corpus[key]]) for key in ("a_train", "b_train")]
    expected = 0.75 * length[0] / (0.75 * length[0] + 0.25 * length[1])
    assert abs(token_share[0] - expected) < 0.05, (token_share, expected)


def mixture_error(corpus, tmp_path, **overrides):
    with pytest.raises(UserError) as error:
        build(corpus, tmp_path.name, **overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_mixture_user_errors(corpus, tmp_path):
    a, b = corpus["a"], corpus["b"]
    message = mixture_error(corpus, tmp_path, mixture=f"{a}@0.5, file:{b}@0.5")
    assert "data.mixture entry" in message and "file:PATH_OR_GLOB@WEIGHT" in message
    message = mixture_error(corpus, tmp_path, mixture=f"http:{a}@0.5")
    assert "data.mixture entry" in message and "tfds:NAME@WEIGHT" in message
    message = mixture_error(corpus, tmp_path, mixture="file:@0.5")
    assert "data.mixture entry 'file:@0.5'" in message
    for weight in ("0", "-0.5", "nan"):
        message = mixture_error(corpus, tmp_path, mixture=f"file:{a}@{weight}, file:{b}@0.5")
        assert "data.mixture entry" in message and "the weight must be a positive number" in message, weight
    message = mixture_error(corpus, tmp_path, mixture=f"file:{a}@0.5, file:{b}@0.5", train_file=a)
    assert "data.mixture is set together with data.train_file" in message
    message = mixture_error(corpus, tmp_path, mixture=f"file:{a}@0.5, file:{b}@0.5", loader="token_cache")
    assert "data.loader=token_cache" in message and "data.mixture" in message


def test_mixture_infinite_weight_is_a_user_error(corpus, tmp_path):
    # inf passes `weight > 0`: a fresh run's BPE sampling then fails (ValueError: NaN budget); with
    # a trained BPE the normalised weights are NaN and every document silently comes from source 0.
    message = mixture_error(corpus, tmp_path, mixture=f"file:{corpus['a']}@inf, file:{corpus['b']}@1")
    assert "data.mixture entry" in message


def test_mixture_missing_file_names_the_mixture(corpus, tmp_path):
    missing = str(tmp_path / "nothing*.txt")
    message = mixture_error(corpus, tmp_path, mixture=f"file:{missing}@0.5, file:{corpus['b']}@0.5")
    assert "matches no file" in message
    assert "data.mixture" in message, f"the user never set data.train_file: {message}"


# The CLI, killed with SIGKILL and rerun: same shapes as tests/test_train.py's runlocal runs.
CONFIG = "configs/tiny_shakespeare.py"
RESUME_STEPS = 20


def cli_args(workdir, corpus):
    return ["train", f"--config={CONFIG}:runlocal", f"--workdir={workdir}",
            f"--config.data.data_dir={corpus['data_dir']}", f"--config.steps={RESUME_STEPS}",
            "--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=5",
            "--config.data.num_workers=2", "--config.data.train_file=", f"--config.data.mixture={corpus['mixture']}"]


def assert_clean_finish(output):
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]


def kill9_at(proc, workdir, after_step):
    """SIGKILLs the run once metrics.jsonl shows `after_step`; returns the pids of its child
    processes (grain workers, multiprocessing's resource tracker) still alive 10 s later."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(losses(workdir), default=0) >= after_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2, "the run should have its 2 grain worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:  # Only processes this test started.
        child.kill()
    return [child.pid for child in alive]


def test_kill9_with_workers_and_mixture_then_rerun_is_bitwise_identical(tmp_path, corpus):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    finished = run_cli(cli_args(straight, corpus))
    assert_clean_finish(finished.stdout + finished.stderr)
    want = losses(straight)
    assert sorted(want) == list(range(1, RESUME_STEPS + 1))
    kill_after = random.Random().randint(7, RESUME_STEPS - 6)  # Random, after the first checkpoint (5).
    proc = start_cli(cli_args(killed, corpus), log_path=str(tmp_path / "killed.log"))
    try:
        orphans = kill9_at(proc, killed, kill_after)
    finally:
        if proc.poll() is None:
            proc.kill()
    logged_before_kill = max(losses(killed))
    rerun = run_cli(cli_args(killed, corpus))
    assert_clean_finish(rerun.stdout + rerun.stderr)
    got = losses(killed)
    assert sorted(got) == list(range(1, RESUME_STEPS + 1)), f"killed after step {logged_before_kill}"
    for step in range(1, RESUME_STEPS + 1):  # Bitwise: the JSON floats are the float32 losses.
        assert got[step] == want[step], f"step {step} differs after kill at {logged_before_kill}"
    steps = [r["step"] for r in read_metrics(killed)]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once"
    assert losses(killed, "eval/loss") == losses(straight, "eval/loss")
    # The per-source token counts resume with the data position; they add up to every input token.
    final = [{k: v for k, v in r.items() if k.startswith("data/")}
             for w in (straight, killed) for r in read_metrics(w) if r["step"] == RESUME_STEPS]
    assert final[0] == final[1] and len(final[0]) == 4, final
    tokens = [final[0][f"data/tokens/file_{corpus[k]}"] for k in "ab"]
    assert sum(tokens) == RESUME_STEPS * 16 * 64, tokens  # runlocal: 16 rows of 64 tokens a step.
    assert not orphans, f"processes of the SIGKILLed trainer still ran 10 s later (pids {orphans})"
