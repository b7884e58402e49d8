"""`jaxlm serve`: a real HTTP server on localhost answering with a trained run's checkpoint.

- /v1/generate answers what `jaxlm generate` prints for the same prompts and settings (greedy,
  and sampled with a seed over two prompts); /v1/classify gives `jaxlm predict`'s labels and
  probabilities for the same texts.
- a client's mistakes are 400/404 answers naming the field or the right endpoint, and the
  server goes on answering; a taken port or a missing run is one line and exit code 2.
- the command: starts on a free port, prints its URL, answers, prints every thread's stack on
  SIGUSR1 and goes on answering, stops on SIGTERM with exit 0.
"""

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from cli_runner import REPO, cli_env
from sample_data import write_reviews

from jaxlm import cli, serve
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.generate import encode_prompts

LABELS = ("bad", "good")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lm"))
    assert cli.main(["train", "--config=configs/tiny_shakespeare.py:runlocal", f"--workdir={workdir}",
                     f"--config.data.data_dir={tmp_path_factory.mktemp('tfds')}", "--config.steps=2",
                     "--config.eval_batches=1"]) == 0
    return workdir


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    root = tmp_path_factory.mktemp("reviews")
    return (write_reviews(root / "train.csv", 300, seed=0, label_names=LABELS),
            write_reviews(root / "eval.csv", 40, seed=1, label_names=LABELS))


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, reviews):
    workdir = str(tmp_path_factory.mktemp("cls"))
    assert cli.main(["train", "--config=configs/csv_classification.py:runlocal", f"--workdir={workdir}",
                     f"--config.data.data_dir={tmp_path_factory.mktemp('tfds')}",
                     f"--config.data.train_file={reviews[0]}", f"--config.data.eval_file={reviews[1]}",
                     "--config.data.text_column=review", "--config.data.label_column=sentiment",
                     "--config.steps=30", "--config.eval_every=0", "--config.checkpoint_every=0"]) == 0
    return workdir


