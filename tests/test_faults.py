"""Faults of a run directory, on a local disk and on a bucket (the real GCS server of
tests/gcs_server.py), through real `jaxlm train` processes:

- the newest checkpoint unreadable (a tensorstore chunk truncated, the data-iterator state
  deleted, _METADATA truncated, the manifest deleted): one warning line, the run resumes from
  the one before with every train/loss bitwise the uninterrupted run's, the bad step is kept
  aside and saved anew; every checkpoint unreadable: one error line, exit 2, nothing changed;
- the lease: a live run's workdir is refused (exit 2, naming the holder); kill -9, then the
  rerun takes over at once; a dead pid on this host or an old heartbeat from another host is
  taken over (library level), a live pid here or a fresh heartbeat from elsewhere refused;
- the bucket unreachable or missing: one line, exit 2, within seconds.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runner import REPO, cli_env, losses, run_cli, runlocal_train
from gcs_server import free_port, gcs  # noqa: F401  (the module-scoped fixture)

from jaxlm import bucket_fs, bucket_probe, io, restore
from jaxlm import run as run_lib
from jaxlm.errors import UserError
from jaxlm.lease import LEASE_FILE, Lease

STEPS = 10
EVERY = 4  # Checkpoints 4, 8 and 10 (the last step is always saved).
FAST = ("--config.eval_batches=2",)


def train_args(workdir, data_dir, *flags, steps=STEPS):
    return runlocal_train(workdir, data_dir, steps, f"--config.checkpoint_every={EVERY}", *FAST, *flags)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run (local), whose checkpoints the corrupted copies start from."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    run_cli(train_args(workdir, data_dir))
    assert restore.checkpoint_steps(workdir) == [4, 8, 10]
    assert not os.path.exists(os.path.join(workdir, LEASE_FILE)), "released at a clean end"
    return workdir


def error_lines(stderr: str) -> list[str]:
    """The console's error lines: a library's ERROR record, the CLI's one line, a traceback."""
    return [line for line in stderr.splitlines() if re.match(r"(\d\d:\d\d:\d\d error: |jaxlm: error: |Traceback)", line)]


def around_first_error(stderr: str) -> str:
    """The console around its first error line, for a failure message."""
    lines = error_lines(stderr)
    at = stderr.find(lines[0]) if lines else len(stderr)
    return stderr[max(0, at - 2500):at + 1500]


def largest_chunk(step_dir_files: dict[str, int]) -> str:
    chunks = {name: size for name, size in step_dir_files.items() if "/d/" in name}
    return max(chunks, key=chunks.get)


def saved_state(state_dir) -> dict:
    """A local checkpoint's train state as saved (no target: orbax reads its own metadata)."""
    with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as checkpointer:
        warnings.simplefilter("ignore")  # "Sharding info not provided": one CPU device either way.
        return checkpointer.restore(os.fspath(state_dir))


