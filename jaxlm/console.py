"""What the console shows, and where everything else goes.

The console (stderr) is for people: jaxlm's own messages (data preparation, the model, progress
with its ETA, evaluations, one line per checkpoint saved), errors from any library, and each
command's result (stdout). What libraries say below ERROR (orbax's dozen lines per save, tfds,
jax, absl, Python warnings, the native start-up output of TensorFlow and libtpu) goes to the
run's log file, DIR/jaxlm.log, which also gets every console line, with timestamps and sources.

The log file is written by process 0 only, and never where a user error must leave the run
directory as it was. `jaxlm train` validates the config, data and mesh first, and writes
DIR/config.json once they passed: the log opens when config.json has been (re)written by this
command, and until then records are kept in memory (dropped if the command stops before).
Commands that read a finished run (eval, generate, predict, serve, export) keep their records in
memory (up to _MAX_BUFFERED) and append them to the run's log when they end, unless they ended
with a user error.
A workdir on a bucket (gs://…): objects cannot be appended to, so the records go to a spool file
in this host's cache (JAXLM_CACHE_DIR/logs/) and DIR/jaxlm.log is rewritten once, with them
added, when the command ends (by the same rules); a killed command's records stay in its spool.

JAXLM_LOG_LEVEL=debug shows everything on the console too, at DEBUG; warning / error hide
jaxlm's own lines below that level from the console.
"""

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from typing import Optional

LOG_FILE = "jaxlm.log"
RUN_CONFIG = "config.json"  # What `jaxlm train` writes once the run is validated.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MAX_BUFFERED = 20000  # Records kept before the log file opens (a pathological run stops growing here).

# clu's ReportProgress: its ETA line comes through clu's platform notes; its steps_per_sec and
# uptime scalars repeat what the ETA line says.
_CLU_NOTES = "Setting work unit notes: "
_CLU_PROGRESS_SCALARS = re.compile(r"^\[\d+\] (steps_per_sec|uptime)=")
_CLU_SCALARS = re.compile(r"^\[(\d+)\] (.*)$")


def _level() -> str:
    return os.environ.get("JAXLM_LOG_LEVEL", "info").strip().lower() or "info"


def _own(record: logging.LogRecord) -> bool:
    """jaxlm's own message, or clu's training progress and metric lines (which jaxlm asks for)."""
    if getattr(record, "jaxlm_log_only", False):
        return False
    path = record.pathname or ""
    if path.startswith(_PACKAGE_DIR) or record.name.startswith("jaxlm"):
        return True
    if path.endswith(os.path.join("clu", "platform", "local.py")):
        return str(record.msg).startswith(_CLU_NOTES)
    if path.endswith(os.path.join("clu", "metric_writers", "logging_writer.py")):
        return not _CLU_PROGRESS_SCALARS.match(record.getMessage())
    return False


def _short_number(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value) or value == int(value) and abs(value) < 1e6:
        return text
    return f"{value:.4g}"


