"""User mistakes: one clear line naming the field or file, exit code 2, nothing written.

Most cases run `jaxlm.cli.main` in-process (8 fake devices from conftest); one runs the real
console entry point in a subprocess to check the exit code and that stderr has no traceback.
"""

import os

import pytest

from cli_runner import REPO, run_cli
from jaxlm import cli
from jaxlm import config as config_lib

CONFIG = os.path.join(REPO, "configs", "tiny_shakespeare.py")


def snapshot(directory: str) -> dict:
    """Every file under `directory` with its size and modification time."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, data_dir):
    """A finished two-step run: every error below must leave it exactly as it is."""
    workdir = str(tmp_path_factory.mktemp("existing"))
    code = cli.main(["train", f"--config={CONFIG}:runlocal", f"--workdir={workdir}",
                     f"--config.data.data_dir={data_dir}", "--config.steps=2", "--config.log_every=1",
                     "--config.mesh.data=8"])
    assert code == 0
    return workdir


def train_args(workdir, data_dir, *overrides):
    return ["train", f"--config={CONFIG}:runlocal", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.steps=2", "--config.mesh.data=8", *overrides]


def expect_user_error(capsys, argv, *needles):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    line = err[-1]
    assert line.startswith("jaxlm: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def test_unknown_config_field(capsys, existing_run, data_dir):
    before = snapshot(existing_run)
    expect_user_error(capsys, train_args(existing_run, data_dir, "--config.modle.d_model=8"), "modle", "--help_config")
    assert snapshot(existing_run) == before


def test_mesh_that_does_not_match_the_devices(capsys, existing_run, data_dir):
    before = snapshot(existing_run)
    expect_user_error(capsys, train_args(existing_run, data_dir, "--config.mesh.data=3", "--config.mesh.fsdp=1"),
                      "mesh", "8 devices")
    assert snapshot(existing_run) == before


def test_global_batch_not_divisible_by_data_parallel(capsys, existing_run, data_dir):
    before = snapshot(existing_run)
    expect_user_error(capsys, train_args(existing_run, data_dir, "--config.global_batch_size=12"),
                      "global_batch_size=12", "mesh.data x mesh.fsdp = 8")
    assert snapshot(existing_run) == before


def test_sequence_longer_than_max_positions(capsys, existing_run, data_dir):
    before = snapshot(existing_run)
    expect_user_error(capsys, train_args(existing_run, data_dir, "--config.seq_len=512"),
                      "seq_len=512", "model.max_len=256")
    assert snapshot(existing_run) == before


def test_missing_data_file(capsys, existing_run, data_dir, tmp_path):
    before = snapshot(existing_run)
    missing = str(tmp_path / "nope.txt")
    expect_user_error(capsys, train_args(existing_run, data_dir, f"--config.data.train_file={missing}"),
                      "data.train_file", missing)
    assert snapshot(existing_run) == before


def test_empty_data_file(capsys, existing_run, data_dir, tmp_path):
    before = snapshot(existing_run)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_user_error(capsys, train_args(existing_run, data_dir, f"--config.data.train_file={empty}"), str(empty))
    assert snapshot(existing_run) == before


def test_tokenizer_not_found(capsys, tmp_path, data_dir):
    workdir = tmp_path / "fresh"
    expect_user_error(capsys, train_args(str(workdir), data_dir, "--config.data.tokenizer=./no/such/tokenizer"),
                      "data.tokenizer", "./no/such/tokenizer")
    assert not workdir.exists() or snapshot(str(workdir)) == {}


def test_workdir_with_other_model_shapes_is_refused(capsys, existing_run, data_dir):
    before = snapshot(existing_run)
    line = expect_user_error(capsys, train_args(existing_run, data_dir, "--config.model.d_model=128"),
                             "model.d_model=64", "128", "fresh --workdir")
    assert "--config.model.d_model=64" in line
    assert snapshot(existing_run) == before


def test_missing_config_file(capsys, tmp_path):
    expect_user_error(capsys, ["train", "--config=configs/nope.py", f"--workdir={tmp_path}"], "configs/nope.py")


def test_bad_override_value(capsys, tmp_path, data_dir):
    expect_user_error(capsys, train_args(str(tmp_path / "w"), data_dir, "--config.steps=many"),
                      "--config.steps=many", "integer")


def test_console_script_exit_code_and_single_line(tmp_path):
    proc = run_cli(["train", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}", "--config.mesh.data=3"],
                   check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxlm: error: mesh")
    assert not (tmp_path / "w").exists()


def test_help_lists_commands_and_config_fields():
    proc = run_cli(["train", "--help_config"])
    assert "mesh.fsdp" in proc.stdout and "global_batch_size" in proc.stdout
    proc = run_cli(["train", "--help"])
    assert "--config.FIELD=VALUE" in proc.stdout


def test_help_config_lists_the_recipes_values(capsys):
    spec = f"{os.path.join(REPO, 'configs', 'csv_classification.py')}:runlocal"
    recipe_steps = config_lib.load_config(spec).steps
    assert recipe_steps != config_lib.base_config().steps
    code = cli.main(["train", f"--config={spec}", "--help_config", "--config.seed=7"])
    assert code == 0
    fields = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert fields["task"] == "'classification'" and fields["steps"] == str(recipe_steps) and fields["seed"] == "7"
    cli.main(["train", "--help_config"])  # Without --config: the base defaults.
    fields = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert fields["task"] == "'causal_lm'" and fields["steps"] == "1000"


@pytest.mark.parametrize("command, shown", [
    ("generate", ["tokens to generate per prompt at most (default: 128)", "(default: 0.0)", "(default: 1.0)",
                  "sequences per prompt (default: 1)"]),
    ("predict", ["rows per forward pass (default: 64)"]),
    ("train", ["(default: 300)"]),
])
def test_command_help_shows_defaults(capsys, command, shown):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines.
    for needle in shown:
        assert needle in text, (needle, text)
    assert "(default: None)" not in text and "(default: False)" not in text