def break_file(step_dir, name: str, how: str) -> bytes:
    """Truncates (to half) or deletes checkpoint file `name` of `step_dir`; returns its bytes."""
    original = io.read_bytes(step_dir / name)
    if how == "truncate":
        io.write_bytes_atomic(step_dir / name, original[: len(original) // 2])
    else:
        io.remove(step_dir / name)
    return original


# Steps 10 and 8 broken (one file truncated, another deleted), so the rerun falls back twice,
# to step 4. (file of step 10, file of step 8), relative to the step directory; None: the
# largest tensorstore chunk.
CASES = {
    "local": (None, "data/process_0-of-1.json"),  # A chunk truncated; the data-iterator state deleted.
    "bucket": ("state/_METADATA", "state/manifest.ocdbt"),  # The tree metadata truncated; the manifest deleted.
}


@pytest.mark.parametrize("where", list(CASES))
def test_unreadable_newest_checkpoints_resume_from_an_older_one(where, gcs, reference, data_dir, tmp_path):  # noqa: F811
    with gcs.environ():
        workdir = gcs.fresh_prefix() if where == "bucket" else str(tmp_path / "run")
        io.copy_tree(reference, workdir)
        checkpoints = io.path(workdir) / "checkpoints"
        broken = {}  # step -> (file, how, its bytes before, the step's files after)
        for step, name, how in ((10, CASES[where][0], "truncate"), (8, CASES[where][1], "delete")):
            name = name or largest_chunk({n: len(io.read_bytes(checkpoints / "10" / n))
                                          for n in io.files_under(checkpoints / "10")})
            before = break_file(checkpoints / str(step), name, how)
            broken[step] = (name, how, before, io.files_under(checkpoints / str(step)))

    proc = run_cli(train_args(workdir, data_dir), env=gcs.env)

    warned = [line for line in proc.stderr.splitlines() if " warning: " in line]
    assert len(warned) == 1, proc.stderr[-3000:]
    assert (f"warning: checkpoint: steps 10, 8 in {workdir}/checkpoints are unreadable (step 10: " in warned[0]
            and "; step 8: " in warned[0] and "); resuming from step 4 (kept as 10.unreadable-" in warned[0]), warned[0]
    assert not error_lines(proc.stderr), around_first_error(proc.stderr)
    assert "resuming from step" not in proc.stderr.replace(warned[0], ""), "said once"
    with gcs.environ():
        records = io.read_jsonl(f"{workdir}/metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "each step once"
        got = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
        assert restore.checkpoint_steps(workdir) == [4, 8, 10], "step 4 kept, steps 8 and 10 saved anew"
        for step, (name, how, before, files) in broken.items():
            aside = [n for n in io.list_dir(checkpoints) if n.startswith(f"{step}.unreadable-")]
            assert len(aside) == 1, io.list_dir(checkpoints)
            assert io.files_under(checkpoints / aside[0]) == files, "every file of the bad step kept"
            if how == "truncate":
                assert io.read_bytes(checkpoints / aside[0] / name) == before[: len(before) // 2]
        assert not io.exists(f"{workdir}/{LEASE_FILE}"), "released at the end"
        io.copy_tree(checkpoints / "10" / "state", tmp_path / "resaved")
    assert got == losses(reference), "every train/loss bitwise the uninterrupted run's"
    # Step 10 saved anew is the uninterrupted run's train state (params, optimizer), exactly.
    resaved, want = saved_state(tmp_path / "resaved"), saved_state(os.path.join(reference, "checkpoints", "10", "state"))
    assert int(resaved["step"]) == STEPS and len(jax.tree.leaves(resaved)) == len(jax.tree.leaves(want)) > 10
    for a, b in zip(jax.tree.leaves(resaved), jax.tree.leaves(want), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_no_readable_checkpoint_is_one_error_line_and_changes_nothing(reference, data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for step in (4, 8, 10):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "manifest.ocdbt"))
    before = sorted(io.files_under(os.path.join(workdir, "checkpoints")))
    metrics = open(os.path.join(workdir, "metrics.jsonl"), "rb").read()

    proc = run_cli(train_args(workdir, data_dir), check=False)

    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert errors[0].startswith(f"jaxlm: error: {workdir}/checkpoints: no checkpoint can be read (step 10: "), errors
    assert "step 8: " in errors[0] and "step 4: " in errors[0] and "fresh --workdir" in errors[0]
    assert sorted(io.files_under(os.path.join(workdir, "checkpoints"))) == before
    assert open(os.path.join(workdir, "metrics.jsonl"), "rb").read() == metrics
    assert not os.path.exists(os.path.join(workdir, LEASE_FILE)), "released on the user error"


def read_lease(workdir):
    with open(os.path.join(workdir, LEASE_FILE)) as f:
        return json.load(f)


def test_a_live_runs_workdir_is_refused_and_taken_over_after_kill9(data_dir, reference, tmp_path):  # reference: data ready
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-m", "jaxlm", *train_args(workdir, data_dir, steps=1000)], cwd=REPO,
                              env=cli_env(1), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "holder.log", "w"))
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(workdir, LEASE_FILE)) and holder.poll() is None:
            assert time.time() < deadline, "no lease after 120 s"
            time.sleep(0.05)
        lease = read_lease(workdir)
        assert (lease["host"], lease["pid"]) == (socket.gethostname(), holder.pid)

        second = run_cli(train_args(workdir, data_dir), check=False)
        assert holder.poll() is None, "the holder is still running"
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"jaxlm: error: --workdir={workdir} is in use by another jaxlm train (host "
                               f"{socket.gethostname()}, pid {holder.pid}, since "), line
        assert f"kill {holder.pid}" in line and len(error_lines(second.stderr)) == 1, second.stderr[-3000:]
        assert read_lease(workdir)["token"] == lease["token"], "the refused run left the lease alone"
    finally:
        holder.kill()  # SIGKILL: the lease stays behind.
        holder.wait(timeout=60)
    assert read_lease(workdir)["pid"] == holder.pid

    # The rerun at once: it takes the lease over (then stops at a config error, the quickest run
    # that takes and releases it; test_train's kill -9 tests rerun to the end through this path).
    rerun = run_cli(train_args(workdir, data_dir, "--config.steps=0"), check=False)
    assert rerun.stderr.strip().splitlines()[-1] == "jaxlm: error: steps=0: must be positive", rerun.stderr[-3000:]
    assert (f"lease: taking over {workdir}/{LEASE_FILE} from host {socket.gethostname()}, pid {holder.pid}, since "
            in rerun.stderr and f"pid {holder.pid} is not running on this host" in rerun.stderr), rerun.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, LEASE_FILE)), "taken, then released on the user error"


