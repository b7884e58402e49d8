"""Everything a classification run needs from the data config, in one call.

Sources: labelled local files (CSV/TSV/JSONL, prepared by `labeled_builder`) or a prepared tfds
dataset by name (glue/sst2, imdb_reviews …) with the same keys: data.text_column,
data.text_pair_column, data.label_column. Texts are tokenized with the run's tokenizer, truncated
to seq_len and kept as fixed-size rows (cached on disk per tokenizer); batches come from the
generic `example_loader` (per host, resumable, exact eval), optionally length-bucketed.

A batch: inputs [B, L] int32, padding_mask [B, L] bool, token_type_ids [B, L] int32,
labels [B] int32, weights [B] float32 (the class weight; 0 for rows padding the eval set).
"""

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxlm import io
from jaxlm.data import bucket_data, example_loader, labeled_builder, labels, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

CACHE_DIRNAME = "jaxlm_example_cache"
_ENCODE_BATCH = 2048
_READ_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class LabeledSplit:
    """A split as columns in memory (classification datasets are small)."""

    name: str
    texts: list[str]
    pairs: list[str]  # Empty strings when there is no second text.
    labels: np.ndarray  # int32 class indices.


@dataclasses.dataclass(frozen=True)
class LabeledCorpus:
    dataset_id: str  # Stable name of the prepared data, usable as a relative path.
    label_names: tuple[str, ...]
    label_kind: str  # integer (the data's labels are class indices) or name.
    train: LabeledSplit
    eval: LabeledSplit
    has_pairs: bool


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    ids: np.ndarray  # [N, max_len] int32, padded with pad_id.
    type_ids: np.ndarray  # [N, max_len] int8.
    lengths: np.ndarray  # [N] int32, at least 1.
    labels: np.ndarray  # [N] int32.

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    tokenizer: Any
    vocab_size: int
    pad_id: int
    label_names: tuple[str, ...]
    label_kind: str  # integer or name: how files' labels map to classes (labels.LabelVocab.index).
    positive_index: int  # The positive class of binary precision/recall/F1.
    class_weights: np.ndarray  # [C] float32, applied to the loss.
    class_counts: dict  # split -> examples per class.
    train_iter: Optional[example_loader.TrainIterator]  # None for eval-only data.
    eval_batches: Callable[[], Iterator[example_loader.Batch]]
    num_eval_batches: int
    num_train_examples: int
    num_eval_examples: int
    bucket_lengths: tuple[int, ...]
    host_batch_size: int


# -- sources --------------------------------------------------------------------------------------
def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_split(source: Sequence[Any], name: str, keys: tuple[str, str, str], num_labels: int,
                where: str) -> LabeledSplit:
    text_key, pair_key, label_key = keys
    texts, pairs, label_ids = [], [], []
    get_many = getattr(source, "__getitems__", None)
    for start in range(0, len(source), _READ_BATCH):
        indices = list(range(start, min(start + _READ_BATCH, len(source))))
        for i, record in zip(indices, get_many(indices) if get_many else [source[i] for i in indices]):
            label = int(record[label_key])
            if not 0 <= label < num_labels:
                raise UserError(f"{where} split {name!r}, example {i}: label {label} is out of range "
                                f"(0..{num_labels - 1}); pick a labelled split")
            texts.append(_as_str(record[text_key]))
            pairs.append(_as_str(record[pair_key]) if pair_key else "")
            label_ids.append(label)
    return LabeledSplit(name, texts, pairs, np.asarray(label_ids, np.int32))


def files_corpus(data_config, data_dir: str) -> LabeledCorpus:
    config = labeled_builder.make_labeled_files_config(data_config)
    prepared = labeled_builder.prepare_labeled_dataset(config, data_dir)
    keys = (labeled_builder.TEXT, labeled_builder.TEXT_PAIR if config.text_pair_column else "",
            labeled_builder.LABEL)
    where = f"{prepared.builder.name}/{config.name}"
    split = lambda name: _read_split(prepared.builder.as_data_source(name), name, keys,  # noqa: E731
                                     len(config.label_names), where)
    return LabeledCorpus(dataset_id=where, label_names=tuple(config.label_names),
                         label_kind="integer" if config.integer_labels else "name",
                         train=split(labeled_builder.TRAIN_SPLIT), eval=split(labeled_builder.EVAL_SPLIT),
                         has_pairs=bool(config.text_pair_column))


