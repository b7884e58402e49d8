"""Every file jaxlm reads or writes in a run directory or a data directory goes through here.

    io.write_json_atomic(io.path(workdir) / "best.json", record)
    record = io.read_json(io.path(workdir) / "best.json", default=None)

Paths are `etils.epath.Path`s: the same calls serve local disks and object stores (gs://…).
A local path goes through the os module (temp file + os.replace makes a write atomic); a path
with a scheme (`://`) only through epath's methods, never os.*.

What gs:// workdirs (the next step) will need:
- epath reads gs:// through TensorFlow's gfile when TensorFlow imports (a jaxlm dependency),
  or through fsspec + gcsfs (to install) under EPATH_USE_TF=false; both need credentials.
- An object appears whole when its writer closes, so writes there are atomic without a temp
  object (and a rename there would be a copy + delete).
- No append: JsonlAppender rewrites the whole object at each flush (cost in its docstring).
- gfile raises some tf.errors.* that epath does not map to OSError; read_json may need them.
"""

import contextlib
import io as stdlib_io  # This module is jaxlm.io; the standard one is named apart.
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

from etils import epath

from jaxlm.errors import UserError

PathLike = str | os.PathLike
MISSING = object()  # read_json's "no default": a missing file is an error.


def cache_dir() -> str:
    """This host's scratch cache: $JAXLM_CACHE_DIR, else jaxlm/ under $XDG_CACHE_HOME or
    ~/.cache. Only derived data goes here (it can always be rebuilt)."""
    configured = os.environ.get("JAXLM_CACHE_DIR", "").strip()
    if configured:
        return os.path.expanduser(configured)
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "") or "~/.cache"), "jaxlm")


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path; a local one '~'-expanded and absolute (a later chdir changes nothing)."""
    text = os.fspath(p)
    if not is_remote(text):
        text = os.path.abspath(os.path.expanduser(text))
    return epath.Path(text)


def is_remote(p: PathLike) -> bool:
    """Whether `p` names an object store (gs://, s3://…): os.* must not be used on it."""
    return "://" in os.fspath(p)


def exists(p: PathLike) -> bool:
    return path(p).exists()


def is_dir(p: PathLike) -> bool:
    return path(p).is_dir()


def is_file(p: PathLike) -> bool:
    return path(p).is_file()


def list_dir(p: PathLike) -> list[str]:
    """The names in directory `p`, sorted (order differs between stores); [] if it is missing."""
    directory = path(p)
    return sorted(child.name for child in directory.iterdir()) if directory.is_dir() else []


def make_dirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_json(p: PathLike, default: Any = MISSING) -> Any:
    """The JSON value in file `p`. `default` (when given) is returned for a missing file; a
    missing (without default), unreadable or invalid file is a UserError naming it."""
    file = path(p)
    if default is not MISSING and not file.exists():
        return default
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8.
        raise UserError(f"{file}: not readable as JSON ({e}); repair or replace the file") from None


@contextlib.contextmanager
def open_atomic(p: PathLike, binary: bool = False) -> Iterator[IO]:
    """A file to write that appears at `p` whole when the block ends, and not at all if it raises
    (`p` keeps its old content). Text is UTF-8, '\\n' kept as is (same bytes on every OS/store).

    Local: a hidden temp file beside `p` (same file system: os.replace is an atomic rename),
    fsync'd first so a crash cannot leave an empty file under the name. Opened with mode 'x',
    not tempfile.mkstemp: open() applies the umask (0644 typically); mkstemp makes 0600 files.
    Object store: buffered in memory, uploaded as one object at the end.
    """
    target = path(p)
    if is_remote(target):
        buffer = stdlib_io.BytesIO() if binary else stdlib_io.StringIO(newline="")
        yield buffer
        target.write_bytes(buffer.getvalue() if binary else buffer.getvalue().encode("utf-8"))
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"  # One per writer (hosts).
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # Only still there when the block or the rename failed.


def write_bytes_atomic(p: PathLike, data: bytes) -> None:
    with open_atomic(p, binary=True) as f:
        f.write(data)


def write_text_atomic(p: PathLike, text: str) -> None:
    with open_atomic(p) as f:
        f.write(text)


def write_json_atomic(p: PathLike, value: Any, indent: int = 2) -> None:
    """`value` as JSON (sorted keys, so files diff cleanly; a final newline). It is serialised
    before any file is opened: a value that is not JSON leaves `p` and its directory as they were."""
    write_text_atomic(p, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def _complete_lines(data: bytes) -> list[tuple[bytes, dict]]:
    """(line, record) for each line that holds a JSON object, the line's bytes kept with a '\\n'
    end; a line cut short by a kill (invalid JSON or UTF-8) is dropped."""
    kept = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # Also UnicodeDecodeError: a multi-byte character cut in half.
            continue
        if isinstance(record, dict):
            kept.append((line.rstrip(b"\r") + b"\n", record))
    return kept


def read_jsonl(p: PathLike) -> list[dict]:
    """The complete records of JSONL file `p` ([] when it is missing)."""
    return [record for _, record in _complete_lines(read_bytes(p))] if exists(p) else []


def truncate_jsonl(p: PathLike, keep: Callable[[dict], bool]) -> None:
    """Rewrites JSONL file `p` atomically with only the records `keep` accepts (kept lines are
    byte-identical); torn lines are dropped. A missing file stays missing."""
    file = path(p)
    if not file.exists():
        return
    lines = [line for line, record in _complete_lines(file.read_bytes()) if keep(record)]
    write_bytes_atomic(file, b"".join(lines))


class JsonlAppender:
    """Appends one JSON object per line to `p` (the metrics writer's file); creates it if needed.

    Local: opened for appending, each record flushed to the OS as written, so a kill loses at
    most the line being written (truncate_jsonl drops it on resume); after a torn last line a
    newline comes first, so the next record is whole.
    Object store (no append): the object's lines are read once, kept in memory with the new
    ones, and the whole object is rewritten at each flush()/close(). Cost: every flush uploads
    the whole file (O(records) bytes per flush, O(records^2) per run; ~2 MB per flush after 10k
    records of ~200 bytes), and a kill loses the records since the last flush.
    """

    def __init__(self, p: PathLike):
        self.path = path(p)
        self._file = None  # The open local file; None on an object store.
        if is_remote(self.path):
            found = self.path.exists()
            existing = self.path.read_bytes() if found else b""
            self._lines = [existing + b"\n"] if existing and not existing.endswith(b"\n") else [existing]
            self._dirty = not found  # Created now, as the local file is.
        else:
            torn = self.path.exists() and _ends_torn(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:
                self._file.write("\n")

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line.encode("utf-8"))
            self._dirty = True

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            self.path.write_bytes(b"".join(self._lines))
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_torn(p: epath.Path) -> bool:
    """Whether local file `p` ends without a newline (a torn last line); reads one byte only."""
    with open(p, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:  # seek returns the new offset: here the size.
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def append_jsonl(p: PathLike, record: dict) -> None:
    """One record appended to `p`; opens and closes the file (a stream: keep a JsonlAppender)."""
    appender = JsonlAppender(p)
    try:
        appender.append(record)
    finally:
        appender.close()


def remove(p: PathLike, missing_ok: bool = False) -> None:  # missing_ok: as in pathlib.
    path(p).unlink(missing_ok=missing_ok)


def remove_tree(p: PathLike, missing_ok: bool = False) -> None:
    path(p).rmtree(missing_ok=missing_ok)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies file `src` to `dst`, which appears whole or not at all (streamed locally, so big
    files are not held in memory; through epath's copy when either side is an object store)."""
    source, target = path(src), path(dst)
    if is_remote(source) or is_remote(target):
        source.copy(target, overwrite=True)
    else:
        with open(source, "rb") as f_in, open_atomic(target, binary=True) as f_out:
            shutil.copyfileobj(f_in, f_out)
