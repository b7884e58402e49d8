"""What every jaxlm tfds builder of local files shares, single-process or on Apache Beam.

    name = builders.config_name(files[0], builders.content_hash(options, files), "text")
    builder, reused = builders.prepare(JaxlmTextFiles, config, data_dir)

- The config name carries a hash of the files' content and of the options: changed inputs get
  a new dataset directory (a stale preparation is never reused), unchanged ones reuse it.
- `prepare` is the multi-host guard: every host may call it on a shared data_dir; the losers of
  the race to rename the finished copy into place find a complete copy and use it. On a bucket
  data_dir (gs://) process 0 prepares on its disk and uploads; every host reads a local copy
  (bucket_data).
- Input files may be local or gs:// (globs too); their bytes are streamed, never copied first.
- `LocalFilesBuilder` saves a JSON record (the cleaning counts, the label vocabulary) inside
  tfds's temporary directory, so it is renamed into place together with the data.
- `Progress` logs documents/s, bytes/s and an ETA while a pass reads the files.
"""

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from jaxlm import io
from jaxlm.data import bucket_data, documents
from jaxlm.errors import UserError

_PROGRESS_INTERVAL_S = 10.0  # Seconds between two progress lines of one pass.


def resolve_files(spec: str | Sequence[str], field: str) -> tuple[str, ...]:
    """Expands comma-separated paths/globs, in the given order, into absolute file paths (gs://
    URLs for files in a bucket; local and bucket entries may be mixed).

    A glob's matches are sorted so the order never depends on the filesystem. Every entry must
    match at least one file; `field` (e.g. 'data.train_file') is named in the error.
    """
    patterns = spec.split(",") if isinstance(spec, str) else list(spec)
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise UserError(f"{field} is empty: set it to a text file, a glob, or comma-separated paths")
    files: list[str] = []
    for pattern in patterns:
        for match in _matches(pattern, field):
            if match not in files:  # A file named twice would silently double its weight.
                files.append(match)
    return tuple(files)


def _matches(pattern: str, field: str) -> list[str]:
    remote = io.is_remote(pattern)
    expanded = pattern if remote else os.path.expanduser(pattern)
    try:
        if glob.has_magic(expanded):
            matches = list(io.glob_versions(expanded))
            if not matches:
                raise UserError(f"{field}: glob {pattern!r} matches no file; fix the pattern")
            return matches
        if io.is_file(expanded) if remote else os.path.isfile(expanded):
            return [expanded if remote else os.path.abspath(expanded)]
    except OSError as e:  # A bucket that is missing or not readable with these credentials.
        raise UserError(f"{field}: cannot read {pattern} ({type(e).__name__}: {e}); check the bucket and "
                        "its permissions") from None
    raise UserError(f"{field}: file not found: {pattern}; give an existing text file")


