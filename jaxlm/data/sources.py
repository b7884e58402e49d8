"""Where text comes from: local text files (prepared by our tfds builder) or a prepared tfds dataset.

Each source gives a `TextCorpus`: two random-access text splits plus a stable dataset id (which
names the token cache). New kinds of sources only need to produce a `TextCorpus`.
"""

import copy
import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from jaxlm import io
from jaxlm.data import bucket_data, text_builder
from jaxlm.errors import UserError

_READ_BATCH = 1024


class TextSplit:
    """One split of a tfds dataset (ArrayRecord random access), seen as a sequence of strings."""

    def __init__(self, data_source: Sequence[Any], text_key: str, name: str):
        self._source = data_source
        self._text_key = text_key
        self.name = name  # The split as the user wrote it, e.g. 'train[:10%]'.

    def __len__(self) -> int:
        return len(self._source)

    def read(self, start: int, stop: int) -> list[str]:
        """Texts of records [start, stop)."""
        return self.texts(range(start, min(stop, len(self))))

    def __getitem__(self, index: int) -> str:
        return self.texts([index])[0]

    def texts(self, indices: Sequence[int]) -> list[str]:
        """Texts of the records at `indices` (any order)."""
        get_many = getattr(self._source, "__getitems__", None)
        records = get_many(list(indices)) if get_many else [self._source[i] for i in indices]
        return [_as_str(record[self._text_key]) for record in records]

    def batches(self, batch_size: int = _READ_BATCH) -> Iterator[list[str]]:
        for start in range(0, len(self), batch_size):
            yield self.read(start, start + batch_size)

    def __iter__(self) -> Iterator[str]:
        for batch in self.batches():
            yield from batch


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    dataset_id: str  # Stable name of the prepared data, usable as a relative path.
    train: TextSplit
    eval: TextSplit
    prep_report: dict  # What preparation did (cleaning counts); {} for tfds datasets.


def default_data_dir() -> str:
    """tfds's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def data_dir_of(data_config) -> str:
    """data.data_dir, '~'-expanded; tfds's default when empty."""
    data_dir = (data_config.get("data_dir", "") or "").strip()
    return os.path.expanduser(data_dir) if data_dir else default_data_dir()


def text_files_corpus(data_config, data_dir: str) -> TextCorpus:
    """`data.train_file` (+ `data.eval_file`): prepared once into data_dir, then reused."""
    prepared = text_builder.prepare_from_data(data_config, data_dir)
    config = prepared.builder.builder_config
    def split(name: str) -> TextSplit:
        return TextSplit(prepared.builder.as_data_source(name), text_builder.TEXT_FEATURE, name)

    return TextCorpus(
        dataset_id=f"{prepared.builder.name}/{config.name}",
        train=split(text_builder.TRAIN_SPLIT),
        eval=split(text_builder.EVAL_SPLIT),
        prep_report=prepared.report,
    )


def _prepare_hint(name: str, data_dir: str) -> str:
    if io.is_remote(data_dir):  # ArrayRecord files cannot be written to a bucket directly.
        return (f"prepare it once on a disk with: tfds build {name} --data_dir=DIR --file_format=array_record,"
                f" then copy DIR/{name.split(':')[0]} into {data_dir}/, its dataset_info.json last")
    return f"prepare it once with: tfds build {name} --data_dir={data_dir} --file_format=array_record"


def prepared_builder(name: str, data_dir: str, data_config=None) -> tfds.core.DatasetBuilder:
    """The builder of a tfds dataset already prepared in data_dir (never downloaded here). On a
    bucket data_dir it reads this host's copy of the dataset, staged once (bucket_data): only
    the shards of data.train_split / data.eval_split when `data_config` is given."""
    builder = _named_builder(name, data_dir)
    if not builder.is_prepared():
        raise UserError(
            f"data.tfds_name={name}: not prepared in data.data_dir={data_dir};"
            f" {_prepare_hint(name, data_dir)}"
        )
    if not io.is_remote(data_dir):
        return builder
    bucket_dir, version_dir = data_dir.rstrip("/"), os.fspath(builder.data_path)
    if not version_dir.startswith(bucket_dir + "/"):
        raise UserError(f"data.tfds_name={name}: tfds found it in {version_dir}, outside data.data_dir={data_dir}")
    relative = version_dir[len(bucket_dir) + 1:]  # NAME[/CONFIG]/VERSION.
    splits = None if data_config is None else bucket_data.base_splits(
        data_config.get(field, default) for field, default in _SPLIT_FIELDS)
    return _named_builder(name, bucket_data.stage(bucket_dir, relative, splits))


def _named_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, ...).
        raise UserError(
            f"data.tfds_name={name}: unknown tfds dataset ({type(e).__name__}); check the name"
        ) from None


_SPLIT_FIELDS = (("train_split", "train"), ("eval_split", "validation"))


