"""A tfds builder for labelled local files (CSV, TSV, JSONL): text (+ optional pair) and a label.

    options = make_labeled_files_config(data_config)   # scans every row: errors name file and row
    prepared = prepare_labeled_dataset(options, data_dir)

The files are read and checked in full before anything is written (a missing column, an empty
file, a bad label, invalid UTF-8: one UserError naming the file and row). The label vocabulary
comes from the train rows; it is a ClassLabel feature of the dataset and is also saved next to
the data as `jaxlm_labels.json`, with the class counts per split. As with the text-file builder,
the config name carries a content hash, so changed inputs get a new preparation and unchanged
ones reuse it.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxlm.data import builders, labels, table_files
from jaxlm.errors import UserError

TEXT = "text"
TEXT_PAIR = "text_pair"
LABEL = "label"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
LABELS_FILENAME = "jaxlm_labels.json"
_RULES_VERSION = 1  # Bump when parsing rules change, so older preparations are not reused.
_HOLD_OUT_SEED = 0  # Rows held out for validation when there is no eval file: a fixed random subset.


# repr=False keeps BuilderConfig's short repr: tfds logs it, and file lists can be long.
@dataclasses.dataclass(repr=False)
class LabeledFilesConfig(tfds.core.BuilderConfig):
    """Inputs of a labelled-files dataset. Build it with `make_labeled_files_config`."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    eval_fraction: float = 0.1
    file_format: str = "auto"
    header: bool = True  # CSV/TSV: the first row names the columns (False: numbered from 1)
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    label_names: tuple[str, ...] = ()  # The resolved vocabulary, in index order.
    integer_labels: bool = False
    num_train_rows: int = 0  # Rows in the train files (before any hold-out).


@dataclasses.dataclass(frozen=True)
class _Example:
    text: str
    text_pair: str
    label: int


def _columns(config) -> dict[str, str]:
    return {"data.text_column": config.text_column, "data.text_pair_column": config.text_pair_column,
            "data.label_column": config.label_column}


def _text(row: table_files.Row, column: str, path: str) -> str:
    value = row.values[column]
    if not isinstance(value, str):
        raise UserError(f"{row.where(path)}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _raw_rows(files, config) -> Iterator[tuple[str, table_files.Row]]:
    for path in files:
        fmt = table_files.file_format(path, config.file_format)
        for row in table_files.read_rows(path, fmt, _columns(config), config.header, "data.header"):
            yield path, row


def _raw_label(path: str, row: table_files.Row, config) -> tuple[labels.RawLabel, str]:
    where = row.where(path)
    return labels.parse_label(row.values[config.label_column], where), where


def _example(path: str, row: table_files.Row, config, vocab: labels.LabelVocab, source: str) -> _Example:
    label = vocab.index(*_raw_label(path, row, config), source)
    pair = _text(row, config.text_pair_column, path) if config.text_pair_column else ""
    return _Example(_text(row, config.text_column, path), pair, label)


def _examples(files, config, vocab: labels.LabelVocab, source: str = labels.TRAIN_SOURCE) -> Iterator[_Example]:
    for path, row in _raw_rows(files, config):
        yield _example(path, row, config, vocab, source)


def _parquet_class_names(files, config: LabeledFilesConfig) -> tuple[str, ...]:
    """The label column's class names when every train file is a Hugging Face `datasets` Parquet
    file that records the same ones (its ClassLabel), else ()."""
    if any(table_files.file_format(path, config.file_format) != "parquet" for path in files):
        return ()
    found = {table_files.class_label_names(path, config.label_column) for path in files}
    if len(found) != 1 or not next(iter(found)):
        return ()
    names = next(iter(found))
    logging.info("data.label_names from the Parquet files' Hugging Face features: %s", ", ".join(names))
    return names


def _content_hash(config: LabeledFilesConfig) -> str:
    options = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in ("name", "version", "release_notes", "supported_versions", "description",
                            "train_files", "eval_files", "tags")}
    if config.header:  # The default leaves the names of existing preparations (and resumes) as they were.
        del options["header"]
    options["rules"] = _RULES_VERSION
    options["num_files"] = [len(config.train_files), len(config.eval_files)]
    if config.eval_files:
        options["eval_fraction"] = None
    return builders.content_hash(options, config.train_files + config.eval_files)


def make_labeled_files_config(data_config) -> LabeledFilesConfig:
    """Resolves the files, reads every row once (all checks) and names the config by content."""
    train_files = builders.resolve_files(data_config.train_file, "data.train_file")
    eval_spec = (data_config.get("eval_file", "") or "").strip()
    eval_files = builders.resolve_files(eval_spec, "data.eval_file") if eval_spec else ()
    eval_fraction = float(data_config.get("eval_fraction", 0.1))
    if not eval_files and not 0.0 < eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction={eval_fraction} must be in (0, 1), or set data.eval_file")
    text_column = (data_config.get("text_column", "text") or "").strip()
    if not text_column:
        raise UserError("data.text_column is empty; name the column that holds the text")
    label_column = (data_config.get("label_column", "label") or "").strip()
    if not label_column:
        raise UserError("data.label_column is empty; name the column that holds the label")
    config = LabeledFilesConfig(
        name="pending", train_files=train_files, eval_files=eval_files, eval_fraction=eval_fraction,
        file_format=data_config.get("file_format", "auto") or "auto", header=bool(data_config.get("header", True)),
        text_column=text_column,
        text_pair_column=(data_config.get("text_pair_column", "") or "").strip(), label_column=label_column)

    # Pass 1 over the train rows: texts are checked and the label vocabulary is built.
    raw, num_rows = [], 0
    for path, row in _raw_rows(train_files, config):
        _text(row, text_column, path)
        if config.text_pair_column:
            _text(row, config.text_pair_column, path)
        raw.append(_raw_label(path, row, config))
        num_rows += 1
    names = labels.names_option(data_config.get("label_names", ()))
    if not names and data_config.get("label_kind", "") != "integer":
        names = _parquet_class_names(train_files, config)
    vocab = labels.build_vocab(raw, names=names,
                               num_labels=int(data_config.get("num_labels", 0) or 0),
                               kind=data_config.get("label_kind", ""))
    config = dataclasses.replace(config, label_names=vocab.names, integer_labels=vocab.integer,
                                 num_train_rows=num_rows)
    if eval_files:
        for _ in _examples(eval_files, config, vocab):
            pass  # Every eval row checked against the train labels before anything is written.
    elif max(1, round(num_rows * eval_fraction)) >= num_rows:
        raise UserError(f"data.train_file has {num_rows} row(s): too few to hold some out for validation; "
                        "add rows or set data.eval_file")
    return dataclasses.replace(
        config, name=builders.config_name(train_files[0], _content_hash(config), "labeled"),
        description=f"{len(train_files)} train, {len(eval_files)} eval file(s); {len(vocab)} classes")


