"""Every file jaxlm reads or writes in a run directory or a data directory goes through here.

    io.write_json_atomic(io.path(workdir) / "best.json", record)
    record = io.read_json(io.path(workdir) / "best.json", default=None)

Paths are `etils.epath.Path`s: the same calls serve local disks and object stores (gs://…).
A local path goes through the os module (temp file + os.replace makes a write atomic); a path
with a scheme (`://`) only through epath's methods and fsspec, never os.*.

Buckets (gs://) always go through fsspec + gcsfs (its JSON-API GCSFileSystem), chosen here
for the whole process when this module is imported: epath would use TensorFlow's gfile
whenever TensorFlow imports, and gfile hard-codes Google's endpoints, so nothing written
through it could be tested against a local server (jaxlm/bucket_fs.py sets gcsfs up: no listing
cache, a timeout on stalled requests). gcsfs finds application-default credentials (a TPU VM's
service account) itself, and STORAGE_EMULATOR_HOST in tests.
- A directory on a bucket is a name prefix: it exists once an object is under it, and
  make_dirs has nothing to do there.
- An object appears whole when its upload finishes, so writes there are atomic without a temp
  object (a rename there would be a copy + delete); a failed upload leaves the old object.
- No append: JsonlAppender rewrites the whole object at each flush (cost in its docstring).
"""

import contextlib
import hashlib
import io as stdlib_io  # This module is jaxlm.io; the standard one is named apart.
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

from etils import epath

from jaxlm import bucket_fs
from jaxlm.errors import UserError

PathLike = str | os.PathLike
MISSING = object()  # read_json's "no default": a missing file is an error.


def _buckets_through_fsspec() -> None:
    """Makes epath use fsspec for gs:// in this process and the processes it starts. epath
    reads EPATH_USE_TF once and caches the answer (etils 1.x: gpath._is_tf_installed), so the
    cache is cleared too, in case something used epath before jaxlm.io was imported."""
    os.environ["EPATH_USE_TF"] = "false"
    from etils.epath import gpath  # pylint: disable=import-outside-toplevel
    cached = getattr(gpath, "_is_tf_installed", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


_buckets_through_fsspec()


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
    elif text.startswith("gs://"):
        bucket_fs.gcsfs_class()
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


def version(p: PathLike) -> str | None:
    """A token that changes whenever file `p` is rewritten (None: missing): locally its inode,
    mtime and size; on a bucket the object's generation (set anew by every upload)."""
    target = path(p)
    try:
        if not is_remote(target):
            st = os.stat(target)
            return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"
        if os.fspath(target).startswith("gs://"):
            return str(bucket_fs.filesystem().info(os.fspath(target))["generation"])
        st = target.stat()
        return f"{st.mtime}:{st.length}"
    except FileNotFoundError:
        return None


def list_dir(p: PathLike) -> list[str]:
    """The names in directory `p`, sorted (order differs between stores); [] if it is missing."""
    directory = path(p)
    # A bucket may hold a 'dir/' placeholder object: it lists with an empty name.
    return sorted(child.name for child in directory.iterdir() if child.name) if directory.is_dir() else []


def make_dirs(p: PathLike) -> None:
    """A local directory and its parents; nothing on a bucket (a prefix needs no creating, and
    gcsfs's makedirs would create a missing *bucket*, in whatever project the credentials name)."""
    if not is_remote(p):
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
    """Copies file `src` to `dst`, which appears whole or not at all; streamed, so big files are
    not held in memory. To a bucket: one upload (gcsfs put_file), or a server-side copy from the
    same store; from a bucket to a local file: read in chunks into an atomic local write."""
    source, target = path(src), path(dst)
    if is_remote(target):
        if is_remote(source):
            bucket_fs.filesystem().copy(os.fspath(source), os.fspath(target))
        else:
            bucket_fs.filesystem().put_file(os.fspath(source), os.fspath(target))
        return
    with source.open("rb") as f_in, open_atomic(target, binary=True) as f_out:
        shutil.copyfileobj(f_in, f_out)


def files_under(p: PathLike) -> list[str]:
    """The files below directory `p` as '/'-separated paths relative to it, sorted ([] when missing)."""
    root = path(p)
    found = []
    for name in list_dir(root):
        child = root / name
        if child.is_dir():
            found += [f"{name}/{sub}" for sub in files_under(child)]
        else:
            found.append(name)
    return sorted(found)


def copy_tree(src: PathLike, dst: PathLike, last: str = "") -> list[str]:
    """Copies every file under directory `src` to the same place under `dst` (either may be a
    bucket); returns the relative paths copied. A bucket has no directory rename, so a tree
    there cannot appear at once: `last` (a relative path) is copied after all the others, and a
    reader that finds it knows the rest is there."""
    names = files_under(src)
    if last and last not in names:
        raise FileNotFoundError(f"{path(src) / last}: missing, so {dst} could never be seen complete")
    for name in sorted(names, key=lambda n: n == last):  # False sorts first: `last` goes last.
        make_dirs((path(dst) / name).parent)
        copy_file(path(src) / name, path(dst) / name)
    return names


def local_copy(p: PathLike) -> str:
    """Directory `p` as a local directory: itself when local; a bucket's copied into this host's
    cache (bucket_copies/<hash of the URL>/), afresh at each call, so it is never stale. For
    small directories libraries must read from a disk (a tokenizer)."""
    source = path(p)
    if not is_remote(source):
        return os.fspath(source)
    parent = os.path.join(cache_dir(), "bucket_copies")
    os.makedirs(parent, exist_ok=True)
    target = os.path.join(parent, hashlib.sha256(os.fspath(source).encode()).hexdigest()[:16])
    staging = tempfile.mkdtemp(prefix=".copy-", dir=parent)
    try:
        copy_tree(source, staging)
        old = f"{staging}.old"
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, old)  # Two renames: a directory cannot replace a non-empty one.
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(target):  # Else another process of this host just made the same copy.
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def glob_versions(pattern: PathLike) -> dict[str, str]:
    """{file: its `version`} for the files (not directories) matching `pattern`, sorted; '**'
    matches any depth. On a bucket: gs:// URLs and objects' generations from one listing."""
    text = os.fspath(pattern)
    if not is_remote(text):
        import glob as stdlib_glob  # pylint: disable=import-outside-toplevel
        found = sorted(os.path.abspath(m) for m in stdlib_glob.glob(os.path.expanduser(text), recursive=True))
        return {m: version(m) for m in found if os.path.isfile(m)}
    if not text.startswith("gs://"):
        raise UserError(f"{text}: only gs:// buckets can be searched with a pattern")
    found = bucket_fs.filesystem().glob(text, detail=True)
    return {f"gs://{n}": str(i["generation"]) for n, i in sorted(found.items()) if i.get("type") == "file"}