def planted_lease(host, pid, heartbeat_age):
    now = time.time()
    return {"host": host, "pid": pid, "pid_start": None, "started": now - heartbeat_age - 60,
            "heartbeat": now - heartbeat_age, "token": "planted"}


def take_and_release(workdir) -> dict:
    """Takes the lease as `jaxlm train` does; returns the record it wrote, then releases it."""
    lease = Lease(workdir, 5.0)
    lease.acquire()
    try:
        return io.read_json(f"{workdir}/{LEASE_FILE}")
    finally:
        lease.release()


def test_a_dead_pid_on_this_host_is_taken_over_at_once(tmp_path):
    workdir = str(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    io.write_json_atomic(f"{workdir}/{LEASE_FILE}", planted_lease(socket.gethostname(), int(gone.stdout), 0))
    record = take_and_release(workdir)
    assert record["pid"] == os.getpid() and record["token"] != "planted"
    assert not os.path.exists(f"{workdir}/{LEASE_FILE}"), "released"
    # A live pid of this host (this test's own parent) is refused, however old its heartbeat.
    io.write_json_atomic(f"{workdir}/{LEASE_FILE}", planted_lease(socket.gethostname(), os.getppid(), 3600))
    with pytest.raises(UserError, match=rf"is in use by another jaxlm train \(host .*, pid {os.getppid()}, since "):
        take_and_release(workdir)


def test_another_hosts_lease_is_taken_over_once_its_heartbeat_is_old(gcs):  # noqa: F811
    with gcs.environ():
        workdir = gcs.fresh_prefix()
        io.write_json_atomic(f"{workdir}/{LEASE_FILE}", planted_lease("tpu-vm-7", 4242, 30))
        with pytest.raises(UserError) as refused:
            take_and_release(workdir)
        assert str(refused.value).startswith(f"--workdir={workdir} is in use by another jaxlm train (host tpu-vm-7, "
                                             f"pid 4242, since ")
        assert "lease_timeout_minutes=5" in str(refused.value) and f"remove {workdir}/{LEASE_FILE}" in str(refused.value)
        assert io.read_json(f"{workdir}/{LEASE_FILE}")["token"] == "planted", "left alone"

        io.write_json_atomic(f"{workdir}/{LEASE_FILE}", planted_lease("tpu-vm-7", 4242, 301))  # > 5 minutes
        record = take_and_release(workdir)
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        assert not io.exists(f"{workdir}/{LEASE_FILE}")


def test_an_unreachable_storage_endpoint_is_one_line_within_seconds(data_dir, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    env = {"STORAGE_EMULATOR_HOST": closed, "TENSORSTORE_GCS_HTTP_URL": closed,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}
    expected = ("gs://bkt/runs/x: the storage service cannot be reached (ClientConnectorError: Cannot connect to "
                "host 127.0.0.1:")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(UserError) as refused:  # The probe alone (gcsfs's own retries take 33 s).
        bucket_probe.check_reachable("gs://bkt/runs/x")
    assert time.monotonic() - start < 5, "a refused connection: two tries, 1 s apart"
    assert str(refused.value).startswith(expected)

    proc = run_cli(train_args("gs://bkt/runs/x", data_dir), env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"jaxlm: error: {expected}"), proc.stderr[-3000:]


class StallingEndpoint:
    """A storage endpoint on localhost whose first connection reads the request and never
    answers (a half-dead connection); every later one answers 404."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.done.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn, self.connections == 1), daemon=True).start()

    def _answer(self, conn, stall: bool):
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            if stall:
                self.done.wait(60)
                return
            body = b'{"error": {"code": 404, "message": "No such object"}}'
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self):
        self.done.set()
        self.server.close()


def test_a_stalled_bucket_request_times_out_and_is_retried(monkeypatch):
    """gcsfs gives aiohttp no timeout of its own: a connection that never answers would hang the
    host (and a pod with it). jaxlm's gcsfs setup fails it after STALL_SECONDS of silence and
    gcsfs retries it; here the retry gets the endpoint's answer (404: a missing object)."""
    import gcsfs  # pylint: disable=import-outside-toplevel
    endpoint = StallingEndpoint()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint.url)
    monkeypatch.setattr(bucket_fs, "STALL_SECONDS", 1.0)
    bucket_fs.gcsfs_class.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        start = time.monotonic()
        with pytest.raises(FileNotFoundError):
            io.read_bytes("gs://bkt/runs/x/config.json")
        took = time.monotonic() - start
    finally:
        endpoint.close()
        monkeypatch.undo()
        bucket_fs.gcsfs_class.cache_clear()
        bucket_fs.gcsfs_class()  # The defaults again, for the tests after this one.
        gcsfs.GCSFileSystem.clear_instance_cache()
    assert endpoint.connections >= 2, "the stalled request was not retried"
    assert 1.0 <= took < 15, took  # 1 s of silence, gcsfs's first back-off (1-2 s), the 404


def test_a_missing_bucket_is_one_line(gcs, data_dir):  # noqa: F811
    proc = run_cli(train_args("gs://no-such-bucket/runs/x", data_dir), env=gcs.env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = ("gs://no-such-bucket/runs/x: bucket gs://no-such-bucket does not exist (or these credentials cannot "
               "see it); create it or fix the bucket name")
    assert error_lines(proc.stderr) == [f"jaxlm: error: {message}"], proc.stderr[-3000:]
    with gcs.environ(), pytest.raises(UserError) as refused:  # What eval, generate, predict, export open.
        run_lib.find_run("gs://no-such-bucket/runs/x")
    assert str(refused.value) == message


def test_a_closed_loop_traceback_of_a_failed_restore_goes_to_the_log_only(tmp_path, monkeypatch, capsys):
    """tensorstore reports a read that ends after its restore failed through sys.excepthook (a
    bare traceback of 'Event loop is closed'): filtered once a restore failed; anything else shown."""
    from jaxlm import checkpoint  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    checkpoint._quiet_abandoned_reads(tmp_path)  # pylint: disable=protected-access
    closed = RuntimeError("Event loop is closed")
    sys.excepthook(RuntimeError, closed, None)
    assert capsys.readouterr().err == ""
    other = RuntimeError("a real bug")
    sys.excepthook(RuntimeError, other, None)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "RuntimeError: a real bug"


def test_the_closed_loop_filter_is_in_place_before_the_first_restore_attempt(tmp_path, monkeypatch, capsys):
    """orbax closes its loop as a restore fails, and a read may end in it before the error reaches
    restore_latest: the filter must already be installed when the first attempt starts (it was
    installed after the failure, and a bare traceback reached the console once)."""
    from jaxlm import checkpoint  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, with_data=False)
    state = {"w": np.arange(4, dtype=np.float32)}
    ckpt.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    ckpt.manager.wait_until_finished()

    def failing_restore(step, abstract_state, data_iter=None):
        # What tensorstore does from its thread as the failed restore's loop closes.
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
        raise ValueError("NOT_FOUND: a missing array")

    monkeypatch.setattr(ckpt, "restore", failing_restore)
    with pytest.raises(UserError, match="no checkpoint can be read"):
        ckpt.restore_latest({"w": jax.ShapeDtypeStruct((4,), np.float32)})
    assert capsys.readouterr().err == ""
    ckpt.close()
