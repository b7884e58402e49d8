"""`jaxlm predict`: a classification run's labels and class probabilities for every row of a file.

    classifier = load_run_classifier("runs/sst2", overrides={})
    rows = read_inputs("reviews.csv", text_column="sentence")
    predictions = classifier.predict([r.text for r in rows], [r.pair for r in rows])
    write_predictions("out.csv", rows, predictions, classifier.label_names)

Input: CSV / TSV / JSONL (the text in --text_column, default the run's data.text_column) or plain
text (.txt: one text per non-empty line); either file may be on a bucket (gs://). Output (.csv,
.tsv or .jsonl, by extension): the input's columns, then `label` (the predicted class name),
`score` (its probability) and one `prob_<class>` column per class. Rows are tokenized exactly as
training tokenized them (same tokenizer, same truncation to seq_len) and run through the eval
model in batches of a fixed size, padded to one of a few lengths, so a file compiles at most a
handful of programs.
"""

import csv
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxlm import io
from jaxlm import run as run_lib
from jaxlm import sharding
from jaxlm.compat import mesh_context
from jaxlm.data import compressed, example_loader, table_files
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.sharded_model import ShardedModel

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".parquet": "parquet", ".txt": "text", ".text": "text"}
OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
NUM_LENGTH_BUCKETS = 4  # seq_len, seq_len/2, /4, /8: short texts are not padded to the full length.
PROGRESS_EVERY_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class InputRow:
    values: dict[str, Any]  # The row's columns as read (kept in the output).
    text: str
    pair: str  # '' without a second text.


@dataclasses.dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # [N] int32 class indices.
    probs: np.ndarray  # [N, C] float32.
    truncated: int  # Rows longer than seq_len tokens (cut, as in training).


