"""Local text files -> clean documents: file globs, document splitting, cleaning, dedup counts.

Everything here is deterministic: the same files and options always give the same documents in
the same order, which is what lets a prepared dataset be identified by a content hash.
"""

import dataclasses
import hashlib
import unicodedata
from collections.abc import Iterator, Sequence

from jaxlm.data import compressed, records
from jaxlm.errors import UserError

DOC_SPLITS = ("blank_line", "line", "file", "jsonl")
JSONL_KEY = "text"  # doc_split=jsonl: where a record holds its document (C4, The Pile, FineWeb)


def check_doc_split(doc_split: str) -> None:
    kind, _, key = doc_split.partition(":")
    if kind not in DOC_SPLITS or (key and kind != "jsonl") or (kind == "jsonl" and doc_split.endswith(":")):
        raise UserError(f"data.doc_split={doc_split!r} is invalid; use one of {', '.join(DOC_SPLITS)} "
                        "(jsonl: JSON lines or Parquet rows, their 'text'; jsonl:KEY for another key)")


def progress_bytes(path: str, text: str) -> int:
    """What a document adds to a Progress over file sizes: its bytes where they are the file's,
    0 in a compressed or Parquet file (whose size is not its text's; the count moves per file)."""
    return 0 if compressed.suffix(path) or records.is_parquet(path) else len(text.encode("utf-8"))


def raw_documents(path: str, doc_split: str, field: str) -> Iterator[str]:
    """Yields the file's documents before cleaning (they may be empty or whitespace only)."""
    kind, _, key = doc_split.partition(":")
    if kind == "jsonl" or records.is_parquet(path):
        yield from records.documents(path, kind, key or JSONL_KEY, field)
        return
    has_text = False
    lines: list[str] = []
    for line in compressed.read_lines(path, field):
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
                progress.advance(1, progress_bytes(path, raw))
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