class _ConsoleFormatter(logging.Formatter):
    """'21:13:41 checkpoint: saving step 20 …'; clu's '[20] a=0.123456789, b=…' becomes
    'step 20: a=0.1235  b=…' and its progress notes 'progress: 9.6 steps/s, 50.0% (20/40), ETA: 0m'."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith(_CLU_NOTES):
            message = "progress: " + message[len(_CLU_NOTES):]
        elif (m := _CLU_SCALARS.match(message)) and record.pathname.endswith("logging_writer.py"):
            pairs = [p.partition("=") for p in m.group(2).split(", ")]
            # Per-class values (eval/f1/<label>, eval/confusion/<a>/<b>) stay in the log and in
            # metrics.jsonl: with many classes they would bury the headline figures.
            shown = [(k, v) for k, _, v in pairs if k.count("/") < 2]
            message = f"step {m.group(1)}: " + "  ".join(f"{k}={_short_number(v)}" for k, v in shown)
            if len(shown) < len(pairs):
                message += f"  (+{len(pairs) - len(shown)} per-class values in metrics.jsonl)"
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {message}"


_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s")


class _Console(logging.Handler):
    """Writes to the current sys.stderr (so pytest's capture and redirections see it)."""

    def __init__(self, everything: bool, own_level: int):
        super().__init__(logging.DEBUG)
        self.everything, self.own_level = everything, own_level
        self.setFormatter(_FILE_FORMAT if everything else _ConsoleFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if not self.everything:
            if record.levelno < (self.own_level if _own(record) else logging.ERROR):
                return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pylint: disable=broad-except
            self.handleError(record)


class _RunLog(logging.Handler):
    """DIR/jaxlm.log, opened once the run directory may be written; records wait until then."""

    def __init__(self, level: int):
        super().__init__(level)
        self.setFormatter(_FILE_FORMAT)
        self.buffer: Optional[list[str]] = []
        self.file = None
        self.workdir: Optional[str] = None
        self.baseline: Optional[tuple] = None  # config.json's stat when the command started.
        self.wait_for_config = False  # True: open once config.json changed; False: at the end.
        self.spool = None  # A bucket workdir's records, on local disk until the command ends.

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # pylint: disable=broad-except
            self.handleError(record)

    def write(self, text: str) -> None:
        if self.spool is not None:
            self.spool.write(text + "\n")
            return
        if self.file is None and self.workdir is not None and self._ready():
            self._open()
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()
        elif self.buffer is not None and len(self.buffer) < _MAX_BUFFERED:
            self.buffer.append(text)

    def target(self, workdir: str, wait_for_config: bool) -> None:
        self.workdir, self.wait_for_config = workdir, wait_for_config
        self.baseline = _version(workdir)
        if _remote(workdir):
            from jaxlm import io  # pylint: disable=import-outside-toplevel
            spool_dir = os.path.join(io.cache_dir(), "logs")
            os.makedirs(spool_dir, exist_ok=True)
            self.spool = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=spool_dir, prefix="jaxlm-",
                                                     suffix=".log", delete=False)
            self.spool.write("".join(line + "\n" for line in self.buffer or ()))
            self.buffer = None

    def _ready(self, ending: bool = False) -> bool:
        now = _version(self.workdir)
        if self.wait_for_config:
            return now is not None and now != self.baseline
        return ending and now is not None

    def _open(self) -> None:
        path = os.path.join(self.workdir, LOG_FILE)
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("".join(line + "\n" for line in self.buffer or ()))
        self.file.flush()
        self.buffer = None
        if _level() != "debug":  # Said once on the console, where to look for the rest.
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} library messages: {path}\n")

    def _upload(self) -> None:
        """The spooled records appended to the bucket's DIR/jaxlm.log (read, then rewritten whole)."""
        from jaxlm import io  # pylint: disable=import-outside-toplevel
        self.spool.close()
        target = io.path(self.workdir) / LOG_FILE
        with open(self.spool.name, "rb") as f:
            records = f.read()
        try:
            io.write_bytes_atomic(target, (io.read_bytes(target) if io.exists(target) else b"") + records)
        except Exception as e:  # pylint: disable=broad-except  # The command's result stands.
            sys.stderr.write(f"warning: {target} not written ({type(e).__name__}: {e}); "
                             f"this command's library messages are in {self.spool.name}\n")
            self.spool = None  # Kept on disk.
            return
        if _level() != "debug":
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} library messages: {target}\n")

    def _drop_spool(self) -> None:
        if self.spool is not None:
            self.spool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool.name)
            self.spool = None

    def drop(self) -> None:
        """No log file for this process (another process writes it, or there is no run)."""
        self._drop_spool()
        self.buffer, self.workdir = None, None

    def end(self, keep: bool) -> None:
        """The command ended; `keep`: it did not end with a user error."""
        if self.spool is not None:
            if self._ready(ending=keep):
                self._upload()
        elif self.file is None and self.workdir is not None and self._ready(ending=keep):
            self._open()
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self._drop_spool()
        self.buffer, self.workdir = None, None
        super().close()


def _remote(workdir: str) -> bool:
    return "://" in workdir


