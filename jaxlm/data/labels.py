"""The label vocabulary of a classification dataset: label names in index order.

Labels in the data are integers (class indices 0..C-1) or names (positive/negative …): the
train labels decide (data.label_kind = integer or name overrides that), and training records
the kind in config.json next to data.label_names. Integer classes are named "0".."C-1" unless
data.label_names names them; names are sorted (numerals by value) unless data.label_names fixes
the order. Integer labels that do not start at 0 (1..4 of a news-topic CSV, 1..5 stars, -1/1)
are values, not indices: each distinct value is a class named by it, in numeric order, so no
empty class 0 is made up (data.label_kind=integer or data.num_labels keeps them indices).
Every file is mapped by `LabelVocab.index`: in an integer vocabulary a label may also be one of
the names (SST-2's 0/1 or negative/positive), in a name vocabulary only a name.
The positive class (for binary precision/recall/F1) is classification.positive_label, else a
label named "positive", else index 1.
"""

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

from jaxlm.errors import UserError

RawLabel = Union[int, str]
_INT = re.compile(r"[+-]?\d+")
TRAIN_SOURCE = "data.train_file"
KINDS = ("integer", "name")


def parse_label(value: Any, where: str) -> RawLabel:
    """An int for integer labels ("1", 1, 1.0), else the stripped name."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None:
        raise UserError(f"{where}: the label is missing (null); give every row a label")
    text = str(value).strip()
    if not text:
        raise UserError(f"{where}: the label is empty; give every row a label")
    return int(text) if _INT.fullmatch(text) else text


def names_option(value: Any) -> tuple[str, ...]:
    """data.label_names as a tuple: a list/tuple, or one comma-separated string."""
    if not value:
        return ()
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return tuple(str(n) for n in value)


@dataclasses.dataclass(frozen=True)
class LabelVocab:
    names: tuple[str, ...]
    integer: bool  # True: the data's labels are integer indices; False: names.

    def __len__(self) -> int:
        return len(self.names)

    def index(self, label: RawLabel, where: str, source: str = TRAIN_SOURCE) -> int:
        """The class index of one raw label; `where` names the file and row for errors, `source`
        the labels it must belong to."""
        if self.integer and isinstance(label, int):
            if 0 <= label < len(self.names):
                return label
            fix = "fix the label or set data.num_labels" if source == TRAIN_SOURCE else "fix the label"
            raise UserError(f"{where}: label {label} is out of range: {source} has {len(self.names)} classes "
                            f"(0..{len(self.names) - 1}); {fix}")
        name = str(label)
        if name in self._lookup:
            return self._lookup[name]
        if self.integer:
            raise UserError(f"{where}: label {name!r} is neither a class index (0..{len(self.names) - 1}) nor a "
                            f"name of {source} ({', '.join(self.names)}); fix the label")
        fix = "fix the label or list every name in data.label_names"
        if isinstance(label, int) and all(_INT.fullmatch(n) for n in self.names):
            fix += " (or set data.label_kind=integer if the labels are class indices 0..C-1)"
        raise UserError(f"{where}: label {name!r} never occurs in {source} (labels: {', '.join(self.names)}); {fix}")

    @functools.cached_property
    def _lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def to_json(self) -> dict:
        return {"names": list(self.names), "integer": self.integer}


def kind_option(value: Any) -> str:
    """data.label_kind: '' (from the labels), integer or name."""
    kind = (value or "").strip() if isinstance(value, str) else value
    if kind and kind not in KINDS:
        raise UserError(f"data.label_kind={value!r}: use integer (labels are class indices), name, or '' (from "
                        "the train labels)")
    return kind or ""


def _name_order(name: str) -> tuple:
    return (0, int(name), "") if _INT.fullmatch(name) else (1, 0, name)  # Numerals by value: "2" < "10".


def build_vocab(labels: Iterable[tuple[RawLabel, str]], *, names: Sequence[str] = (), num_labels: int = 0,
                kind: str = "", source: str = TRAIN_SOURCE) -> LabelVocab:
    """The vocabulary of the train labels. `labels` yields (raw label, where) pairs.

    names: data.label_names (fixes the order of named labels, or names integer classes);
    num_labels: data.num_labels (0: from the data); kind: data.label_kind ('' = integer when every
    label is an integer).
    """
    labels = list(labels)
    kind = kind_option(kind)
    if not labels:
        raise UserError(f"{source}: no labelled rows")
    if names and len(set(names)) != len(names):
        raise UserError(f"data.label_names={list(names)}: names must be distinct")
    if names and num_labels and len(names) != num_labels:
        raise UserError(f"data.label_names has {len(names)} names but data.num_labels={num_labels}; "
                        "make them agree (or leave data.num_labels=0)")
    if kind == "integer":
        for label, where in labels:
            if not isinstance(label, int):
                raise UserError(f"{where}: label {label!r} is not an integer, but data.label_kind=integer; "
                                "fix the label or leave data.label_kind=''")
    integer = kind == "integer" or (not kind and all(isinstance(label, int) for label, _ in labels))
    if integer and not kind and not names and not num_labels and min(label for label, _ in labels) != 0:
        integer = False  # 1..C or -1/1: values that name classes (see the module docstring).
    if integer:
        count = len(names) or num_labels or max(label for label, _ in labels) + 1
        vocab = LabelVocab(tuple(names) if names else tuple(str(i) for i in range(count)), integer=True)
    elif names:
        vocab = LabelVocab(tuple(names), integer=False)
    else:
        found = sorted({str(label) for label, _ in labels}, key=_name_order)
        if num_labels and len(found) > num_labels:
            raise UserError(f"{source}: {len(found)} distinct labels ({', '.join(found)}) but "
                            f"data.num_labels={num_labels}")
        vocab = LabelVocab(tuple(found), integer=False)
    for label, where in labels:  # Out-of-range integers, names outside data.label_names.
        vocab.index(label, where, source)
    if len(vocab) < 2:
        raise UserError(f"{source}: only one class ({vocab.names[0]!r}); classification needs at least two")
    return vocab


def run_vocab(names: Sequence[str], kind: Any, labels: Iterable[tuple[RawLabel, str]]) -> LabelVocab:
    """A trained run's vocabulary (data.label_names and data.label_kind of its config.json), to map
    another file's labels as training mapped its own. A run that recorded no kind: integer when
    every label of the file is an integer, as build_vocab decides for train labels."""
    kind = kind_option(kind)
    integer = kind == "integer" if kind else all(isinstance(label, int) for label, _ in labels)
    return LabelVocab(tuple(names), integer=integer)


def positive_index(names: Sequence[str], option: Any = "") -> int:
    """The positive class for binary metrics: the option (name or index), 'positive', else 1."""
    option = "" if option is None else str(option).strip()
    if option:
        if option in names:
            return list(names).index(option)
        if _INT.fullmatch(option) and 0 <= int(option) < len(names):
            return int(option)
        raise UserError(f"classification.positive_label={option!r} is not a label ({', '.join(names)})")
    return list(names).index("positive") if "positive" in names else min(1, len(names) - 1)