def split_sources(builder: tfds.core.DatasetBuilder, data_config, data_dir: str) -> dict[str, tuple[str, Any]]:
    """{"train_split": (split, random-access source), "eval_split": (…)} from data.train_split /
    data.eval_split (defaults train / validation)."""
    name = data_config.tfds_name.strip()
    splits = {}
    for field, default in _SPLIT_FIELDS:
        split = data_config.get(field, default)
        try:
            splits[field] = (split, builder.as_data_source(split))
        except NotImplementedError:
            raise UserError(
                f"data.tfds_name={name}: prepared as {builder.info.file_format.value}, which has no"
                f" random access; {_prepare_hint(name, data_dir)} (in a new data.data_dir)"
            ) from None
        except (KeyError, ValueError):
            available = ", ".join(builder.info.splits.keys())
            raise UserError(
                f"data.{field}={split!r}: not a split of {name} ({available}); fix data.{field}"
            ) from None
    return splits


def tfds_dataset_id(builder: tfds.core.DatasetBuilder) -> str:
    """A stable name for the prepared data, usable as a relative path (names the caches)."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", f"tfds/{builder.info.full_name}")


def tfds_corpus(data_config, data_dir: str) -> TextCorpus:
    """`data.tfds_name`: a tfds dataset already prepared in data_dir (never downloaded here)."""
    name = data_config.tfds_name.strip()
    text_key = data_config.get("text_key", "text")
    builder = prepared_builder(name, data_dir, data_config)
    features = list(builder.info.features.keys())
    if text_key not in features:
        raise UserError(
            f"data.text_key={text_key!r} is not a feature of {name} (it has {', '.join(features)});"
            " set it to the text feature"
        )
    splits = {field: TextSplit(source, text_key, split)
              for field, (split, source) in split_sources(builder, data_config, data_dir).items()}
    return TextCorpus(
        dataset_id=tfds_dataset_id(builder),
        train=splits["train_split"],
        eval=splits["eval_split"],
        prep_report={},
    )


def from_files_or_tfds(data_config, data_dir: str, files: Callable, tfds_name: Callable):
    """`files(data_config, data_dir)` when data.train_file is set, else `tfds_name(...)` when
    data.tfds_name is: the one rule every task's source follows."""
    if (data_config.get("train_file", "") or "").strip():
        return files(data_config, data_dir)
    if (data_config.get("tfds_name", "") or "").strip():
        return tfds_name(data_config, data_dir)
    raise UserError("data.train_file and data.tfds_name are both empty; set one of them")


def load_corpus(data_config, data_dir: str) -> TextCorpus:
    return from_files_or_tfds(data_config, data_dir, text_files_corpus, tfds_corpus)


@dataclasses.dataclass(frozen=True)
class WeightedCorpus:
    name: str  # The mixture entry without its weight (or the single source's dataset id).
    weight: float
    corpus: TextCorpus


_MIXTURE_PREFIXES = ("tfds:", "file:")


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
    """data.mixture -> [(kind 'tfds'|'file', name or path/glob, weight)].

    Entries are separated by commas before a `tfds:` or `file:` prefix (so a file list inside an
    entry may hold commas); `@WEIGHT` ends an entry (default 1)."""
    entries = [e.strip() for e in re.split(r",\s*(?=(?:tfds|file):)", spec.strip()) if e.strip()]
    parsed = []
    for entry in entries:
        body, weight = entry, 1.0
        if "@" in entry:
            head, tail = entry.rsplit("@", 1)
            try:
                body, weight = head.strip(), float(tail)
            except ValueError:
                pass  # An @ inside a path: no weight given.
        if not body.startswith(_MIXTURE_PREFIXES) or not body.split(":", 1)[1].strip():
            raise UserError(f"data.mixture entry {entry!r}: write tfds:NAME@WEIGHT or file:PATH_OR_GLOB@WEIGHT")
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"data.mixture entry {entry!r}: the weight must be a positive number")
        kind, name = body.split(":", 1)
        parsed.append((kind, name.strip(), weight))
    if not parsed:
        raise UserError("data.mixture is empty; list weighted sources or clear it")
    return parsed


def load_sources(data_config, data_dir: str) -> list[WeightedCorpus]:
    """The corpora to train on: data.mixture's entries, or the single data.train_file/tfds_name."""
    spec = (data_config.get("mixture", "") or "").strip()
    if not spec:
        corpus = load_corpus(data_config, data_dir)
        return [WeightedCorpus(corpus.dataset_id, 1.0, corpus)]
    if any((data_config.get(f, "") or "").strip() for f in ("train_file", "tfds_name")):
        raise UserError("data.mixture is set together with data.train_file or data.tfds_name; clear those "
                        "(--config.data.train_file= --config.data.tfds_name=) or data.mixture")
    out = []
    for kind, name, weight in parse_mixture(spec):
        entry = copy.deepcopy(data_config)
        with entry.ignore_type():
            entry.train_file, entry.tfds_name = (name, "") if kind == "file" else ("", name)
            entry.eval_file = ""  # Each file source holds out data.eval_fraction of its own text.
        try:
            corpus = load_corpus(entry, data_dir)
        except UserError as e:  # Its message names the field the entry stands for.
            raise UserError(f"data.mixture entry {kind}:{name}: {e}") from None
        out.append(WeightedCorpus(f"{kind}:{name}", weight, corpus))
    return out
