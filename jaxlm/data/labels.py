"""The label vocabulary of a classification dataset: label names in index order.

Labels in the data are integers (0..C-1) or names (positive/negative …). Integer labels give
names "0".."C-1"; names are sorted, unless data.label_names fixes the order. The positive class
(for binary precision/recall/F1) is classification.positive_label, else a label named
"positive", else index 1.
"""

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

from jaxlm.errors import UserError

RawLabel = Union[int, str]
_INT = re.compile(r"[+-]?\d+")


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

    def index(self, label: RawLabel, where: str, source: str = "data.train_file") -> int:
        """The class index of one raw label; `where` names the file and row for errors."""
        if self.integer:
            if isinstance(label, int) and 0 <= label < len(self.names):
                return label
            if isinstance(label, int):
                raise UserError(f"{where}: label {label} is out of range: there are {len(self.names)} classes "
                                f"(0..{len(self.names) - 1}); fix the label or set data.num_labels")
            raise UserError(f"{where}: label {label!r} is not an integer, but {source} has integer labels; "
                            "use one kind of label throughout")
        name = str(label)
        if name in self._lookup:
            return self._lookup[name]
        raise UserError(f"{where}: label {name!r} never occurs in {source} (labels: {', '.join(self.names)}); "
                        "fix the label or list every name in data.label_names")

    @functools.cached_property
    def _lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def to_json(self) -> dict:
        return {"names": list(self.names), "integer": self.integer}


def build_vocab(labels: Iterable[tuple[RawLabel, str]], *, names: Sequence[str] = (), num_labels: int = 0,
                source: str = "data.train_file") -> LabelVocab:
    """The vocabulary of the train labels. `labels` yields (raw label, where) pairs.

    names: data.label_names (fixes the order of named labels, or names integer classes);
    num_labels: data.num_labels (0: from the data).
    """
    labels = list(labels)
    if not labels:
        raise UserError(f"{source}: no labelled rows")
    if names and len(set(names)) != len(names):
        raise UserError(f"data.label_names={list(names)}: names must be distinct")
    if names and num_labels and len(names) != num_labels:
        raise UserError(f"data.label_names has {len(names)} names but data.num_labels={num_labels}; "
                        "make them agree (or leave data.num_labels=0)")
    all_int = all(isinstance(label, int) for label, _ in labels)
    if all_int:
        count = len(names) or num_labels or max(label for label, _ in labels) + 1
        vocab = LabelVocab(tuple(names) if names else tuple(str(i) for i in range(count)), integer=True)
    elif names:
        vocab = LabelVocab(tuple(names), integer=False)
    else:
        found = sorted({str(label) for label, _ in labels})
        if num_labels and len(found) > num_labels:
            raise UserError(f"{source}: {len(found)} distinct labels ({', '.join(found)}) but "
                            f"data.num_labels={num_labels}")
        vocab = LabelVocab(tuple(found), integer=False)
    for label, where in labels:  # Out-of-range integers, names outside data.label_names.
        vocab.index(label, where, source)
    if len(vocab) < 2:
        raise UserError(f"{source}: only one class ({vocab.names[0]!r}); classification needs at least two")
    return vocab


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


def resolve_names(vocab_names: Sequence[str], option: Any) -> Optional[str]:
    """Used by tfds datasets: data.label_names may rename ClassLabel names one to one."""
    names = names_option(option)
    if names and len(names) != len(vocab_names):
        raise UserError(f"data.label_names has {len(names)} names but the dataset has {len(vocab_names)} classes")
    return names or None
