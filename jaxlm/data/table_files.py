"""Rows of CSV, TSV, JSONL and Parquet files (local or gs://; CSV, TSV and JSONL may be compressed,
.gz/.bz2/.xz/.zst), with errors that name the file and row.

CSV and TSV follow RFC 4180 quoting (a quoted field may hold the delimiter, quotes written
twice, tabs and newlines); the first non-empty record is the header, or, for a file without one
(header=False), the columns are numbered from 1. JSONL holds one JSON object per line. Text
files must be UTF-8 (a BOM is allowed); anything else is a UserError naming the line. Parquet
(as the Hugging Face Hub stores datasets) is read with pyarrow, which tensorflow-datasets brings.
"""

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from jaxlm.data import bucket_data, compressed
from jaxlm.errors import UserError

FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl", ".parquet": "parquet"}
# Long documents (reviews, articles) exceed csv's default 128 KiB field limit.
csv.field_size_limit(min(2**31 - 1, 64 << 20))


@dataclasses.dataclass(frozen=True)
class Row:
    number: int  # 1-based data row (the header is not counted).
    line: int  # 1-based line where the row starts (0: a Parquet file has no lines).
    values: dict[str, Any]  # column -> value (str for CSV/TSV; any JSON or Parquet value otherwise).

    def where(self, path: str) -> str:
        return f"{path}, row {self.number}" + (f" (line {self.line})" if self.line else "")


def file_format(path: str, requested: str = "auto") -> str:
    if requested not in FORMATS:
        raise UserError(f"data.file_format={requested!r}: choose one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    ext = os.path.splitext(compressed.without_suffix(path))[1].lower()  # reviews.csv.gz: csv
    if ext not in _EXTENSIONS:
        raise UserError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
                        f"set data.file_format to csv, tsv, jsonl or parquet")
    return _EXTENSIONS[ext]


def read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed if its name ends in .gz, .bz2, .xz or .zst."""
    try:
        with compressed.open_decompressed(path) as f:
            return f.read()
    except compressed.read_errors() as e:  # A bucket's errors may have no strerror.
        raise UserError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); check the path, "
                        "permissions and that the file is complete") from None


def read_text(path: str) -> str:
    """The file as text; invalid UTF-8 is a UserError naming the line and byte."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}, line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _check_columns(path: str, header: Sequence[str], columns: dict[str, str], header_field: str,
                   holder: str = "the header") -> None:
    for field, column in columns.items():
        if column and column not in header:
            have = ", ".join(repr(h) for h in header) or "none"
            hint = (f" (a file without a header line: {header_field}=false, columns numbered from 1)"
                    if header_field else "")
            raise UserError(f"{path}: no column {column!r} ({holder} has {have}); "
                            f"set {field} to one of them{hint}")


def _check_numbered(path: str, count: int, columns: dict[str, str], header_field: str) -> list[str]:
    """Names "1".."count" of a headerless file's columns; every configured column must be one."""
    names = [str(i) for i in range(1, count + 1)]
    for field, column in columns.items():
        if column and column not in names:
            raise UserError(f"{path}: {header_field}=false numbers the columns 1..{count}, so {field}={column!r} "
                            f"names none; set {field} to a number from 1 to {count}")
    return names


def _delimited_rows(path: str, text: str, delimiter: str, columns: dict[str, str], header_row: bool,
                    header_field: str) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header = None
    number = 0
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}, line {start}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} "
                            f"({e}); check the quoting of that row") from None
        line, start = start, reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # Blank lines.
        if header is None:
            if header_row:
                header = [h.strip() for h in record]
                _check_columns(path, header, columns, header_field)
                continue
            header = _check_numbered(path, len(record), columns, header_field)
        number += 1
        if len(record) != len(header):
            first = "the header has" if header_row else "the first row has"
            raise UserError(f"{path}, row {number} (line {line}): {len(record)} field(s) but {first} "
                            f"{len(header)}; quote fields that contain the delimiter")
        yield Row(number, line, dict(zip(header, record)))
    if header is None:
        raise UserError(f"{path}: empty file (no header, no rows); give a file with a header line and data rows")


def _jsonl_rows(path: str, text: str, columns: dict[str, str]) -> Iterator[Row]:
    number = 0
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{path}, line {line}: not valid JSON ({e.msg}); write one JSON object per line") from None
        number += 1
        if not isinstance(value, dict):
            raise UserError(f"{path}, row {number} (line {line}): expected a JSON object, got "
                            f"{type(value).__name__}; write one object per line")
        for field, column in columns.items():
            if column and column not in value:
                have = ", ".join(repr(k) for k in value) or "none"
                raise UserError(f"{path}, row {number} (line {line}): no key {column!r} (the row has {have}); "
                                f"set {field} to one of them")
        yield Row(number, line, value)
    if number == 0:
        raise UserError(f"{path}: empty file (no JSON rows); give a file with one JSON object per line")


def parquet_file(source: Any, where: str, fix: str = "check the file"):
    """A pyarrow ParquetFile over `source` (a seekable file or a pyarrow buffer); an unreadable
    one is a UserError that starts with `where` and ends with `fix`."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel  (a tensorflow-datasets dependency)
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    try:
        return pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{where}: not a readable Parquet file ({e}); {fix}") from None


def _parquet_rows(path: str, columns: dict[str, str]) -> Iterator[Row]:
    """Rows of a Parquet file, every column (predict writes them back)."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    table = parquet_file(pa.BufferReader(read_bytes(path)), path, "check the file or set data.file_format").read()
    _check_columns(path, table.column_names, columns, "", holder="the file")
    for number, values in enumerate(table.to_pylist(), 1):
        yield Row(number, 0, values)


def class_label_names(path: str, column: str) -> tuple[str, ...]:
    """The class names a Hugging Face `datasets` Parquet file records for `column` (a ClassLabel
    in its schema metadata: {"info": {"features": {column: {"_type": "ClassLabel", "names": [...]}}}}),
    or () when it records none."""
    try:
        with bucket_data.open_binary(path) as f:
            metadata = parquet_file(f, path).schema_arrow.metadata or {}
        feature = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {}).get(column, {})
    except (UserError, OSError, ValueError, AttributeError):  # Unreadable here: read_rows reports it.
        return ()
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return tuple(str(n) for n in names) if isinstance(names, list) and names else ()


def read_rows(path: str, fmt: str, columns: dict[str, str], header: bool = True,
              header_field: str = "") -> Iterator[Row]:
    """Data rows of one file. `columns` maps config field -> column name (every name must exist).

    header=False (CSV/TSV only): every row is data and the columns are named "1", "2", ... as
    in the classic headerless text-classification CSVs (label, title, description).
    `header_field` names the option that sets it, for the error messages ('' = none to name).
    """
    if fmt == "parquet":
        rows = _parquet_rows(path, columns)
    elif fmt == "jsonl":
        rows = _jsonl_rows(path, read_text(path), columns)
    else:
        rows = _delimited_rows(path, read_text(path), "\t" if fmt == "tsv" else ",", columns, header, header_field)
    count = 0
    for row in rows:
        count += 1
        yield row
    if count == 0:
        raise UserError(f"{path}: no data rows (only a header); add rows")
