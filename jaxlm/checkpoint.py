"""Orbax checkpoints: train state + every host's data-iterator state, saved together.

- Saves every N steps and/or every M minutes, keeps the last K, writes in the background.
- A checkpoint is committed atomically by orbax (temp dir + rename): a run killed mid-save
  resumes from the previous complete one.
- Restores onto the *current* mesh: the abstract target carries this run's shardings and
  orbax reshards whatever mesh wrote the files.
"""

import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxlm import io
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
        if not saved:
            raise UserError(f"{data_dir}: the checkpoint has no data-iterator state; resume from a complete "
                            f"checkpoint or use a fresh --workdir")
        data_iter.set_state(io.read_json(data_dir / saved[0]))
        logging.info("data: the process count changed since step %d; resumed the data position from %s",
                     step, saved[0])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