def _format_of(path: str, flag: str, formats: dict[str, str], expected: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in formats:
        raise UserError(f"{flag}={path}: unknown format {ext or '(no extension)'!r}; {expected}")
    return formats[ext]


def input_format(path: str) -> str:
    """The --input's format; a compressed file (reviews.csv.gz) by the extension before its suffix."""
    ext = os.path.splitext(compressed.without_suffix(path))[1].lower()
    if ext not in INPUT_FORMATS:
        raise UserError(f"--input={path}: unknown format {ext or '(no extension)'!r}; give a .csv, .tsv, .jsonl, "
                        ".parquet or .txt (one text per line) file, or one of them compressed (.gz, .bz2, .xz, .zst)")
    return INPUT_FORMATS[ext]


def output_format(path: str) -> str:
    return _format_of(path, "--output", OUTPUT_FORMATS, "name a .csv, .tsv or .jsonl file")


def _cell(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: column {column!r} holds a {type(value).__name__}, not text")
    return str(value)


def read_inputs(path: str, text_column: str = "text", text_pair_column: str = "",
                header: bool = True) -> list[InputRow]:
    """The rows to label; a missing column is a UserError that names the flag that picks it.
    header=False: a CSV/TSV without a header line, its columns numbered from 1."""
    fmt = input_format(path)
    if fmt == "text":
        lines = [line.strip() for line in table_files.read_text(path).splitlines()]
        rows = [InputRow({"text": line}, line, "") for line in lines if line]
        if not rows:
            raise UserError(f"--input={path}: no text (every line is empty)")
        return rows
    columns = {"--text_column": text_column, "--text_pair_column": text_pair_column}
    rows = []
    for row in table_files.read_rows(path, fmt, columns, header, "--header"):
        where = row.where(path)
        rows.append(InputRow(row.values, _cell(row.values[text_column], where, text_column),
                             _cell(row.values[text_pair_column], where, text_pair_column) if text_pair_column else ""))
    return rows


class Classifier:
    """A classification run's eval model on this machine's devices, for labelling new texts."""

    def __init__(self, model: ShardedModel, params: Any, tokenizer: Any, label_names: Sequence[str], step: int):
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.label_names = tuple(label_names)
        self.step = step
        self.seq_len = int(model.config.seq_len)
        self.pad_id = tokenizer_lib.pad_id(tokenizer)
        self.buckets = example_loader.bucket_lengths(self.seq_len, NUM_LENGTH_BUCKETS)
        self._probs = jax.jit(self._probabilities)

    def _probabilities(self, params, tokens, padding_mask, token_type_ids):
        logits = self.model.apply(params, {"inputs": tokens, "padding_mask": padding_mask,
                                           "token_type_ids": token_type_ids})
        # Only the run's classes: the head may be wider (at least 2 outputs).
        return jax.nn.softmax(logits[:, :len(self.label_names)].astype(jnp.float32), axis=-1)

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]]):
        enc = self.tokenizer(list(texts), list(pairs) if pairs else None, truncation=True, max_length=self.seq_len,
                             padding=False, return_token_type_ids=True, return_attention_mask=False)
        # Truncation is counted on an untruncated encoding of the same rows.
        full = self.tokenizer(list(texts), list(pairs) if pairs else None, truncation=False,
                              return_token_type_ids=False, return_attention_mask=False)
        truncated = sum(len(ids) > self.seq_len for ids in full["input_ids"])
        return enc["input_ids"], enc["token_type_ids"], truncated

    def _batch(self, ids: list, types: list, batch_size: int) -> dict:
        length = next(b for b in self.buckets if b >= max(max((len(x) for x in ids), default=1), 1))
        tokens = np.full((batch_size, length), self.pad_id, np.int32)
        type_ids = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), bool)
        for row, (x, t) in enumerate(zip(ids, types)):
            tokens[row, :len(x)], type_ids[row, :len(t)] = x, t
            mask[row, :max(len(x), 1)] = True  # An empty text still attends to one position.
        for row in range(len(ids), batch_size):
            mask[row, 0] = True  # Padding rows: any valid input; their outputs are dropped.
        return {"tokens": tokens, "padding_mask": mask, "token_type_ids": type_ids}

    def predict(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, batch_size: int = 64,
                log_progress: bool = False) -> Predictions:
        n = len(texts)
        pairs = list(pairs) if pairs is not None and any(pairs) else None
        probs = np.zeros((n, len(self.label_names)), np.float32)
        truncated = 0
        mesh = self.model.mesh
        rows_per_batch = -(-batch_size // mesh.size) * mesh.size  # Whole rows per device.
        started = last_report = time.time()
        for start in range(0, n, rows_per_batch):
            stop = min(start + rows_per_batch, n)
            ids, types, cut = self.encode(texts[start:stop], pairs[start:stop] if pairs else None)
            truncated += cut
            batch = self._batch(ids, types, rows_per_batch)
            batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            with mesh_context(mesh):
                out = self._probs(self.params, **batch)
            probs[start:stop] = np.asarray(jax.device_get(out))[:stop - start]
            now = time.time()
            if log_progress and (now - last_report >= PROGRESS_EVERY_SECONDS or stop == n):
                last_report = now
                rate = stop / max(now - started, 1e-9)
                logging.info("predict: %d/%d rows (%.0f rows/s, ETA %.0f s)", stop, n, rate, (n - stop) / rate)
        return Predictions(np.argmax(probs, -1).astype(np.int32), probs, truncated)


def classifier_of(found: run_lib.RunCheckpoint) -> Classifier:
    """A classification run's checkpoint (params only), opened on its mesh."""
    run = found.open(require="predict")
    names = list(found.config.data.label_names or [])
    if not names:
        raise UserError(f"{found.workdir}/config.json has no data.label_names; it was not written by a "
                        "classification run that started training")
    return Classifier(run.model, run.params, run.tokenizer, names, run.step)


def load_run_classifier(workdir: str, overrides: dict[str, str], step: Optional[int] = None,
                        best: bool = False) -> Classifier:
    """The run in `workdir` as a Classifier, on one device unless --config.mesh.* asks for more."""
    return classifier_of(run_lib.find_run(workdir, step=step, best=best, overrides=overrides))


def _column_names(label_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in label_names]


def write_predictions(path: str, rows: Sequence[InputRow], predictions: Predictions, label_names: Sequence[str],
                      overwrite: bool = False) -> None:
    """Writes the rows with their predictions, atomically (a partial file never appears at `path`)."""
    fmt = output_format(path)
    if io.exists(path) and not overwrite:
        raise UserError(f"--output={path} exists; choose another name or pass --overwrite")
    parent = io.path(path).parent
    if not io.is_remote(path) and not io.is_dir(parent):  # A bucket prefix needs no creating.
        raise UserError(f"--output={path}: directory {parent} does not exist; create it first")
    prob_columns = _column_names(label_names)
    added = ["label", "score", *prob_columns]
    clash = sorted({k for r in rows for k in r.values} & set(added))
    # Input columns named like ours keep their values under an 'input_' prefix.
    rename = {k: f"input_{k}" for k in clash}
    with io.open_atomic(path) as f:  # A temp file renamed when complete, or one upload to a bucket.
        if fmt == "jsonl":
            for row, label, probs in zip(rows, predictions.labels, predictions.probs):
                record = {rename.get(k, k): v for k, v in row.values.items()}
                record.update(label=label_names[label], score=float(probs[label]),
                              **{c: float(p) for c, p in zip(prob_columns, probs)})
                # default=str: Parquet columns may hold dates or decimals, which JSON has no type for.
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        else:
            columns = list(dict.fromkeys(k for r in rows for k in r.values))
            writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
            writer.writerow([rename.get(k, k) for k in columns] + added)
            for row, label, probs in zip(rows, predictions.labels, predictions.probs):
                writer.writerow([row.values.get(k, "") for k in columns] + [
                    label_names[label], f"{probs[label]:.6f}", *(f"{p:.6f}" for p in probs)])


def run_predict(workdir: str, input_path: str, output_path: str, overrides: dict[str, str], *,
                step: Optional[int] = None, best: bool = False, text_column: str = "", text_pair_column: str = "",
                batch_size: int = 64, overwrite: bool = False,
                header: Optional[bool] = None) -> tuple[Classifier, Predictions]:
    """The whole command: checks that cost nothing first, then the model, then the rows.
    header None: as the run's data files (data.header)."""
    output_format(output_path)
    if io.exists(output_path) and not overwrite:
        raise UserError(f"--output={output_path} exists; choose another name or pass --overwrite")
    if io.path(output_path) == io.path(input_path):
        raise UserError(f"--output={output_path} is the input file; write the predictions to another file")
    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size}: must be at least 1")
    input_format(input_path)
    if not io.is_file(input_path):
        raise UserError(f"--input={input_path}: no such file")
    found = run_lib.find_run(workdir, step=step, best=best, overrides=overrides)
    config = found.config
    text_column = text_column or config.data.text_column or "text"
    if text_pair_column == "" and config.data.get("text_pair_column", ""):
        text_pair_column = config.data.text_pair_column  # The run classified pairs: so does predict.
    if text_pair_column and input_format(input_path) == "text":
        raise UserError(f"--input={input_path}: this run classifies text pairs ({text_pair_column!r}); give a "
                        "CSV, TSV, JSONL or Parquet file with both columns")
    header = bool(config.data.get("header", True)) if header is None else header
    rows = read_inputs(input_path, text_column, text_pair_column, header)
    classifier = classifier_of(found)
    logging.info("predict: %d rows of %s with step %d of %s (%s)", len(rows), input_path, classifier.step, workdir,
                 ", ".join(classifier.label_names))
    predictions = classifier.predict([r.text for r in rows], [r.pair for r in rows], batch_size, log_progress=True)
    if jax.process_index() == 0:
        write_predictions(output_path, rows, predictions, classifier.label_names, overwrite)
    if predictions.truncated:
        print(f"jaxlm: note: {predictions.truncated} of {len(rows)} rows are longer than seq_len="
              f"{classifier.seq_len} tokens and were truncated, as in training", file=sys.stderr, flush=True)
    return classifier, predictions
