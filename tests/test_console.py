"""The console is for people; library chatter goes to DIR/jaxlm.log.

One real `jaxlm train` subprocess, started as a user would (JAX_PLATFORMS unset, libtpu installed
by the test extra, a fresh tfds data_dir), and in-process checks of what the console handler
lets through and of when the log file opens.
"""

import logging
import os
import re
import subprocess
import sys

import pytest

from cli_runner import REPO, cli_env
from jaxlm import compat, console

ERROR_LINE = re.compile(r"error|^[EF]\d{4} ", re.IGNORECASE)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """(stdout, stderr, workdir) of a 4-step tiny_shakespeare run with two checkpoints."""
    tmp = tmp_path_factory.mktemp("console")
    workdir = tmp / "run"
    env = cli_env(devices=1)
    env.pop("JAX_PLATFORMS", None)  # As a user runs it: the CLI decides not to probe for a TPU.
    env.pop("JAXLM_LOG_LEVEL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm", "train", "--config=configs/tiny_shakespeare.py:runlocal",
         f"--workdir={workdir}", f"--config.data.data_dir={tmp / 'tfds'}", "--config.steps=4",
         "--config.log_every=2", "--config.eval_every=4", "--config.checkpoint_every=2", "--config.eval_batches=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, proc.stderr, workdir


def test_console_has_progress_checkpoints_and_the_final_line_only(user_run):
    stdout, stderr, workdir = user_run
    lines = stderr.splitlines()
    assert [line for line in lines if ERROR_LINE.search(line)] == []
    assert stdout.splitlines() == [next(line for line in stdout.splitlines() if line.startswith("final (step 4"))]
    saves = [line for line in lines if "checkpoint: saving step" in line]
    assert [s.split("saving step ")[1].split()[0] for s in saves] == ["2", "4"]
    assert any(re.search(r"progress: .*\(2/4\), ETA", line) for line in lines), stderr
    assert any(re.search(r"step 4: eval/accuracy=[\d.]+ .*train/loss=[\d.]+", line) for line in lines), stderr
    # Library output is in none of them: orbax, tfds, TensorFlow's native start-up, libtpu.
    for chatter in ("Saving checkpoint at step", "orbax", "Downloading and preparing", "oneDNN", "TPU",
                    "steps_per_sec=", "Logging before flag parsing"):
        assert chatter not in stderr + stdout, chatter
    assert f"library messages: {workdir / console.LOG_FILE}" in stderr
    assert len(lines) <= 25, stderr


def test_log_file_holds_the_library_messages(user_run):
    _, stderr, workdir = user_run
    log = (workdir / console.LOG_FILE).read_text()
    for line in ("JAX_PLATFORMS=", "preparing dataset jaxlm_text_files", "Saving checkpoint at step 2",
                 "Saving checkpoint at step 4", "[2] steps_per_sec=", "checkpoint: saving step 4"):
        assert line in log, line
    # Everything the console said is in the file too (the console's own note aside).
    for line in stderr.splitlines():
        message = re.sub(r"^(warning|error|critical): ", "", line.split(" ", 1)[1])
        if not message.startswith(("library messages:", "progress:", "step ")):
            assert message in log, message


@pytest.fixture
def fresh_console(monkeypatch):
    monkeypatch.delenv("JAXLM_LOG_LEVEL", raising=False)
    yield lambda: console.setup()
    console.close()
    logging.getLogger().handlers = [h for h in logging.getLogger().handlers
                                    if type(h).__module__ != "jaxlm.console"]
    logging.captureWarnings(False)


def test_library_info_waits_for_the_run_and_goes_to_the_file_only(fresh_console, tmp_path, capsys):
    fresh_console()
    library = logging.getLogger("some.library")
    (tmp_path / "config.json").write_text("{}")  # An earlier run's config: not yet this run's.
    console.log_to_workdir(str(tmp_path), wait_for_config=True)
    library.info("before the run is validated")
    library.error("a real problem")
    assert not (tmp_path / console.LOG_FILE).exists()
    os.replace(_write(tmp_path / "new.json", "{}"), tmp_path / "config.json")  # The run writes its config.
    library.info("after config.json")
    console.close()
    err = capsys.readouterr().err
    assert "before the run" not in err and "after config.json" not in err
    assert re.search(r"^\d\d:\d\d:\d\d error: a real problem$", err, re.M), err
    log = (tmp_path / console.LOG_FILE).read_text()
    assert log.index("before the run is validated") < log.index("a real problem") < log.index("after config.json")


def test_native_stderr_goes_to_the_log_not_the_console(fresh_console, tmp_path, capfd):
    """What C++ libraries write to file descriptor 2 (TensorFlow's start-up lines, which some
    CPUs get and others do not, libtpu's) lands in the log file, one record per line."""
    fresh_console()
    (tmp_path / "config.json").write_text("{}")
    console.log_to_workdir(str(tmp_path))
    with console.native_output_to_log("tensorflow"):
        os.write(2, b"I0000 cpu_feature_guard.cc:210] native start-up line\n\nsecond line\n")
    console.close()
    assert "native start-up line" not in capfd.readouterr().err
    log = (tmp_path / console.LOG_FILE).read_text()
    assert "native.tensorflow" in log and "native start-up line" in log and "second line" in log


def test_user_error_before_the_run_writes_nothing(fresh_console, tmp_path):
    fresh_console()
    console.log_to_workdir(str(tmp_path), wait_for_config=True)
    logging.getLogger("some.library").info("chatter")
    console.close()
    assert os.listdir(tmp_path) == []


def test_a_finished_runs_log_gets_a_commands_records_at_its_end_unless_a_user_error(fresh_console, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for keep in (False, True):
        fresh_console()
        console.log_to_workdir(str(tmp_path))
        logging.getLogger("some.library").info("eval chatter %s", keep)
        assert not (tmp_path / console.LOG_FILE).exists()
        console.close(keep_log=keep)
    assert (tmp_path / console.LOG_FILE).read_text().count("eval chatter") == 1
    assert "eval chatter True" in (tmp_path / console.LOG_FILE).read_text()


def test_debug_level_shows_everything(fresh_console, monkeypatch, capsys):
    monkeypatch.setenv("JAXLM_LOG_LEVEL", "debug")
    fresh_console()
    logging.getLogger("some.library").debug("library detail")
    assert "library detail" in capsys.readouterr().err


def test_tpu_probe_is_left_to_jax_when_asked_or_on_a_tpu_vm(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert compat.platforms_without_tpu_probe() is None
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    assert compat.platforms_without_tpu_probe() is None


def _write(path, text):
    path.write_text(text)
    return path


def test_per_class_eval_values_stay_off_the_console():
    """A 6-class eval logs 36 confusion counts and 18 per-class scores: the console line keeps
    the headline figures and says where the rest went."""
    scalars = {"eval/accuracy": 0.4976, "eval/f1_macro": 0.4812345, "eval/f1/ROMEO": 0.5,
               "eval/confusion/ROMEO/ROMEO": 12.0, "eval/confusion/ROMEO/GLOUCESTER": 3.0}
    record = logging.LogRecord("absl", logging.INFO, os.path.join("clu", "metric_writers", "logging_writer.py"),
                               48, "[250] " + ", ".join(f"{k}={v}" for k, v in scalars.items()), None, None)
    line = console._ConsoleFormatter().format(record)  # pylint: disable=protected-access
    assert line.endswith("step 250: eval/accuracy=0.4976  eval/f1_macro=0.4812  (+3 per-class values in metrics.jsonl)")


HIDE_ON_IMPORT = """
import sys
from jaxlm.commands import common
hidden = []
common._hide_gpus = hidden.append  # what the hook calls, recorded
common.hide_gpus_from_tensorflow()
assert "tensorflow" not in sys.modules, "imported before anything needs it"
import clu.metric_writers  # as the train loop does: clu's import of tensorflow is deferred
assert "tensorflow" not in sys.modules and not hidden
import tensorflow as tf  # as anything that uses it would
common.hide_gpus_from_tensorflow()  # a second call: TensorFlow is there, hidden at once
assert [m.__name__ for m in hidden] == ["tensorflow", "tensorflow"], hidden
assert hidden[0] is tf
print("ok")
"""


def test_tensorflow_gpus_are_hidden_when_it_is_imported_not_before(tmp_path):
    """TensorFlow is not imported at a command's start, nor by clu (jaxlm.deferred_imports); when
    something does import it, the GPUs are hidden from it right then and its native start-up lines
    (oneDNN, CPU features: printed on this CPU) stay off the console."""
    proc = subprocess.run([sys.executable, "-c", HIDE_ON_IMPORT], cwd=REPO, env=cli_env(devices=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert "oneDNN" not in proc.stderr and "cpu_feature_guard" not in proc.stderr, proc.stderr[-3000:]