@contextlib.contextmanager
def serving(workdir, **options):
    server = serve.bind("127.0.0.1", 0)
    serve.attach(server, serve.Service(workdir, {}, **options))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def call(url, path, body=None, raw=None):
    """(status, JSON answer) of GET url+path, or of a POST when a body is given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def cli_generate(capsys, *args):
    assert cli.main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_generate_answers_what_jaxlm_generate_prints(capsys, lm_run, tmp_path):
    with serving(lm_run, max_batch=4) as url:
        assert call(url, "/health") == (200, {"status": "ok"})
        status, info = call(url, "/v1/model")
        assert status == 200 and info["task"] == "causal_lm" and info["step"] == 2 and info["context"] == 256
        assert info["endpoint"] == "/v1/generate"

        status, greedy = call(url, "/v1/generate", {"prompt": "ROMEO:", "max_new_tokens": 12})
        assert status == 200 and greedy["step"] == 2
        [one] = greedy["completions"]
        assert one["prompt"] == "ROMEO:" and one["text"]
        assert one["stopped"] in ("eos", "length") and (one["new_tokens"] == 12) == (one["stopped"] == "length")
        assert cli_generate(capsys, f"--workdir={lm_run}", "--prompt=ROMEO:", "--max_new_tokens=12") == (
            "ROMEO:" + one["text"] + "\n")

        prompts = ["KING:", "First Citizen:"]
        sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 1, "max_new_tokens": 8}
        status, sampled = call(url, "/v1/generate", {"prompts": prompts, **sampling})
        assert status == 200 and [c["prompt"] for c in sampled["completions"]] == prompts
        (tmp_path / "prompts.json").write_text(json.dumps(prompts))
        printed = cli_generate(capsys, f"--workdir={lm_run}", f"--prompts_file={tmp_path / 'prompts.json'}",
                               *(f"--{k}={v}" for k, v in sampling.items()))
        assert printed == "".join(f"[{i}] {c['prompt']}{c['text']}\n" for i, c in enumerate(sampled["completions"]))
        # Another seed samples other text (8 tokens from a 2-step model: almost surely).
        status, other = call(url, "/v1/generate", {"prompts": prompts, **sampling, "seed": 2})
        assert status == 200 and other["completions"] != sampled["completions"]


def test_a_clients_mistakes_are_answered_and_the_server_goes_on(lm_run):
    with serving(lm_run, max_batch=4) as url:
        cases = [
            ("/v1/classify", {"text": "x"}, 404, "/v1/generate"),
            ("/v1/nothing", {"prompt": "x"}, 404, "/v1/generate"),
            ("/v1/generate", {}, 400, "'prompt'"),
            ("/v1/generate", {"prompt": "x", "prompts": ["y"]}, 400, "not both"),
            ("/v1/generate", {"prompts": []}, 400, "non-empty list"),
            ("/v1/generate", {"prompts": ["a", 3]}, 400, "must be a string"),
            ("/v1/generate", {"prompts": ["a"] * 5}, 400, "at most 4"),
            ("/v1/generate", {"prompt": "x", "max_new_tokens": 1000}, 400, "context of 256 tokens"),
            ("/v1/generate", {"prompt": "x", "max_new_tokens": 0}, 400, "'max_new_tokens'"),
            ("/v1/generate", {"prompt": "x", "temperature": -1}, 400, "'temperature'"),
            ("/v1/generate", {"prompt": "x", "top_p": 0}, 400, "'top_p'"),
            ("/v1/generate", {"prompt": "x", "seed": "7"}, 400, "'seed'"),
        ]
        for path, body, status, needle in cases:
            got, answer = call(url, path, body)
            assert got == status and needle in answer["error"], (path, body, answer)
        got, answer = call(url, "/v1/generate", raw=b"{not json")
        assert got == 400 and "not JSON" in answer["error"]
        got, answer = call(url, "/v1/generate", raw=b"[1, 2]")
        assert got == 400 and "JSON object" in answer["error"]
        got, answer = call(url, "/v1/generate", {"prompt": "x", "temperature": float("nan")})
        assert got == 400 and "'temperature'" in answer["error"]
        # A body over the limit is refused from its Content-Length, unread; the connection closes.
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as conn:
            conn.sendall(f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {serve.MAX_BODY_BYTES + 1}"
                         "\r\n\r\n".encode())
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413") and b"at most" in reply, reply
        assert call(url, "/v1/generate", {"prompt": "x", "max_new_tokens": 2})[0] == 200
        # Without max_new_tokens, the server's default (128) gives way to a long prompt.
        long_prompt = "to be or not " * 40
        room = 256 - len(encode_prompts(load_tokenizer("bpe", lm_run), [long_prompt])[0])
        assert 1 <= room < 128
        status, answer = call(url, "/v1/generate", {"prompt": long_prompt})
        [done] = answer["completions"]
        assert status == 200 and (done["new_tokens"] == room if done["stopped"] == "length" else done["new_tokens"] < room)
        status, answer = call(url, "/v1/generate", {"prompt": "to be or not " * 200})
        assert status == 400 and "context of 256 tokens" in answer["error"]


def test_classify_answers_what_jaxlm_predict_writes(capsys, cls_run, reviews, tmp_path):
    with open(reviews[1], newline="", encoding="utf-8") as f:
        texts = [row["review"] for row in csv.DictReader(f)]
    assert cli.main(["predict", f"--workdir={cls_run}", f"--input={reviews[1]}",
                     f"--output={tmp_path / 'predicted.jsonl'}"]) == 0
    capsys.readouterr()
    with open(tmp_path / "predicted.jsonl", encoding="utf-8") as f:
        written = [json.loads(line) for line in f]
    with serving(cls_run) as url:
        status, info = call(url, "/v1/model")
        assert status == 200 and info["task"] == "classification" and info["labels"] == list(LABELS)
        status, answer = call(url, "/v1/classify", {"texts": texts[:5]})
        assert status == 200 and answer["labels"] == list(LABELS)
        status, single = call(url, "/v1/classify", {"text": texts[7]})
        assert status == 200
        for got, want in zip(answer["predictions"] + single["predictions"], written[:5] + written[7:8]):
            assert got["label"] == want["label"]
            assert abs(got["score"] - want["score"]) < 1e-5
            for name in LABELS:
                assert abs(got["probs"][name] - want[f"prob_{name}"]) < 1e-5, (got, want)
        assert sum(p["label"] == "good" for p in answer["predictions"]) not in (0, 5) or len(set(
            round(p["score"], 3) for p in answer["predictions"])) > 1  # Real outputs, not one constant.
        got, answer = call(url, "/v1/classify", {"texts": ["a", "b"], "text_pairs": ["c"]})
        assert got == 400 and "one pair per text" in answer["error"]
        got, answer = call(url, "/v1/generate", {"prompt": "x"})
        assert got == 404 and "/v1/classify" in answer["error"]


def test_the_command_prints_its_url_answers_dumps_stacks_on_sigusr1_and_stops_on_sigterm(cls_run, tmp_path):
    log = tmp_path / "serve.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jaxlm", "serve", f"--workdir={cls_run}", "--port=0"],
                                cwd=REPO, env=cli_env(1), stdout=out, stderr=subprocess.PIPE, text=True)
    try:
        deadline, url = time.time() + 240, None
        while url is None and time.time() < deadline and proc.poll() is None:
            found = re.search(r"^serving .* at (http://127\.0\.0\.1:\d+): POST /v1/classify", log.read_text(), re.M)
            url = found and found.group(1)
            time.sleep(0.2)
        assert url, log.read_text()
        status, answer = call(url, "/v1/classify", {"texts": ["a superb film", "an awful film"]})
        assert status == 200 and len(answer["predictions"]) == 2
        proc.send_signal(signal.SIGUSR1)  # Every thread's stack on the console; the server goes on.
        assert call(url, "/v1/classify", {"texts": ["a superb film"]})[0] == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[1] == f"stopped serving {cls_run}", lines
    assert "(most recent call first)" in err and "in serve_forever" in err, err[-3000:]


def test_a_taken_port_or_a_missing_run_is_one_line_and_exit_2(capsys, lm_run, tmp_path):
    log_before = os.path.getsize(os.path.join(lm_run, "jaxlm.log"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", f"--workdir={lm_run}", f"--port={port}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--port={port}: cannot listen there" in err[0] and "another --port" in err[0], err
    assert cli.main(["serve", f"--workdir={tmp_path / 'nothing'}", "--port=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nothing") in err[0], err
    assert cli.main(["serve", f"--workdir={lm_run}", "--port=70000"]) == 2
    assert "--port=70000" in capsys.readouterr().err
    assert os.path.getsize(os.path.join(lm_run, "jaxlm.log")) == log_before  # User errors leave the run as it was.
