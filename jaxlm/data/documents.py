"""Local text files -> clean documents: file globs, document splitting, cleaning, dedup counts.

Everything here is deterministic: the same files and options always give the same documents in
the same order, which is what lets a prepared dataset be identified by a content hash.
"""

import dataclasses
import hashlib
import json
import unicodedata
from collections.abc import Iterator, Sequence

from jaxlm.data import compressed
from jaxlm.errors import UserError

DOC_SPLITS = ("blank_line", "line", "file", "jsonl")
JSONL_KEY = "text"  # doc_split=jsonl: each line's JSON object holds its document here (C4, The Pile)


def check_doc_split(doc_split: str) -> None:
    kind, _, key = doc_split.partition(":")
    if kind not in DOC_SPLITS or (key and kind != "jsonl") or (kind == "jsonl" and doc_split.endswith(":")):
        raise UserError(f"data.doc_split={doc_split!r} is invalid; use one of {', '.join(DOC_SPLITS)} "
                        "(jsonl:KEY for JSON lines whose text is under KEY)")


def _read_lines(path: str, field: str) -> Iterator[str]:
    """Yields the file's lines without line endings (LF or CRLF), rejecting invalid UTF-8. A
    compressed file (.gz, .bz2, .xz, .zst) is decompressed as it is read."""
    with compressed.open_decompressed(path, field) as f:  # A local file or a gs:// object, streamed.
        line_number = 0
        while True:
            try:
                raw = next(f, None)
            except compressed.read_errors() as e:  # A corrupt or truncated compressed stream.
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


def _json_documents(path: str, key: str, field: str) -> Iterator[str]:
    """The `key` string of each non-blank line's JSON object."""
    for line_number, line in enumerate(_read_lines(path, field), start=1):
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
                            f"set data.doc_split=jsonl:KEY to the key that holds the text")
        text = record[key]
        if not isinstance(text, str):
            raise UserError(f"{field}: {path} line {line_number}: {key!r} holds {type(text).__name__}, not text")
        yield text


def raw_documents(path: str, doc_split: str, field: str) -> Iterator[str]:
    """Yields the file's documents before cleaning (they may be empty or whitespace only)."""
    kind, _, key = doc_split.partition(":")
    if kind == "jsonl":
        found = False
        for text in _json_documents(path, key or JSONL_KEY, field):
            found = True
            yield text
        if not found:
            raise UserError(f"{field}: {path} is empty (no JSON lines); remove it from {field} or add text")
        return
    has_text = False
    lines: list[str] = []
    for line in _read_lines(path, field):
        blank = not line.strip()
        has_text = has_text or not blank
        if doc_split == "line":
            yield line
        elif doc_split == "file":
            lines.append(line)
        elif blank:  # 'blank_line': a run of blank lines ends a paragraph.
            if lines:
                yield "\n".join(lines)
                lines = []
        else:
            lines.append(line)
    if lines:
        yield "\n".join(lines)
    if not has_text:
        raise UserError(f"{field}: {path} is empty (no text); remove it from {field} or add text")


def clean_document(text: str) -> str:
    """NFC-normalizes (so equal-looking text has equal bytes and tokens) and strips trailing space."""
    return unicodedata.normalize("NFC", text).rstrip()


def document_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Which documents form a split: raw documents [start, stop) of the files' document stream."""

    files: tuple[str, ...]
    field: str  # The config field the files came from, for error messages.
    start: int = 0
    stop: int | None = None


@dataclasses.dataclass
class SplitCounts:
    """What cleaning did to one split (documents are counted before cleaning)."""

    documents_read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0  # Exact repeats of an earlier document of the same split.
    in_train_dropped: int = 0  # Validation documents that appear verbatim in train.
    kept: int = 0
    bytes: int = 0  # UTF-8 bytes of the kept documents.

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def add(self, outcome: str, text: str) -> None:
        """Counts one document read, with its outcome (KEPT, EMPTY, DUPLICATE or IN_TRAIN)."""
        self.documents_read += 1
        if outcome == KEPT:
            self.kept += 1
            self.bytes += len(text.encode("utf-8"))
        else:
            setattr(self, outcome, getattr(self, outcome) + 1)


# What cleaning does with a document (the names of the SplitCounts fields they count in).
KEPT, EMPTY, DUPLICATE, IN_TRAIN = "kept", "empty_dropped", "duplicates_dropped", "in_train_dropped"


def outcome(text: str, kept_earlier: bool, in_train: bool) -> str:
    """The cleaning rule, for a cleaned document (clean_document) of a split.

    kept_earlier: the same text was kept earlier in the split (documents in file order; only a
    kept one counts, so repeats of a validation document found in train all count as in train).
    in_train: the text is among the kept train documents (asked for validation only).
    Both preparations apply it: in order here (clean_documents), per text on Beam.
    """
    if not text:
        return EMPTY
    if kept_earlier:
        return DUPLICATE
    if in_train:
        return IN_TRAIN
    return KEPT


def count_raw_documents(files: Sequence[str], doc_split: str, field: str) -> int:
    return sum(1 for path in files for _ in raw_documents(path, doc_split, field))


def clean_documents(
    plan: SplitPlan,
    doc_split: str,
    counts: SplitCounts,
    *,
    excluded: set[bytes] | frozenset[bytes] = frozenset(),
    seen: set[bytes] | None = None,
    progress=None,
) -> Iterator[str]:
    """Yields the plan's kept documents in order, updating `counts` as it goes.

    A document is dropped when empty after cleaning, when already yielded (exact duplicate), or
    when its digest is in `excluded` (used to keep train text out of validation): `outcome`.
    `seen` receives the digests of the kept documents. `progress` (a builders.Progress) is told
    of every raw document and finished file.
    """
    seen = set() if seen is None else seen
    index = 0
    for path in plan.files:
        for raw in raw_documents(path, doc_split, plan.field):
            in_plan = index >= plan.start and (plan.stop is None or index < plan.stop)
            index += 1
            if progress is not None:
                progress.advance(1, len(raw.encode("utf-8")))
            if not in_plan:
                continue
            text = clean_document(raw)
            digest = document_digest(text) if text else b""
            result = outcome(text, digest in seen, digest in excluded)
            counts.add(result, text)
            if result == KEPT:
                seen.add(digest)
                yield text
        if progress is not None:
            progress.file_done(path)
