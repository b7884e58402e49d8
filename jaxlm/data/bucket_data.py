"""Prepared datasets in a bucket (data.data_dir=gs://…), read from a copy on each host's disk.

ArrayRecord files can be neither written nor read on gs:// (google/array_record#120), so
- preparing: process 0 prepares the dataset in a scratch directory of its cache
  (io.cache_dir()) and uploads the version directory, dataset_info.json last: the marker tfds
  checks, so a half upload never looks prepared. The other processes wait for that marker
  (JAXLM_DATA_WAIT_S seconds at most) or for the error report process 0 uploads when it fails;
  a report names its run's attempt (a number process 0 draws and broadcasts), so a former
  run's report left on the bucket never ends this run's wait.
- reading: each host copies ("stages") the version directory, or only the shards of the splits
  it reads, into its cache once, under a key made of the objects' names and generations: a
  rerun copies nothing, a rewritten bucket copy is staged anew. tfds and grain read that copy.
- caches derived from the data (token caches, tokenized rows) stay on the host too
  (`local_root`): they are per host, and written through local-only APIs (memmaps, renames).
A local data_dir never comes here.
"""

import concurrent.futures
import hashlib
import io as stdlib_io  # jaxlm.io is imported as io below.
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import IO

from absl import logging

from jaxlm import io
from jaxlm.errors import UserError

MARKER = "dataset_info.json"  # Written last by tfds and uploaded last here: a prepared dataset has it.
WAIT_ENV = "JAXLM_DATA_WAIT_S"
_DEFAULT_WAIT_S = 3600.0  # A large corpus can take process 0 a while to prepare.
_DOWNLOAD_THREADS = 8  # Shards are fetched in parallel: one stream rarely fills a host's link.
_COPY_CHUNK = 8 << 20
# tfds's shard names: {dataset}-{split}.{format}-{index:05d}-of-{count:05d}.
_SHARD = re.compile(r"^.+-(?P<split>[^-./]+)\.[a-z_]+-\d{5}-of-\d{5}$")


def open_binary(p: str) -> IO[bytes]:
    """File `p` (local or gs://) open for reading bytes, streamed. Buffered, so iterating lines is
    cheap: fsspec's own readline reads a whole block for each line."""
    if not io.is_remote(p):
        return open(p, "rb")
    return stdlib_io.BufferedReader(io.path(p).open("rb"), buffer_size=1 << 20)


def file_size(p: str) -> int:
    return io.path(p).stat().length if io.is_remote(p) else os.path.getsize(p)


def _url_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _bucket_dir(data_dir: str) -> str:
    return data_dir.rstrip("/")


def local_root(data_dir: str) -> str:
    """This host's directory for a bucket data_dir: its staged copies and derived caches."""
    return os.path.join(io.cache_dir(), "bucket_data", _url_key(_bucket_dir(data_dir)))


def base_splits(specs: Iterable[str]) -> set[str] | None:
    """The splits named by tfds split specs ('train[:10%]+validation' -> train, validation);
    None (every split) when one is 'all'."""
    names = {part.split("[", 1)[0].strip() for spec in specs for part in spec.split("+")}
    return None if "all" in names else names - {""}


def _wait_s() -> float:
    text = os.environ.get(WAIT_ENV, "").strip()
    try:
        return float(text) if text else _DEFAULT_WAIT_S
    except ValueError:
        raise UserError(f"{WAIT_ENV}={text!r}: give the seconds to wait for process 0's preparation") from None


def _error_url(data_dir: str, relative: str) -> str:
    return f"{_bucket_dir(data_dir)}/jaxlm_prepare_errors/{relative}.json"


def _multi_process() -> bool:
    """True in a multi-host run (jaxlm joins the others through jax.distributed.initialize),
    found without starting a backend: `jaxlm prepare` must not claim a TPU for that."""
    import jax  # pylint: disable=import-outside-toplevel
    initialized = getattr(jax.distributed, "is_initialized", None)
    if initialized is not None and not initialized():
        return False
    return jax.process_count() > 1


def _process_index() -> int:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.process_index() if _multi_process() else 0


def _attempt() -> int:
    """A number every process of this run shares and a former run's almost surely does not:
    process 0's draw, broadcast. Every process calls this at the same point (a collective)."""
    draw = secrets.randbits(31)
    if not _multi_process():
        return draw
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return int(multihost_utils.broadcast_one_to_all(np.int32(draw)))


def prepare_on_bucket(data_dir: str, relative: str, prepare_locally: Callable[[str], None], *,
                      process_index: int | None = None, attempt: int | None = None,
                      wait_s: float | None = None, poll_s: float = 2.0) -> bool:
    """Makes data_dir/relative (a tfds version directory: NAME/CONFIG/VERSION) a complete
    preparation on the bucket; True when it was there already (this process prepared nothing).

    prepare_locally(local_data_dir) prepares it as local_data_dir/relative; only process 0 calls
    it, and keeps its result as this host's staged copy (no download back). `attempt`: this
    run's number (default: _attempt(), which every process must reach)."""
    attempt = _attempt() if attempt is None else attempt  # Before any return: it is a collective.
    url = f"{_bucket_dir(data_dir)}/{relative}"
    if io.exists(f"{url}/{MARKER}"):
        return True
    index = _process_index() if process_index is None else process_index
    if index != 0:
        _wait_for(url, _error_url(data_dir, relative), attempt, _wait_s() if wait_s is None else wait_s, poll_s)
        return True
    parent = local_root(data_dir)
    os.makedirs(parent, exist_ok=True)
    io.remove(_error_url(data_dir, relative), missing_ok=True)  # A former run's report.
    scratch = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    local = os.path.join(scratch, relative)
    try:
        try:
            prepare_locally(scratch)
            start = time.monotonic()
            names = io.copy_tree(local, url, last=MARKER)
        except Exception as e:  # The waiting processes learn why, instead of waiting for nothing.
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            _report_error(_error_url(data_dir, relative), attempt,
                          message.splitlines()[0] if message else repr(e))
            raise
        nbytes = sum(os.path.getsize(os.path.join(local, n)) for n in names)
        _log_copy("uploaded", len(names), nbytes, time.monotonic() - start, local, url)
        _adopt(local, data_dir, relative)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return False


