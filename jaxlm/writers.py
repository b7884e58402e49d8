"""Metric writers (clu): console + TensorBoard + DIR/metrics.jsonl (+ Weights & Biases).

TensorBoardWriter is a clu MetricWriter over jaxlm.tensorboard_events, without TensorFlow
(clu's own SummaryWriter is tf.summary, and importing TensorFlow is most of a command's
start-up). Only process 0 writes files; the other hosts log to their console only.
metrics.jsonl goes through jaxlm.io (local disk or an object store). TensorBoard events for a
bucket workdir are written on local disk and copied to the bucket at each flush
(BucketSummaryWriter).
"""

import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging
from clu import metric_writers

from jaxlm import io
from jaxlm.tensorboard_events import EventFile

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable.
    return value


class ScalarsOnlyWriter(metric_writers.MetricWriter):
    """A writer that keeps scalars only; clu's other kinds of summary are ignored."""

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class JsonlWriter(ScalarsOnlyWriter):
    """Appends one JSON object per write_scalars call: {"step": N, "train/loss": …}."""

    def __init__(self, path: io.PathLike):
        self._appender = io.JsonlAppender(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self._appender.append({"step": int(step), **{k: _plain(v) for k, v in sorted(scalars.items())}})

    def flush(self):
        self._appender.flush()

    def close(self):
        self._appender.close()


class TensorBoardWriter(ScalarsOnlyWriter):
    """Scalars into a TensorBoard event file in `logdir` (a local directory), as clu's
    SummaryWriter writes them (float32 scalar summaries), without importing TensorFlow."""

    def __init__(self, logdir: str):
        self._events = EventFile(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self._events.add_scalars(step, scalars)

    def flush(self):
        self._events.flush()

    def close(self):
        self._events.close()


class BucketSummaryWriter(TensorBoardWriter):
    """TensorBoard events for a workdir on a bucket. An event file is appended to, which an
    object store cannot do: the events are written into a local scratch directory of this host
    (JAXLM_CACHE_DIR/tensorboard/) and each event file that grew is uploaded whole through
    jaxlm.io at every flush (the train loop flushes at each log step: a few hundred bytes per
    logged step, so uploads stay small).
    TensorBoard reads the gs:// logdir as it reads a local one. A kill loses the events since the
    last flush; its scratch directory stays behind in the cache (a few KB)."""

    def __init__(self, workdir: io.PathLike):
        self.target = io.path(workdir)
        parent = os.path.join(io.cache_dir(), "tensorboard")
        os.makedirs(parent, exist_ok=True)
        self.local_dir = tempfile.mkdtemp(prefix="events-", dir=parent)
        self._uploaded: dict[str, int] = {}  # Relative path -> size last uploaded.
        super().__init__(self.local_dir)

    def _upload(self) -> None:
        for name in io.files_under(self.local_dir):
            size = os.path.getsize(os.path.join(self.local_dir, name))
            if self._uploaded.get(name) != size:
                io.copy_file(os.path.join(self.local_dir, name), self.target / name)
                self._uploaded[name] = size

    def flush(self):
        super().flush()
        self._upload()

    def close(self):
        super().close()
        self._upload()
        shutil.rmtree(self.local_dir, ignore_errors=True)


class WandbWriter(ScalarsOnlyWriter):
    """Forwards scalars to Weights & Biases (the `wandb` extra)."""

    def __init__(self, project: str, entity: str, name: str, config: dict):
        try:
            import wandb  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            from jaxlm.errors import UserError  # pylint: disable=import-outside-toplevel
            raise UserError("wandb.enabled=true needs the wandb package: pip install 'jaxlm[wandb]'") from e
        self._run = wandb.init(project=project, entity=entity or None, name=name, config=config,
                               resume="allow")

    def write_scalars(self, step, scalars):
        self._run.log({k: _plain(v) for k, v in scalars.items()}, step=int(step))

    def write_hparams(self, hparams):
        self._run.config.update(hparams, allow_val_change=True)

    def close(self):
        self._run.finish()


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops records after `last_step` (a resumed run logs those steps again), atomically; a line
    cut short by a kill goes too (the resumed run writes that step again)."""
    io.truncate_jsonl(io.path(workdir) / METRICS_FILE,
                      lambda record: isinstance(record.get("step"), (int, float)) and record["step"] <= last_step)


def create_writer(workdir: str, is_primary: bool, wandb_config: Optional[Any] = None,
                  run_config: Optional[dict] = None) -> metric_writers.MetricWriter:
    if not is_primary:
        return metric_writers.LoggingWriter()
    writers = [metric_writers.LoggingWriter(), JsonlWriter(io.path(workdir) / METRICS_FILE)]
    try:
        writers.append(BucketSummaryWriter(workdir) if io.is_remote(workdir)
                       else TensorBoardWriter(os.fspath(io.path(workdir))))
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard writer unavailable (%s); metrics go to metrics.jsonl only", e)
    if wandb_config is not None and wandb_config.enabled:
        name = wandb_config.name or io.path(workdir).name
        writers.append(WandbWriter(wandb_config.project, wandb_config.entity, name, run_config or {}))
    return metric_writers.MultiWriter(writers)