def tfds_corpus(data_config, data_dir: str) -> LabeledCorpus:
    """A prepared tfds dataset: data.text_column (+ text_pair_column) and a ClassLabel label_column."""
    name = data_config.tfds_name.strip()
    builder = sources.prepared_builder(name, data_dir, data_config)
    features = builder.info.features
    keys = []
    for field, default in (("text_column", "text"), ("text_pair_column", ""), ("label_column", "label")):
        key = (data_config.get(field, default) or "").strip()
        if key and key not in features:
            raise UserError(f"data.{field}={key!r} is not a feature of {name} (it has {', '.join(features)}); "
                            f"set it to one of them")
        keys.append(key)
    if labels.kind_option(data_config.get("label_kind", "")) == "name":
        raise UserError(f"data.label_kind=name: the labels of {name} are class indices; leave data.label_kind=''")
    label_feature = features[keys[2]]
    names = labels.names_option(data_config.get("label_names", ()))
    if isinstance(label_feature, tfds.features.ClassLabel):
        if names and len(names) != label_feature.num_classes:
            raise UserError(f"data.label_names has {len(names)} names but {name} has {label_feature.num_classes} "
                            "classes")
        names = names or tuple(label_feature.names)
    elif not names:
        count = int(data_config.get("num_labels", 0) or 0)
        if not count:
            raise UserError(f"data.label_column={keys[2]!r} of {name} is not a ClassLabel; set data.num_labels "
                            "or data.label_names")
        names = tuple(str(i) for i in range(count))
    splits = {field: _read_split(source, split, tuple(keys), len(names), f"data.tfds_name={name}")
              for field, (split, source) in sources.split_sources(builder, data_config, data_dir).items()}
    dataset_id = sources.tfds_dataset_id(builder)
    return LabeledCorpus(dataset_id=dataset_id, label_names=names, label_kind="integer", train=splits["train_split"],
                         eval=splits["eval_split"], has_pairs=bool(keys[1]))


def load_labeled_corpus(data_config, data_dir: str) -> LabeledCorpus:
    return sources.from_files_or_tfds(data_config, data_dir, files_corpus, tfds_corpus)


# -- tokenization ---------------------------------------------------------------------------------
def encode_split(tokenizer, split: LabeledSplit, max_len: int, pad_id: int, with_pairs: bool) -> EncodedSplit:
    """Tokenizes (with the tokenizer's special tokens), truncates to max_len and pads."""
    n = len(split.labels)
    ids = np.full((n, max_len), pad_id, np.int32)
    type_ids = np.zeros((n, max_len), np.int8)
    lengths = np.ones(n, np.int32)  # An empty text still gets one (padding) position to attend to.
    for start in range(0, n, _ENCODE_BATCH):
        stop = min(start + _ENCODE_BATCH, n)
        pairs = split.pairs[start:stop] if with_pairs else None
        enc = tokenizer(split.texts[start:stop], pairs, truncation=True, max_length=max_len, padding=False,
                        return_token_type_ids=True, return_attention_mask=False)
        for row, (tokens, types) in enumerate(zip(enc["input_ids"], enc["token_type_ids"]), start):
            ids[row, :len(tokens)] = tokens
            type_ids[row, :len(types)] = types
            lengths[row] = max(len(tokens), 1)
    return EncodedSplit(ids, type_ids, lengths, split.labels.astype(np.int32))


def _cache_path(data_dir: str, dataset_id: str, split: str, fingerprint: str) -> str:
    if io.is_remote(data_dir):  # Per host, written with np.savez + os.replace: on this host's disk.
        data_dir = bucket_data.local_root(data_dir)
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", split).strip("_") + "_" + hashlib.sha256(split.encode()).hexdigest()[:8]
    return os.path.join(data_dir, CACHE_DIRNAME, dataset_id, f"{safe}-{fingerprint[:24]}.npz")


def cached_encode(tokenizer, split: LabeledSplit, max_len: int, pad_id: int, with_pairs: bool, *,
                  data_dir: str, dataset_id: str) -> EncodedSplit:
    """encode_split, cached on disk per (dataset, split, tokenizer, max_len): restarts skip tokenizing."""
    key = hashlib.sha256(json.dumps([tokenizer_lib.fingerprint(tokenizer), max_len, pad_id, with_pairs,
                                     len(split.labels)]).encode()).hexdigest()
    path = _cache_path(data_dir, dataset_id, split.name, key)
    if os.path.exists(path):
        with np.load(path) as saved:
            if np.array_equal(saved["labels"], split.labels):
                return EncodedSplit(saved["ids"], saved["type_ids"], saved["lengths"], saved["labels"])
    encoded = encode_split(tokenizer, split, max_len, pad_id, with_pairs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, ids=encoded.ids, type_ids=encoded.type_ids, lengths=encoded.lengths, labels=encoded.labels)
    os.replace(tmp, path)  # Atomic: concurrent hosts or a kill never leave a partial cache.
    return encoded