def file_sha256(path: str) -> bytes:
    """The file's SHA-256, remembered in this host's cache by (path, size, mtime, inode), or for
    a bucket object by (URL, generation): a restart does not read a large corpus again just to
    find its preparation. The digest is of the bytes, wherever they are."""
    if io.is_remote(path):
        stamp = f"{path}\0{io.version(path)}"
    else:
        stat = os.stat(path)
        stamp = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    memo = os.path.join(io.cache_dir(), "file_sha256", hashlib.sha256(stamp.encode()).hexdigest())
    if os.path.isfile(memo):
        with open(memo) as f:
            return bytes.fromhex(f.read().strip())
    digest = hashlib.sha256()
    with bucket_data.open_binary(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        io.write_text_atomic(memo, digest.hexdigest())
    except OSError as e:  # A read-only cache only costs the next start a re-read.
        logging.warning("could not remember the digest of %s in %s: %s", path, memo, e)
    return digest.digest()


@functools.lru_cache(maxsize=65536)
def _remote_size(path: str) -> int:
    return bucket_data.file_size(path)


def file_size(path: str) -> int:
    """For progress lines only: a bucket object's size is asked once per process (a request)."""
    return _remote_size(path) if io.is_remote(path) else os.path.getsize(path)


def content_hash(options: dict, files: Sequence[str]) -> str:
    """Hash of everything that determines the prepared data: the options and the files' bytes
    in order (not their paths: moving the files keeps the preparation)."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    progress = Progress("hashing the input files", sum(file_size(p) for p in files))
    for path in files:
        digest.update(file_sha256(path))
        progress.file_done(path)
    progress.finish()
    return digest.hexdigest()


def config_name(first_file: str, digest: str, fallback: str) -> str:
    """`<readable stem of the first file>_<16 hex digits of the content hash>`."""
    stem = epath.Path(first_file).stem.lower()
    readable = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")[:40] or fallback
    return f"{readable}_{digest[:16]}"


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of jaxlm's builders: local inputs, examples kept in file order, and a JSON record
    saved with the data. A builder sets DESCRIPTION and RECORD_FILENAME and defines
    `_features()`, `_split_generators` and `_record()`."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""
    RECORD_FILENAME = ""  # The file `_record()` is saved to.

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=self._features(),
            # Keep the files' order (a text's held-out split is its end): tfds then writes the
            # examples in the order of their integer keys, on Beam as well.
            disable_shuffling=True,
        )

    # tfds finds a builder's source through the `importlib_resources` backport, which is not
    # installed on Python >= 3.9; name the file directly (there are no checksums beside it).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(sys.modules[cls.__module__].__file__)

    def _record(self) -> dict:
        """What is saved next to the data, as RECORD_FILENAME (called once the splits are written)."""
        raise NotImplementedError

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        # data_dir is still tfds's temporary directory here: the record is renamed into place
        # together with the data, so a prepared dataset always has its record.
        record_path = epath.Path(self.data_dir) / self.RECORD_FILENAME
        record_path.write_text(json.dumps(self._record(), indent=2, sort_keys=True))


def local_download_config(**beam) -> tfds.download.DownloadConfig:
    """Nothing is downloaded: tfds must not look for a copy on its GCS bucket. `beam`:
    beam_runner= and beam_options= for a Beam preparation."""
    return tfds.download.DownloadConfig(try_download_gcs=False, **beam)


def prepare(builder_cls: Callable[..., tfds.core.DatasetBuilder], config: tfds.core.BuilderConfig,
            data_dir: str, download_config: tfds.download.DownloadConfig | None = None
            ) -> tuple[tfds.core.DatasetBuilder, bool]:
    """(builder of the prepared dataset, reused): prepares it under data_dir unless an
    identical preparation is there already. On a bucket data_dir the builder reads this host's
    local copy (bucket_data.stage)."""
    if io.is_remote(data_dir):
        return _prepare_on_bucket(builder_cls, config, data_dir, download_config)
    builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
    reused = builder.is_prepared()
    if not reused:
        tfds.disable_progress_bar()  # Progress goes to the log (Progress), not to tqdm bars.
        try:
            builder.download_and_prepare(download_config=download_config or local_download_config())
        except OSError:
            # Hosts sharing data_dir race to rename their finished copy into place; losing the
            # race is fine as long as a complete copy is there.
            if not builder.is_prepared():
                raise
        builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
    return builder, reused


def _prepare_on_bucket(builder_cls, config, data_dir: str, download_config) -> tuple[tfds.core.DatasetBuilder, bool]:
    # NAME/CONFIG/VERSION as tfds lays it out, asked of a builder on a local directory.
    root = bucket_data.local_root(data_dir)
    relative = os.path.relpath(os.fspath(builder_cls(config=config, data_dir=root).data_path), root)
    reused = bucket_data.prepare_on_bucket(
        data_dir, relative, lambda local: prepare(builder_cls, config, local, download_config))
    staged = bucket_data.stage(data_dir, relative)
    return builder_cls(config=config, data_dir=staged, file_format="array_record"), reused


def read_record(builder: tfds.core.DatasetBuilder, filename: str) -> dict:
    return json.loads((epath.Path(builder.data_path) / filename).read_text())


def log_split_counts(report: dict) -> None:
    for split, counts in report["splits"].items():
        logging.info(
            "%s %s: %d documents read, %d empty dropped, %d duplicates dropped, %d in train dropped,"
            " %d kept, %d bytes",
            report["dataset"], split, counts["documents_read"], counts["empty_dropped"],
            counts["duplicates_dropped"], counts["in_train_dropped"], counts["kept"], counts["bytes"],
        )


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


@dataclasses.dataclass
class Progress:
    """Documents and bytes read by one pass over files of `total_bytes`: a line every
    `interval_s` (documents/s, bytes/s, ETA from the bytes left) and one at the end.

    `advance` counts a document's bytes; `file_done` snaps the count to the file's size (the
    separators between documents are not counted), so the ETA does not drift over many files.
    """

    what: str
    total_bytes: int  # 0: unknown; the ETA then comes from total_documents.
    total_documents: int = 0
    interval_s: float = _PROGRESS_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    log: Callable[..., None] = logging.info
    documents: int = 0
    done_bytes: int = 0  # Bytes of the files finished.
    file_bytes: int = 0  # Bytes counted in the file being read.

    def __post_init__(self):
        self._start = self._last = self.clock()

    @property
    def bytes(self) -> int:
        return self.done_bytes + self.file_bytes

    def advance(self, documents: int = 1, nbytes: int = 0) -> None:
        self.documents += documents
        self.file_bytes += nbytes
        if self.clock() - self._last >= self.interval_s:
            self._report()

    def file_done(self, path: str) -> None:
        self.done_bytes += file_size(path)
        self.file_bytes = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self._start, 1e-9)
        if self.total_bytes:
            done, total = min(self.bytes, self.total_bytes), self.total_bytes
            amount = f"{format_bytes(done)} of {format_bytes(total)}"
        else:
            done, total = min(self.documents, self.total_documents), self.total_documents
            amount = format_bytes(self.bytes)
        rate = done / elapsed
        eta = format_duration((total - done) / rate) if rate > 0 else "unknown"
        percent = 100.0 * done / total if total else 100.0
        return (f"{self.what}: {self.documents} documents, {amount} ({percent:.0f}%) in "
                f"{format_duration(elapsed)}; {self.documents / elapsed:.0f} documents/s, "
                f"{format_bytes(self.bytes / elapsed)}/s, ETA {eta}")

    def _report(self) -> None:
        self._last = self.clock()
        self.log("%s", self.line())

    def finish(self) -> None:
        """The last line, unless the pass was quick (under a tenth of the interval) and quiet."""
        if self._last != self._start or self.clock() - self._start >= self.interval_s / 10:
            self._report()


def plan_progress(plan: documents.SplitPlan, what: str) -> Progress:
    return Progress(what, sum(file_size(path) for path in plan.files))