def read_eval_files(data_config, label_names: tuple[str, ...],
                    label_kind: str) -> tuple[list[_Example], labels.LabelVocab]:
    """data.eval_file's rows with labels mapped onto a finished run's classes, read directly.

    For evaluating a run: neither its train files nor a tfds preparation are needed, and the
    columns may be named differently from training's (data.text_column, data.label_column).
    Labels map as in training (labels.run_vocab): integers are class indices of an integer run,
    names are looked up in label_names.
    """
    spec = (data_config.get("eval_file", "") or "").strip()
    eval_files = builders.resolve_files(spec, "data.eval_file")
    config = LabeledFilesConfig(
        name="eval_only", eval_files=eval_files, file_format=data_config.get("file_format", "auto") or "auto",
        header=bool(data_config.get("header", True)),
        text_column=(data_config.get("text_column", "text") or "").strip(),
        text_pair_column=(data_config.get("text_pair_column", "") or "").strip(),
        label_column=(data_config.get("label_column", "label") or "").strip(), label_names=tuple(label_names))
    rows = list(_raw_rows(eval_files, config))
    if not rows:
        raise UserError(f"data.eval_file={spec}: no rows to evaluate")
    vocab = labels.run_vocab(label_names, label_kind, (_raw_label(path, row, config) for path, row in rows))
    source = "the run's labels (data.label_names in config.json)"
    return [_example(path, row, config, vocab, source) for path, row in rows], vocab


def vocab_of(config: LabeledFilesConfig) -> labels.LabelVocab:
    return labels.LabelVocab(tuple(config.label_names), config.integer_labels)


def held_out_rows(num_rows: int, eval_fraction: float) -> np.ndarray:
    """Indices of the train-file rows held out for validation (a fixed random subset)."""
    count = max(1, round(num_rows * eval_fraction))
    return np.sort(np.random.default_rng(_HOLD_OUT_SEED).permutation(num_rows)[:count])


class JaxlmLabeledFiles(builders.LocalFilesBuilder):
    """Labelled local files as a tfds dataset: `text`, `text_pair` and a ClassLabel `label`."""

    DESCRIPTION = "Labelled text rows from local CSV/TSV/JSONL files, prepared by jaxlm."
    RECORD_FILENAME = LABELS_FILENAME

    def _features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict({
            TEXT: tfds.features.Text(), TEXT_PAIR: tfds.features.Text(),
            LABEL: tfds.features.ClassLabel(names=list(self.builder_config.label_names)),
        })

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the inputs are local files.
        config = self.builder_config
        vocab = vocab_of(config)
        train = _examples(config.train_files, config, vocab)
        if config.eval_files:
            evaluation = _examples(config.eval_files, config, vocab)
            return {TRAIN_SPLIT: self._generate_examples(train), EVAL_SPLIT: self._generate_examples(evaluation)}
        held = set(held_out_rows(config.num_train_rows, config.eval_fraction).tolist())
        examples = list(train)
        return {
            TRAIN_SPLIT: self._generate_examples(e for i, e in enumerate(examples) if i not in held),
            EVAL_SPLIT: self._generate_examples(e for i, e in enumerate(examples) if i in held),
        }

    def _generate_examples(self, examples):
        for index, example in enumerate(examples):
            yield index, {TEXT: example.text, TEXT_PAIR: example.text_pair, LABEL: example.label}

    def _record(self) -> dict:
        config = self.builder_config
        return {"dataset": f"{self.name}/{config.name}", **vocab_of(config).to_json(),
                "train_files": list(config.train_files), "eval_files": list(config.eval_files),
                "text_column": config.text_column, "text_pair_column": config.text_pair_column,
                "label_column": config.label_column}


@dataclasses.dataclass(frozen=True)
class PreparedLabeled:
    builder: JaxlmLabeledFiles
    vocab: labels.LabelVocab
    reused: bool


def prepare_labeled_dataset(config: LabeledFilesConfig, data_dir: str) -> PreparedLabeled:
    """Prepares the dataset under data_dir unless an identical preparation exists already."""
    builder, reused = builders.prepare(JaxlmLabeledFiles, config, data_dir)
    logging.info("%s dataset %s/%s in %s (%d classes: %s)", "Reusing" if reused else "Prepared",
                 builder.name, config.name, builder.data_path, len(config.label_names),
                 ", ".join(config.label_names))
    return PreparedLabeled(builder=builder, vocab=vocab_of(config), reused=reused)
