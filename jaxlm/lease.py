"""DIR/lease.json: one `jaxlm train` at a time writes a run directory.

    with hold(workdir, timeout_minutes):   # `jaxlm train` only; eval, generate, ... read without it
        ...train...

Process 0 writes the lease (host, pid, start time, heartbeat) through jaxlm.io, so it works on
a bucket, and a daemon thread renews the heartbeat every HEARTBEAT_SECONDS (or a quarter of the
timeout, if shorter). A second run on the same workdir is refused with a UserError naming the
holder, unless the holder is dead:
- on this host, its pid is not running (or is a zombie, or a newer process reuses the pid):
  taken over at once, so kill -9 and rerun works;
- elsewhere, its heartbeat is older than `lease_timeout_minutes`.
The lease is removed when the block ends, however it ends (a finished run, a SIGTERM save, a
user error, a divergence); only kill -9 or a lost machine leaves it, for the rules above.
The other processes of a multi-host run neither read nor write it: they learn from process 0
whether it was taken. The check and the write are two steps, so two runs started within the
same second can both pass the check; the read-back after the write refuses the loser.
"""

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Optional

from absl import logging

from jaxlm import io
from jaxlm.errors import UserError

LEASE_FILE = "lease.json"
HEARTBEAT_SECONDS = 30.0


def lease_path(workdir: str):
    return io.path(workdir) / LEASE_FILE


def _process_start(pid: int) -> Optional[str]:
    """The pid's start time in clock ticks since boot (Linux /proc), which tells a reused pid
    apart; None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if fields[0] != "Z" else "zombie"  # Field 22 of stat; field 3 is the state.


def _running_here(pid: int, start: Optional[str]) -> bool:
    if pid == os.getpid():
        return False  # Left by this very process (an earlier run in it): not a rival.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Another user's process: it exists.
    now = _process_start(pid)
    if now == "zombie":
        return False
    return start is None or now is None or now == start


def dead_holder_reason(record: dict, timeout_s: float, now: float) -> Optional[str]:
    """Why the lease's holder is gone, or None when it may still be running."""
    if record.get("host") == socket.gethostname():
        if not _running_here(int(record.get("pid", -1)), record.get("pid_start")):
            return f"pid {record.get('pid')} is not running on this host"
        return None
    age = now - float(record.get("heartbeat", 0))
    if age > timeout_s:
        return f"its last heartbeat was {age:.0f} s ago (lease_timeout_minutes={timeout_s / 60:g})"
    return None


def _describe(record: dict, now: float) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    return (f"host {record.get('host')}, pid {record.get('pid')}, since {since}, last heartbeat "
            f"{now - float(record.get('heartbeat', 0)):.0f} s ago")


class Lease:
    """Process 0's hold on DIR/lease.json (see the module docstring)."""

    def __init__(self, workdir: str, timeout_minutes: float):
        if not timeout_minutes > 0:
            raise UserError(f"lease_timeout_minutes={timeout_minutes}: must be positive (minutes without a "
                            f"heartbeat after which another run may take the workdir over)")
        self.workdir, self.path = workdir, lease_path(workdir)
        self.timeout_s = 60.0 * timeout_minutes
        self.interval = min(HEARTBEAT_SECONDS, self.timeout_s / 4)
        self.token = uuid.uuid4().hex
        self.record: dict = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._made_workdir = False

    def _read(self) -> Optional[dict]:
        try:
            record = io.read_json(self.path, default=None)
        except UserError:  # Not JSON: written by hand or torn outside jaxlm.io; nobody's lease.
            logging.warning("lease: %s is not a lease record; replacing it", self.path)
            return None
        return record if isinstance(record, dict) else None

    def acquire(self) -> None:
        now = time.time()
        held = self._read()
        if held is not None and held.get("token") != self.token:
            reason = dead_holder_reason(held, self.timeout_s, now)
            if reason is None:
                raise UserError(self._refusal(held, now))
            logging.info("lease: taking over %s from %s: %s", self.path, _describe(held, now), reason)
        self._made_workdir = not io.is_remote(self.workdir) and not io.exists(self.workdir)
        io.make_dirs(self.workdir)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": now, "heartbeat": now, "token": self.token,
                       "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}
        io.write_json_atomic(self.path, self.record)
        written = self._read()  # A run that wrote in the same moment: the last writer holds it.
        if written is None or written.get("token") != self.token:
            raise UserError(self._refusal(written or {}, time.time()))
        self._thread = threading.Thread(target=self._renew, name="jaxlm-lease", daemon=True)
        self._thread.start()

    def _refusal(self, held: dict, now: float) -> str:
        here = held.get("host") == socket.gethostname()
        fix = (f"wait for it to end, stop it (kill {held.get('pid')}), or use another --workdir" if here else
               f"wait for it to end or stop it there, or use another --workdir; if it is dead, rerun after "
               f"its heartbeat is lease_timeout_minutes={self.timeout_s / 60:g} old, or remove {self.path}")
        return f"--workdir={self.workdir} is in use by another jaxlm train ({_describe(held, now)}; {self.path}): {fix}"

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                held = self._read()
                if held is not None and held.get("token") != self.token:
                    logging.warning("lease: %s was taken over by %s; this run no longer holds the workdir",
                                    self.path, _describe(held, time.time()))
                    return
                self.record["heartbeat"] = time.time()
                io.write_json_atomic(self.path, self.record)
            except Exception as e:  # pylint: disable=broad-except  # A storage blip: retry next beat.
                logging.warning("lease: heartbeat of %s not written (%s: %s)", self.path, type(e).__name__, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if not self.record:
            return
        try:
            held = self._read()
            if held is not None and held.get("token") == self.token:
                io.remove(self.path, missing_ok=True)
            if self._made_workdir and not io.list_dir(self.workdir):
                io.remove_tree(self.workdir)  # Empty: only the lease was ever written (a user error).
        except Exception as e:  # pylint: disable=broad-except  # The run's result stands.
            logging.warning("lease: %s not removed (%s: %s); the next run takes it over", self.path,
                            type(e).__name__, e)
        self.record = {}


@contextlib.contextmanager
def hold(workdir: str, timeout_minutes: float) -> Iterator[None]:
    """The lease for the block, taken by process 0; every process raises if it was not taken."""
    import jax  # pylint: disable=import-outside-toplevel
    lease, refused = None, None
    if jax.process_index() == 0:
        lease = Lease(workdir, timeout_minutes)
        try:
            lease.acquire()
        except Exception as e:  # pylint: disable=broad-except  # Raised below, after the others heard.
            refused = e
    if jax.process_count() > 1:
        import numpy as np  # pylint: disable=import-outside-toplevel
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not taken and refused is None:
            refused = UserError(f"--workdir={workdir}: process 0 could not take {lease_path(workdir)}; "
                                f"its console says why")
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lease is not None:
            lease.release()
