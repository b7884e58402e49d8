"""Orbax checkpoints: train state + every host's data-iterator state, saved together.

- Saves every N steps and/or every M minutes, keeps the last K, writes in the background.
- A checkpoint is committed atomically by orbax (temp dir + rename): a run killed mid-save
  resumes from the previous complete one.
- Restores onto the *current* mesh: the abstract target carries this run's shardings and
  orbax reshards whatever mesh wrote the files.
- A committed checkpoint can still be unreadable (a file truncated or lost since): resuming
  tries the newest first and falls back step by step (`restore_latest`).
"""

import gc
import json
import logging as std_logging  # absl's `logging` is the one used for messages.
import os
import sys
import time
import traceback
import types
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxlm import console, io
from jaxlm.errors import UserError

try:  # grain's orbax handler writes one iterator-state file per process.
    import grain.checkpoint as grain_checkpoint
except ImportError:  # pragma: no cover - grain is a runtime dependency
    grain_checkpoint = None


def checkpoint_dir(workdir: str) -> epath.Path:
    return io.path(workdir) / "checkpoints"


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """Thin policy layer over ocp.CheckpointManager (when to save, what goes in)."""

    def __init__(self, workdir: str, *, every_steps: int = 0, every_minutes: float = 0.0,
                 keep: int = 3, asynchronous: bool = True, with_data: bool = True):
        self.directory = checkpoint_dir(workdir)
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.with_data = with_data and grain_checkpoint is not None
        handlers = {"state": ocp.StandardCheckpointHandler()}
        if self.with_data:
            handlers["data"] = grain_checkpoint.CheckpointHandler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=asynchronous),
            item_handlers=handlers)
        self._last_save_time = time.monotonic()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `step` should be saved. The time rule is agreed across hosts by the caller."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and (time.monotonic() - self._last_save_time) >= 60 * self.every_minutes

    def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if self.with_data and data_iter is not None:
            items["data"] = grain_checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._last_save_time = time.monotonic()
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore_latest(self, abstract_state: Any, data_iter: Any = None) -> Optional[tuple[int, Any]]:
        """(step, state) of the newest checkpoint that restores; None when there is none.

        The restore itself is the only reliable check of a checkpoint, so each step is tried,
        newest first, and any failure but a UserError (the config's, the same for every step)
        moves on to the next older one. All processes try the same steps in the same order and
        a step counts only if it restored on every one of them, so they resume from one step.
        Newer unreadable steps are then set aside (`_set_aside`); if none restores, a UserError
        and nothing is changed on disk.
        """
        failed: list[tuple[int, str]] = []
        steps = sorted(self.all_steps(), reverse=True)
        if steps:
            # Before the first attempt: a failed restore's reads can end before its error reaches here.
            _quiet_abandoned_reads(self.directory)
        for step in steps:
            state, cause = None, ""
            try:
                state = self.restore(step, abstract_state, data_iter)
            except UserError:
                raise
            except Exception as e:  # pylint: disable=broad-except  # Whatever the storage stack raises.
                cause = short_cause(e)
            if not _on_every_process(not cause):
                failed.append((step, cause or "unreadable on another process"))
                del state
                continue
            if failed:
                self._set_aside(failed, step)  # Its warning says where the run resumes.
            else:
                logging.info("resuming from step %d", step)
            return step, state
        if failed:
            _drain_abandoned_reads()  # Else they may end during the exit, which then aborts.
            raise UserError(f"{self.directory}: no checkpoint can be read ({_causes(failed)}); nothing was changed. "
                            f"Restore the files from a copy, or start over with a fresh --workdir")
        return None

    def _set_aside(self, failed: list[tuple[int, str]], resumed: int) -> None:
        """Moves the unreadable steps to <step>.unreadable-<time>, a name orbax does not list: kept
        for inspection, they no longer block the rerun's saves (orbax saves no step at or below
        its latest and refuses an existing one) nor count against keep_checkpoints (which would
        delete good older ones first). Process 0 moves; the others wait for it."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for step, _ in failed:
            source, target = self.directory / str(step), self.directory / f"{step}.unreadable-{stamp}"
            if jax.process_index() == 0:
                _move_dir(source, target)
            moved.append(target.name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxlm: unreadable checkpoints set aside")
        self.manager.reload()
        steps = ", ".join(str(step) for step, _ in failed)
        logging.warning("checkpoint: step%s %s in %s %s unreadable (%s); resuming from step %d (kept as %s)",
                        "s" if len(failed) > 1 else "", steps, self.directory, "are" if len(failed) > 1 else "is",
                        _causes(failed), resumed, ", ".join(moved))

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores the state into the shardings that `abstract_state` carries, and the data
        iterator to the batch after `step`."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        own_file = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        restore_data_here = self.with_data and data_iter is not None and own_file.exists()
        if restore_data_here:
            items["data"] = grain_checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None and self.with_data and not restore_data_here:
            self._restore_data_from_any_host(step, data_iter)
        return restored["state"]

    def _restore_data_from_any_host(self, step: int, data_iter: Any) -> None:
        """A run resumed with another process count: every host consumed the same number of
        batches of the same global order, so any host's saved position is this host's too."""
        data_dir = self.directory / str(step) / "data"
        saved = [name for name in io.list_dir(data_dir) if name.startswith("process_")]
        if not saved:  # Not a UserError: restore_latest falls back to an older checkpoint.
            raise FileNotFoundError(f"{data_dir}: no data-iterator state")
        data_iter.set_state(json.loads(io.read_text(data_dir / saved[0])))
        logging.info("data: the process count changed since step %d; resumed the data position from %s",
                     step, saved[0])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_RESTORE_DIRECTORIES: set[str] = set()  # Checkpoint directories restored from (or tried) in this process.
_LAST_ABANDONED = [0.0]  # time.monotonic() of the latest report of an abandoned read.


def _quiet_abandoned_reads(directory: epath.Path) -> None:
    """After a failed restore, the reads still in flight end later: tensorstore's finish into
    the asyncio loop orbax has closed (RuntimeError('Event loop is closed')), orbax's read
    coroutines are garbage-collected with their own errors, and asyncio finds futures whose
    error nobody took. Python reports each as a traceback ("Exception ignored in …", or a bare
    one through sys.excepthook) or an asyncio ERROR on the console, even after the next restore
    succeeded. Those go to the log file only; any other exception or asyncio error is shown as
    before. Installed before a resume's first restore attempt, for the rest of the process: orbax
    closes its loop as the restore fails, and a read can end in it before the error reaches the
    caller (a bare traceback was seen so, once the hook was only installed after the failure)."""
    _RESTORE_DIRECTORIES.add(os.fspath(directory))
    previous = sys.unraisablehook
    if getattr(previous, "jaxlm_abandoned_reads", False):
        return
    seen = []

    def hook(unraisable) -> None:
        if not _abandoned_read(unraisable):
            previous(unraisable)
            return
        _LAST_ABANDONED[0] = time.monotonic()
        if not seen:
            console.log_only("checkpoint: a read of the failed restore ended afterwards (%s); ignored",
                             short_cause(unraisable.exc_value))
        seen.append(1)

    def excepthook(kind, error, tb) -> None:
        # A callback of tensorstore's that fails reports through sys.excepthook (PyErr_Print):
        # the same closed loop, as a bare traceback (seen once in the no-readable-step test).
        if _closed_loop(error):
            hook(types.SimpleNamespace(exc_value=error, object=None))
        else:
            previous_excepthook(kind, error, tb)

    previous_excepthook = sys.excepthook
    hook.jaxlm_abandoned_reads = True
    sys.unraisablehook, sys.excepthook = hook, excepthook
    std_logging.getLogger("asyncio").addFilter(_demote_abandoned_tasks)


def _abandoned_read(unraisable) -> bool:
    if _closed_loop(unraisable.exc_value):
        return True
    code = getattr(unraisable.object, "cr_code", None)  # A coroutine collected unfinished.
    return code is not None and _in_storage_stack(code.co_filename)


def _closed_loop(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _in_storage_stack(text: str) -> bool:
    return any(f"{os.sep}{package}{os.sep}" in text for package in ("orbax", "tensorstore"))


def _demote_abandoned_tasks(record: std_logging.LogRecord) -> bool:
    """asyncio's ERROR "Task/Future exception was never retrieved" about a read of a failed
    restore (its text names that checkpoint directory, or it was raised in or defined by orbax
    or tensorstore): kept for the log file only, at INFO."""
    message = str(record.msg)
    if "exception was never retrieved" not in message:
        return True
    error = record.exc_info[1] if record.exc_info else None
    raised_in = [frame.filename for frame in traceback.extract_tb(error.__traceback__)] if error else []
    if (any(directory in message for directory in _RESTORE_DIRECTORIES) or _in_storage_stack(message)
            or any(map(_in_storage_stack, raised_in))):
        record.levelno, record.levelname, record.jaxlm_log_only = std_logging.INFO, "INFO", True
        _LAST_ABANDONED[0] = time.monotonic()
    return True


def _drain_abandoned_reads(quiet: float = 1.0, limit: float = 10.0) -> None:
    """Waits until the failed restores' reads have reported in (each does as it ends: see
    `_quiet_abandoned_reads`): none for `quiet` seconds, `limit` at most. A read still running
    when the interpreter exits can abort it ("terminate called without an active exception")."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        gc.collect()  # Orbax's unfinished read coroutines report when collected.
        time.sleep(0.1)
        if time.monotonic() - max(start, _LAST_ABANDONED[0]) >= quiet:
            return


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _move_dir(source: epath.Path, target: epath.Path) -> None:
    """Locally one rename. A bucket has none: every object is copied, then the step's commit
    marker goes first, so a move cut short leaves a step orbax no longer lists, never a listed
    one with files missing."""
    if not io.is_remote(source):
        source.rename(target)
        return
    io.copy_tree(source, target)
    io.remove(source / "commit_success.txt", missing_ok=True)
    io.remove_tree(source)


def short_cause(e: BaseException) -> str:
    """The innermost error's first line (tensorstore's outer one ends in a page of spec)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0].strip()
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


def _causes(failed: list[tuple[int, str]]) -> str:
    if len(failed) == 1:
        return failed[0][1]
    return "; ".join(f"step {step}: {cause}" for step, cause in failed)
