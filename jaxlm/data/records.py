"""Documents from record files: JSON lines (C4's {"text": ...} per line, The Pile, Dolma) and
Parquet rows (FineWeb, the Hugging Face Hub's datasets). One record is one document, its text
under a key (data.doc_split=jsonl: "text"; jsonl:KEY: another). Both stream: a Parquet file
is read a row group at a time, only the text column.
"""

import json
from collections.abc import Iterator

from jaxlm.data import bucket_data, compressed, table_files
from jaxlm.errors import UserError

_PARQUET_BATCH_ROWS = 1024


def is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def documents(path: str, kind: str, key: str, field: str) -> Iterator[str]:
    """The text under `key` of every record of `path`. `kind`: the doc_split before any ':KEY'
    (a Parquet file needs jsonl: its rows are records, not lines of text)."""
    if is_parquet(path) and kind != "jsonl":
        raise UserError(f"{field}: {path} is a Parquet file: its rows are documents; set data.doc_split=jsonl "
                        "(the 'text' column) or jsonl:COLUMN")
    found = False
    for text in (_parquet_texts if is_parquet(path) else _json_texts)(path, key, field):
        found = True
        yield text
    if not found:
        raise UserError(f"{field}: {path} is empty (no records); remove it from {field} or add text")


def _json_texts(path: str, key: str, field: str) -> Iterator[str]:
    for line_number, line in enumerate(compressed.read_lines(path, field), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{field}: {path} line {line_number}: not valid JSON ({e}); data.doc_split=jsonl "
                            "reads one JSON object per line") from None
        if not isinstance(record, dict) or key not in record:
            have = ", ".join(repr(k) for k in record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{field}: {path} line {line_number}: no key {key!r} (the line has {have}); "
                            "set data.doc_split=jsonl:KEY to the key that holds the text")
        yield _text(record[key], f"{path} line {line_number}", key, field)


def _parquet_texts(path: str, key: str, field: str) -> Iterator[str]:
    with bucket_data.open_binary(path) as f:
        table = table_files.parquet_file(f, f"{field}: {path}")
        columns = table.schema_arrow.names
        if key not in columns:
            raise UserError(f"{field}: {path}: no column {key!r} (the file has {', '.join(map(repr, columns))}); "
                            "set data.doc_split=jsonl:COLUMN to the column that holds the text")
        row = 0
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[key]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield _text(value, f"{path} row {row}", key, field)


def _text(value, where: str, key: str, field: str) -> str:
    if value is None:  # A missing text is an empty document: dropped and counted as such.
        return ""
    if not isinstance(value, str):
        raise UserError(f"{field}: {where}: {key!r} holds {type(value).__name__}, not text; name the text's key "
                        "with data.doc_split=jsonl:KEY")
    return value