def _report_error(error_url: str, attempt: int, message: str) -> None:
    try:
        io.write_json_atomic(error_url, {"error": message, "attempt": attempt, "time": time.time()})
    except Exception as e:  # pylint: disable=broad-except  # The preparation's own error matters more.
        logging.warning("could not report the preparation error to %s: %s", error_url, e)


def _wait_for(url: str, error_url: str, attempt: int, wait_s: float, poll_s: float) -> None:
    """Until process 0 has uploaded url/MARKER; a UserError when it reports a failure of this
    attempt, or after wait_s seconds. A report of another attempt is a former run's (process 0
    removes it when it starts again), however recent."""
    logging.info("waiting for process 0 to prepare %s (up to %.0f s)", url, wait_s)
    deadline = time.monotonic() + wait_s
    while not io.exists(f"{url}/{MARKER}"):
        report = io.read_json(error_url, default=None)
        if isinstance(report, dict) and report.get("attempt") == attempt:
            raise UserError(f"data.data_dir: process 0 could not prepare {url}: {report.get('error', 'see its log')}")
        if time.monotonic() > deadline:
            raise UserError(f"data.data_dir: {url}/{MARKER} did not appear in {wait_s:.0f} s of waiting for "
                            f"process 0 to prepare it; see process 0's log, or set {WAIT_ENV} to wait longer")
        time.sleep(poll_s)


def _wanted(listing: dict[str, str], splits: set[str] | None) -> dict[str, str]:
    """The files of the version directory this host needs: all but other splits' shards."""
    def needed(name: str) -> bool:
        shard = _SHARD.match(name.rsplit("/", 1)[-1])
        return splits is None or shard is None or shard.group("split") in splits
    return {name: token for name, token in listing.items() if needed(name)}


def _listing(url: str) -> dict[str, str]:
    """{relative path: generation} of the objects under url/ (one listing)."""
    prefix = f"{url}/"
    return {name[len(prefix):]: token for name, token in io.glob_versions(f"{url}/**").items()
            if name.startswith(prefix)}


def _staged_dir(data_dir: str, url: str, wanted: dict[str, str]) -> str:
    key = _url_key(json.dumps([url, sorted(wanted.items())]))
    return os.path.join(local_root(data_dir), "staged", key)


def _adopt(local_version_dir: str, data_dir: str, relative: str) -> None:
    """Process 0's fresh preparation becomes its staged copy of what it just uploaded."""
    url = f"{_bucket_dir(data_dir)}/{relative}"
    target = _staged_dir(data_dir, url, _listing(url))
    if os.path.isdir(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    holder = tempfile.mkdtemp(prefix=".adopt-", dir=os.path.dirname(target))
    os.makedirs(os.path.dirname(os.path.join(holder, relative)), exist_ok=True)
    os.rename(local_version_dir, os.path.join(holder, relative))
    _move_into_place(holder, target)


def _move_into_place(holder: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(holder, target)
    except OSError:
        if not os.path.isdir(target):  # Else another process of this host staged the same copy.
            raise
        shutil.rmtree(holder, ignore_errors=True)


def stage(data_dir: str, relative: str, splits: set[str] | None = None) -> str:
    """A local tfds data_dir holding a copy of data_dir/relative (only `splits`' shards, all when
    None), copied from the bucket unless this host has that copy already. The bucket copy must
    be complete (its MARKER there)."""
    url = f"{_bucket_dir(data_dir)}/{relative}"
    wanted = _wanted(_listing(url), splits)
    if MARKER not in wanted:
        raise UserError(f"data.data_dir: {url} is not a complete preparation (no {MARKER}); prepare it again")
    target = _staged_dir(data_dir, url, wanted)
    if os.path.isdir(target):
        logging.info("data: reusing this host's copy of %s in %s", url, target)
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    holder = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
    start = time.monotonic()
    try:
        def fetch(name: str) -> int:
            local = os.path.join(holder, relative, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with io.path(f"{url}/{name}").open("rb") as f_in, open(local, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out, _COPY_CHUNK)
            return os.path.getsize(local)

        with concurrent.futures.ThreadPoolExecutor(min(_DOWNLOAD_THREADS, len(wanted))) as pool:
            nbytes = sum(pool.map(fetch, sorted(wanted)))
        _move_into_place(holder, target)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    _log_copy("staged", len(wanted), nbytes, time.monotonic() - start, url, target)
    return target


def _log_copy(what: str, files: int, nbytes: int, seconds: float, source: str, target: str) -> None:
    rate = nbytes / 1e6 / max(seconds, 1e-9)
    logging.info("data: %s %d files, %.1f MB in %.2f s (%.1f MB/s): %s -> %s", what, files, nbytes / 1e6, seconds,
                 rate, source, target)
