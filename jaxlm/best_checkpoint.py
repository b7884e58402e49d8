"""The best evaluation so far by one metric: its params in DIR/best/<step>/ and DIR/best.json.

Kept apart from the rolling checkpoints (which must always hold the latest step for resuming).
The params are written synchronously: the train step donates them right after.
"""

import math
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxlm import io

BEST_DIRNAME = "best"
BEST_JSON = "best.json"


class BestCheckpoint:
    def __init__(self, workdir: str, metric: str, mode: str = "max"):
        self.workdir = io.path(workdir)
        self.metric, self.mode = metric, mode
        # A resumed run keeps the best it had (a broken best.json is a UserError naming it).
        self.record: Optional[dict] = io.read_json(self.workdir / BEST_JSON, default=None)
        self._manager = None
        self._warned = False

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.record is None:
            return True
        best = self.record["value"]
        return value > best if self.mode == "max" else value < best

    def update(self, step: int, scalars: dict, params: Any, report: Optional[dict] = None) -> bool:
        """Saves `params` when scalars[metric] beats the best so far. Every process calls this."""
        if self.metric not in scalars:
            if not self._warned:
                logging.warning("best_metric=%s is not among the eval metrics (%s); no best checkpoint is kept",
                                self.metric, ", ".join(sorted(scalars)))
                self._warned = True
            return False
        value = float(scalars[self.metric])
        if not self._better(value) or (self.record is not None and self.record.get("step") == step):
            return False
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.workdir / BEST_DIRNAME,
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False),
                item_handlers={"params": ocp.StandardCheckpointHandler()})
        self._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        self._manager.wait_until_finished()
        self.record = {"step": step, "metric": self.metric, "value": value, "mode": self.mode,
                       "params": os.fspath(self.workdir / BEST_DIRNAME / str(step) / "params"),
                       "report": report or {}}
        if jax.process_index() == 0:
            io.write_json_atomic(self.workdir / BEST_JSON, self.record)
        logging.info("best checkpoint: %s=%.4g at step %d", self.metric, value, step)
        return True

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