# -- class weights ----------------------------------------------------------------------------------
def class_weights(option: Any, counts: np.ndarray) -> np.ndarray:
    """classification.class_weights: '' (all 1), 'balanced' (N / (C * count)), or 'w0,w1,...'."""
    num = len(counts)
    if isinstance(option, (list, tuple)):
        option = ",".join(str(v) for v in option)
    option = (option or "").strip()
    if not option:
        return np.ones(num, np.float32)
    if option == "balanced":
        return (counts.sum() / (num * np.maximum(counts, 1))).astype(np.float32)
    try:
        values = np.asarray([float(v) for v in option.split(",")], np.float32)
    except ValueError:
        raise UserError(f"classification.class_weights={option!r}: give 'balanced' or {num} comma-separated "
                        "numbers") from None
    if len(values) != num or (values <= 0).any():
        raise UserError(f"classification.class_weights={option!r}: needs {num} positive numbers, one per class")
    return values


# -- loaders ----------------------------------------------------------------------------------------
def _rows(split: EncodedSplit, weights_by_class: np.ndarray, ids: np.ndarray, length: int,
          valid: np.ndarray) -> example_loader.Batch:
    safe = np.where(valid, ids, 0)
    labels_ = split.labels[safe]
    return {
        "inputs": np.ascontiguousarray(split.ids[safe, :length]),
        "padding_mask": np.arange(length)[None, :] < split.lengths[safe][:, None],
        "token_type_ids": split.type_ids[safe, :length].astype(np.int32),
        "labels": labels_.astype(np.int32),
        "weights": np.where(valid, weights_by_class[labels_], 0.0).astype(np.float32),
    }


def _eval_batches(evaluation: EncodedSplit, weights_by_class: np.ndarray, buckets: tuple[int, ...], config,
                  process_index: int, process_count: int):
    # One eval length (the smallest bucket that fits every eval example): a single eval compile.
    eval_len = next(b for b in buckets if b >= int(evaluation.lengths.max()))
    n_eval = len(evaluation)
    return functools.partial(
        example_loader.eval_batches, n_eval,
        lambda ids: _rows(evaluation, weights_by_class, ids, eval_len, ids < n_eval),
        global_batch_size=config.global_batch_size, process_index=process_index, process_count=process_count)


def can_build_eval_only(config) -> bool:
    """A finished run's eval needs only data.eval_file (not the train data) unless the loss weights
    come from the train class counts ('balanced')."""
    return (bool((config.data.get("eval_file", "") or "").strip()) and bool(config.data.get("label_names"))
            and (config.classification.get("class_weights", "") or "").strip() != "balanced")


def build_eval_only_data(config, workdir: str, process_index: int = 0, process_count: int = 1) -> ClassificationData:
    """Eval batches of data.eval_file for a trained run: its tokenizer and classes, no train data.

    The rows are tokenized and batched exactly as training's eval split was, so the metrics are
    those training logged when the file is the run's own eval file.
    """
    data_config = config.data
    names = labels.names_option(data_config.label_names)
    examples, vocab = labeled_builder.read_eval_files(data_config, names, data_config.get("label_kind", ""))
    split = LabeledSplit("eval", [e.text for e in examples], [e.text_pair for e in examples],
                         np.asarray([e.label for e in examples], np.int32))
    num_labels = len(names)
    weights_by_class = class_weights(config.classification.get("class_weights", ""), np.ones(num_labels))
    positive = labels.positive_index(names, config.classification.get("positive_label", ""))
    tokenizer = tokenizer_lib.load_tokenizer(data_config.tokenizer, workdir)
    pad = tokenizer_lib.pad_id(tokenizer)
    with_pairs = bool((data_config.get("text_pair_column", "") or "").strip())
    evaluation = encode_split(tokenizer, split, config.seq_len, pad, with_pairs)
    buckets = example_loader.bucket_lengths(config.seq_len, int(data_config.get("length_buckets", 1) or 1))
    n_eval = len(evaluation)
    logging.info("classification eval data: %d examples of %s, %d classes (%s)", n_eval, data_config.eval_file,
                 num_labels, ", ".join(names))
    _, rows = example_loader.host_rows(config.global_batch_size, process_index, process_count)
    return ClassificationData(
        tokenizer=tokenizer, vocab_size=len(tokenizer), pad_id=pad, label_names=names,
        label_kind="integer" if vocab.integer else "name", positive_index=positive,
        class_weights=weights_by_class, class_counts={"eval": np.bincount(split.labels, minlength=num_labels).tolist()},
        train_iter=None, eval_batches=_eval_batches(evaluation, weights_by_class, buckets, config, process_index,
                                                    process_count),
        num_eval_batches=example_loader.num_eval_batches(n_eval, config.global_batch_size), num_train_examples=0,
        num_eval_examples=n_eval, bucket_lengths=buckets, host_batch_size=rows)