def _version(workdir: str) -> Optional[tuple]:
    """What identifies DIR/config.json as written (None: missing)."""
    if _remote(workdir):
        from jaxlm import io  # pylint: disable=import-outside-toplevel
        version = io.version(io.path(workdir) / RUN_CONFIG)
        return None if version is None else (version,)
    try:
        st = os.stat(os.path.join(workdir, RUN_CONFIG))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


_run_log: Optional[_RunLog] = None


def setup() -> None:
    """Console and log handlers on the root logger (absl's and Python's records all reach it).
    Called by the CLI at each command's start; replaces what an earlier call installed."""
    global _run_log
    level = _level()
    file_level = logging.DEBUG if level == "debug" else logging.INFO
    own_level = logging.getLevelName(level.upper()) if level in ("warning", "error") else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (_Console, _RunLog)) or type(handler).__name__ == "ABSLHandler":
            root.removeHandler(handler)
            if isinstance(handler, _RunLog):
                handler.close()
    root.setLevel(file_level)
    try:
        from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
        absl_logging.set_verbosity("debug" if level == "debug" else "info")
    except ImportError:
        pass
    root.addHandler(_Console(everything=level == "debug", own_level=own_level))
    _run_log = _RunLog(file_level)
    root.addHandler(_run_log)
    logging.captureWarnings(True)  # Python warnings become records of "py.warnings": the log file.


def log_to_workdir(workdir: str, *, primary: bool = True, wait_for_config: bool = False) -> None:
    """Directs the log file to `workdir` (see the module docstring for when it opens).

    wait_for_config: open once this command has (re)written DIR/config.json (train); otherwise
    append when the command ends, if DIR is a run directory (it has config.json).
    """
    if _run_log is None:
        return
    from jaxlm import io  # pylint: disable=import-outside-toplevel
    if not primary or not workdir:
        _run_log.drop()
        return
    _run_log.target(os.fspath(io.path(workdir)), wait_for_config)


def close(keep_log: bool = True) -> None:
    """Ends this command's log file (at the CLI's exit). keep_log=False (a user error): records
    not yet in the file are dropped."""
    global _run_log
    if _run_log is not None:
        logging.getLogger().removeHandler(_run_log)
        _run_log.end(keep_log)
        _run_log = None


def log_only(message: str, *args) -> None:
    """A jaxlm record for the log file only (how the process was set up, say)."""
    logging.getLogger("jaxlm.setup").info(message, *args, extra={"jaxlm_log_only": True})


def library_output(source: str, text: str) -> None:
    """Text a library printed (captured native stderr): the log file, one record per line."""
    logger = logging.getLogger(f"native.{source}")
    for line in text.splitlines():
        if line.strip():
            logger.info("%s", line.rstrip(), extra={"jaxlm_log_only": True})


@contextlib.contextmanager
def native_stderr_to(path: str):
    """Sends file descriptor 2 (where C++ libraries log) to `path` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def native_output_to_log(source: str):
    """What native code writes to stderr meanwhile goes to the log file instead (with
    JAXLM_LOG_LEVEL=debug, to the console as before)."""
    if _level() == "debug":
        yield
        return
    with tempfile.NamedTemporaryFile(prefix="jaxlm_native_", suffix=".log", delete=False) as tmp:
        path = tmp.name
    try:
        with native_stderr_to(path):
            yield
    finally:
        with open(path, errors="replace") as f:
            library_output(source, f.read())
        os.unlink(path)


def tfds_prints_to_log() -> None:
    """tfds prints "Downloading and preparing dataset …" / "… downloaded and prepared" to stdout
    for every preparation, also of local files where nothing downloads: logged instead (they
    land in the log file). tfds 4.x's DatasetBuilder has these two hooks; without them, nothing
    changes."""
    try:
        from tensorflow_datasets.core import dataset_builder  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    builder = dataset_builder.DatasetBuilder
    log = logging.getLogger("tensorflow_datasets")
    if hasattr(builder, "_log_download_bytes"):
        builder._log_download_bytes = lambda self: log.info(  # pylint: disable=protected-access
            "preparing dataset %s in %s", self.name, self.data_dir)
    if hasattr(builder, "_log_download_done"):
        builder._log_download_done = lambda self: log.info(  # pylint: disable=protected-access
            "dataset %s prepared in %s", self.name, self.data_dir)
