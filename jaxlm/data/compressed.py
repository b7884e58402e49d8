"""Compressed input files, recognised by their suffix: .gz, .bz2 and .xz with Python's own codecs,
.zst with the zstandard package (the beam extra brings it). Corpora ship this way (C4's
.json.gz, RedPajama's and Dolma's .jsonl.zst); they are read as streams, never unpacked on disk.
"""

import bz2
import contextlib
import gzip
import io
import lzma
import os
from collections.abc import Iterator
from typing import IO

from jaxlm.data import bucket_data
from jaxlm.errors import UserError

SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def suffix(path: str) -> str:
    """The compression suffix of `path` ('' for a plain file)."""
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in SUFFIXES else ""


def without_suffix(path: str) -> str:
    """`path` without its compression suffix: what the content's own extension is read from."""
    return path[:-len(suffix(path))] if suffix(path) else path


def read_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or truncated compressed stream raises while it is read."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    try:
        import zstandard  # pylint: disable=import-outside-toplevel
        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


@contextlib.contextmanager
def open_decompressed(path: str, field: str = "") -> Iterator[IO[bytes]]:
    """File `path` (local or gs://) as a stream of its uncompressed bytes. `field` names the
    option that lists the file, for errors ('' = the path alone)."""
    kind = suffix(path)
    with bucket_data.open_binary(path) as raw:
        if kind == ".gz":
            yield gzip.GzipFile(fileobj=raw)
        elif kind == ".bz2":
            yield bz2.BZ2File(raw)
        elif kind == ".xz":
            yield lzma.LZMAFile(raw)
        elif kind == ".zst":
            try:
                import zstandard  # pylint: disable=import-outside-toplevel
            except ImportError:
                where = f"{field}: {path}" if field else path
                raise UserError(f"{where} is zstd-compressed; reading it needs the zstandard package "
                                "(pip install zstandard), or decompress it first") from None
            # Buffered for cheap line iteration; every frame, as zstd's own tool reads them.
            yield io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        else:
            yield raw


def read_lines(path: str, field: str) -> Iterator[str]:
    """Yields the file's lines without line endings (LF or CRLF), rejecting invalid UTF-8. A
    compressed file (.gz, .bz2, .xz, .zst) is decompressed as it is read."""
    with open_decompressed(path, field) as f:  # A local file or a gs:// object, streamed.
        line_number = 0
        while True:
            try:
                raw = next(f, None)
            except read_errors() as e:  # A corrupt or truncated compressed stream.
                raise UserError(f"{field}: {path}: cannot read past line {line_number} ({e}); check that the "
                                "file is complete") from None
            if raw is None:
                return
            line_number += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{field}: {path} line {line_number}: invalid UTF-8 (byte {e.start + 1} of the"
                    " line); re-encode the file as UTF-8"
                ) from None
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # A UTF-8 byte order mark is not text.
            yield line.rstrip("\r\n")