def build_classification_data(config, workdir: str, process_index: int = 0,
                              process_count: int = 1) -> ClassificationData:
    """Prepares (or reuses) the dataset and tokenized rows, and returns the loaders.

    The config is not changed: ClassificationTask.resolve records the label vocabulary from
    the returned data.
    """
    data_config = config.data
    max_len = config.seq_len
    data_dir = sources.data_dir_of(data_config)
    corpus = load_labeled_corpus(data_config, data_dir)
    num_labels = len(corpus.label_names)
    if len(corpus.train.labels) < config.global_batch_size or not len(corpus.eval.labels):
        raise UserError(f"{corpus.dataset_id}: {len(corpus.train.labels)} train and {len(corpus.eval.labels)} eval "
                        f"examples; training needs at least one global batch ({config.global_batch_size}) and "
                        "evaluation at least one example")
    counts = {name: np.bincount(s.labels, minlength=num_labels).tolist()
              for name, s in (("train", corpus.train), ("eval", corpus.eval))}
    # Options that can fail are checked before the tokenizer (which may be trained into workdir).
    weights_by_class = class_weights(config.classification.get("class_weights", ""),
                                     np.asarray(counts["train"], np.float64))
    positive = labels.positive_index(corpus.label_names, config.classification.get("positive_label", ""))
    tokenizer = tokenizer_lib.run_tokenizer(
        data_config, [(corpus.train.texts + [p for p in corpus.train.pairs if p], 1.0)], workdir)
    pad = tokenizer_lib.pad_id(tokenizer)
    encode = functools.partial(cached_encode, tokenizer, max_len=max_len, pad_id=pad, with_pairs=corpus.has_pairs,
                               data_dir=data_dir, dataset_id=corpus.dataset_id)
    train, evaluation = encode(corpus.train), encode(corpus.eval)

    buckets = example_loader.bucket_lengths(max_len, int(data_config.get("length_buckets", 1) or 1))
    plan = example_loader.GlobalBatchPlan(len(train), config.global_batch_size, config.seed,
                                          lengths=train.lengths, buckets=buckets)
    tok_fp = tokenizer_lib.fingerprint(tokenizer)[:16]
    train_iter = example_loader.make_train_iterator(
        plan, lambda ids, length, *_: _rows(train, weights_by_class, ids, length, np.ones(len(ids), bool)),
        global_batch_size=config.global_batch_size, process_index=process_index, process_count=process_count,
        prefetch=int(data_config.get("prefetch", 2)),
        layout={"seq_len": max_len, "seed": config.seed, "buckets": list(buckets), "num_examples": len(train),
                "data_id": f"{corpus.dataset_id}/{tok_fp}"})
    n_eval = len(evaluation)
    eval_batches = _eval_batches(evaluation, weights_by_class, buckets, config, process_index, process_count)
    truncated = int((train.lengths >= max_len).sum())
    logging.info("classification data: %d train / %d eval examples, %d classes (%s), counts %s; %d train "
                 "examples fill seq_len=%d (may be truncated); length buckets %s", len(train), n_eval, num_labels,
                 ", ".join(corpus.label_names), counts, truncated, max_len, list(buckets))
    _, rows = example_loader.host_rows(config.global_batch_size, process_index, process_count)
    return ClassificationData(
        tokenizer=tokenizer, vocab_size=len(tokenizer), pad_id=pad, label_names=corpus.label_names,
        label_kind=corpus.label_kind, positive_index=positive, class_weights=weights_by_class, class_counts=counts,
        train_iter=train_iter, eval_batches=eval_batches,
        num_eval_batches=example_loader.num_eval_batches(n_eval, config.global_batch_size),
        num_train_examples=len(train), num_eval_examples=n_eval, bucket_lengths=buckets, host_batch_size=rows)
