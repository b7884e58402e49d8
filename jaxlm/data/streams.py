"""Causal-LM train rows packed from document streams, tokenized while training runs.

Row r of every global train batch (r < G, the global batch size) is fed by stream r. Stream r
reads documents D[r], D[r + G], D[r + 2G], ... of a source's infinite document order D (grain's
global index shuffle, a fresh permutation in every epoch, computed per index: no permutation
array), tokenizes them, and concatenates them with an EOS after each. Its b-th row is tokens
[b*S, b*S + T) of that concatenation, so a document longer than a row continues in the stream's
next row. Causal LM: T = L + 1, S = L (inputs = row[:-1], targets = row[1:]); masked LM: T = S =
the window inside [CLS] ... [SEP].

A mixture: the k-th document of stream r comes from source s, drawn with the sources' weights
by a generator fixed by (seed, r, k); it is that source's next document for the stream.

Hence:
- host h of n reads and tokenizes only the streams of its own rows; the global batches are the
  same for any number of hosts and of worker processes (workers only split the streams);
- nothing before the first batch grows with the corpus: a stream reads a few documents ahead;
- a stream's position is (documents started, picks per source, offset into the current
  document): the iterator state in a checkpoint resumes at the exact next row.
"""

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import grain
import grain.experimental
import grain.multiprocessing
import numpy as np
from absl import flags
from absl import logging as absl_logging

from jaxlm.data import example_loader, lm_loader
from jaxlm.data import tokenizer as tokenizer_lib

# Documents a stream reads (and tokenizes in one call) when its buffer runs short: per-call costs
# (the ArrayRecord read, the tokenizer call) dominate below a few dozen short documents.
READ_AHEAD_DOCUMENTS = 64
# Mixture draws come in blocks of this many documents per generator (cheaper than one each).
_DRAW_BLOCK = 256
_PARENT_POLL_S = 1.0  # How often a worker checks that the trainer is still alive.


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """One source of documents: a random-access text split (`sources.TextSplit`) and its weight."""

    name: str
    texts: Any  # sources.TextSplit: len() and texts(indices).
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What every stream of a run shares (pickled into each worker process)."""

    sources: tuple[StreamSource, ...]
    tokenizer: Any
    row_tokens: int  # Tokens per row: seq_len + 1 for causal LM (targets shift by one).
    row_stride: int  # Where the next row starts: seq_len for causal LM (one token shared).
    global_batch_size: int
    seed: int
    eos_id: int  # After every document.

    def document_orders(self) -> list[grain.MapDataset]:
        """Per source, D[q] for q = 0, 1, ...: its document ids, shuffled afresh in each epoch."""
        return [grain.MapDataset.range(len(s.texts)).shuffle(seed=_source_seed(self.seed, i)).repeat()
                for i, s in enumerate(self.sources)]


def _source_seed(seed: int, source: int) -> int:
    # Hashed (as example_loader.shuffle_seed): grain seeds epoch e with seed + e, and sources or
    # runs with neighbouring seeds must not share shifted permutations.
    return int(np.random.SeedSequence([seed % 2**63, source, 0x5EED]).generate_state(1)[0])


class _Stream:
    """One stream: its documents' tokens, concatenated, cut into rows of row_tokens."""

    def __init__(self, spec: StreamSpec, orders: list[grain.MapDataset], encode, row: int):
        self._spec, self._orders, self._encode, self.row = spec, orders, encode, row
        self._weights = np.cumsum([s.weight for s in spec.sources], dtype=np.float64)
        self._weights /= self._weights[-1]
        self.set_state({"rows": 0, "documents": 0, "picks": [0] * len(spec.sources), "offset": 0})

    # Position of the next row (number `rows` of the stream): document `documents` of the stream
    # (picks: documents taken from each source before it), `offset` tokens into it.
    def get_state(self) -> dict:
        return {"rows": self.rows, "documents": self._documents, "picks": list(self._picks), "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self.rows = state["rows"]
        self._documents, self._picks, self._offset = state["documents"], list(state["picks"]), state["offset"]
        self._buffer: list[tuple[np.ndarray, int]] = []  # (tokens + EOS, source) from `documents` on.
        self._read_documents, self._read_picks = self._documents, list(self._picks)
        self._draws: tuple[int, np.ndarray] = (-1, np.empty(0))

    def _source_of(self, document: int) -> int:
        if len(self._spec.sources) == 1:
            return 0
        block = document // _DRAW_BLOCK
        if self._draws[0] != block:
            rng = np.random.default_rng([self._spec.seed % 2**63, self.row, block])
            self._draws = (block, rng.random(_DRAW_BLOCK))
        return int(np.searchsorted(self._weights, self._draws[1][document % _DRAW_BLOCK], side="right"))

    def _read_more(self) -> None:
        """Reads and tokenizes the stream's next READ_AHEAD_DOCUMENTS documents."""
        picked: list[tuple[int, int]] = []  # (source, document id)
        g = self._spec.global_batch_size
        for _ in range(READ_AHEAD_DOCUMENTS):
            source = self._source_of(self._read_documents)
            position = self.row + self._read_picks[source] * g
            picked.append((source, int(self._orders[source][position])))
            self._read_picks[source] += 1
            self._read_documents += 1
        texts: list[str] = [""] * len(picked)
        for source in sorted({s for s, _ in picked}):
            slots = [i for i, (s, _) in enumerate(picked) if s == source]
            for slot, text in zip(slots, self._spec.sources[source].texts.texts([picked[i][1] for i in slots])):
                texts[slot] = text
        eos = self._spec.eos_id
        for (source, _), ids in zip(picked, self._encode(texts)):
            self._buffer.append((np.asarray([*ids, eos], np.int32), source))

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [row_tokens], tokens per source [S] of the first row_stride) of the next row."""
        need, stride = self._spec.row_tokens, self._spec.row_stride
        row = np.empty(need, np.int32)
        per_source = np.zeros(len(self._spec.sources), np.int32)
        filled, index, offset = 0, 0, self._offset
        while filled < need:
            while index >= len(self._buffer):
                self._read_more()
            tokens, source = self._buffer[index]
            take = min(need - filled, len(tokens) - offset)
            row[filled:filled + take] = tokens[offset:offset + take]
            # The first row_stride tokens only (the rest open the next row): each counts once.
            per_source[source] += max(0, min(filled + take, stride) - filled)
            filled += take
            offset += take
            if offset == len(tokens):
                index, offset = index + 1, 0
        self._advance(stride)
        self.rows += 1
        return row, per_source

    def _advance(self, count: int) -> None:
        while count:
            tokens, source = self._buffer[0]
            step = min(count, len(tokens) - self._offset)
            self._offset += step
            count -= step
            if self._offset == len(tokens):
                self._buffer.pop(0)
                self._documents += 1
                self._picks[source] += 1
                self._offset = 0


class StreamRows(grain.IterDataset):
    """For each global batch, the rows of streams `rows` (part of this host's rows), as one
    element: {"tokens" [n, row_tokens], "source_tokens" [n, S], "row" [n], "batch" [n]}.

    Under `mp_prefetch`, worker w of W receives streams[w::W] (grain calls `set_slice`) and grain
    interleaves the workers' elements round-robin; `_host_rows` puts the rows back in order. One
    element per worker and batch (not per row) keeps the inter-process traffic per batch small.
    """

    def __init__(self, spec: StreamSpec, rows: Sequence[int]):
        super().__init__()
        self._spec, self.rows = spec, tuple(rows)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # Streams are independent: any slice is the same work.
        self.rows = self.rows[sl]

    def __iter__(self) -> "_StreamRowsIterator":
        return _StreamRowsIterator(self._spec, self.rows)

    def __str__(self) -> str:
        return f"StreamRows({len(self.rows)} streams of {self._spec.row_tokens}-token rows)"


class _StreamRowsIterator(grain.DatasetIterator):
    def __init__(self, spec: StreamSpec, rows: tuple[int, ...]):
        super().__init__()
        orders = spec.document_orders()
        encode = tokenizer_lib.BatchEncoder(spec.tokenizer)
        self._streams = [_Stream(spec, orders, encode, row) for row in rows]

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [stream.rows for stream in self._streams]  # The global batch of each row.
        tokens, per_source = zip(*(stream.next_row() for stream in self._streams))
        return {"tokens": np.stack(tokens), "source_tokens": np.stack(per_source),
                "row": np.asarray([stream.row for stream in self._streams], np.int64),
                "batch": np.asarray(batches, np.int64)}

    def get_state(self) -> dict:
        return {"streams": [s.get_state() for s in self._streams]}

    def set_state(self, state: dict) -> None:
        for stream, saved in zip(self._streams, state["streams"], strict=True):
            stream.set_state(saved)


def _host_rows(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """W workers' elements of one batch, stacked ([W, n, ...]: worker w holds streams w, w + W,
    ...) -> this host's rows in order ([n * W, ...])."""
    return {key: np.ascontiguousarray(np.swapaxes(value, 0, 1).reshape(-1, *value.shape[2:]))
            for key, value in parts.items()}


def worker_count(requested: int, rows: int) -> int:
    """The largest number of worker processes <= requested that divides this host's rows (so every
    worker holds the same number of streams and `_host_rows` can interleave them)."""
    return max((w for w in range(1, max(requested, 0) + 1) if rows % w == 0), default=0)


class StreamTrainIterator(example_loader.TrainIterator):
    """TrainIterator whose batches also count the input tokens each source supplied (on this
    host); the counts are part of the state, so they survive a resume."""

    def __init__(self, parent: grain.DatasetIterator, layout: dict[str, Any], source_names: Sequence[str]):
        super().__init__(parent, layout)
        self.source_names = tuple(source_names)
        self._source_tokens = np.zeros(len(self.source_names), np.int64)

    def __next__(self) -> example_loader.Batch:
        batch = next(self._parent)
        self._source_tokens += batch.pop("source_tokens").sum(axis=0)
        return batch

    def tokens_by_source(self) -> dict[str, int]:
        return dict(zip(self.source_names, self._source_tokens.tolist()))

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "source_tokens": self._source_tokens.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._source_tokens = np.asarray(state.get("source_tokens", [0] * len(self.source_names)), np.int64)


def causal_lm_batch(rows: dict[str, np.ndarray], segment_eos: Optional[int] = None) -> example_loader.Batch:
    """Host rows (tokens [B, L + 1]) -> inputs, targets, weights (+ segment_ids when segmented)."""
    tokens = rows["tokens"]
    batch = {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "weights": np.ones(tokens[:, 1:].shape, np.float32),
    }
    if segment_eos is not None:  # A new segment at every EOS, as the token-cache loader's.
        batch["segment_ids"] = lm_loader.segment_ids(batch["inputs"], segment_eos)
    return batch


RowsToBatch = Callable[[dict[str, np.ndarray]], example_loader.Batch]


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent:  # Re-parented: the trainer is gone (kill -9 included).
            os._exit(1)


def _worker_setup(worker_index: int, worker_count: int) -> None:
    """In each grain worker: libraries' records below ERROR (tfds re-opening the dataset, ...)
    are dropped, not printed to the user's console (the trainer's log file is process 0's); and
    the worker ends when the trainer dies (grain's workers wait for a stop that a killed trainer
    never sends)."""
    del worker_index, worker_count
    logging.getLogger().setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def make_train_iterator(spec: StreamSpec, to_batch: RowsToBatch, *, process_index: int, process_count: int,
                        num_workers: int, prefetch: int, layout: dict[str, Any]) -> StreamTrainIterator:
    """This host's rows of the global train batches, forever: streams tokenized in
    `num_workers` grain worker processes (0: in this process, prefetched by a thread).

    `to_batch` turns the host's rows ({"tokens" [B, row_tokens], "row" [B] (global row = stream),
    "batch" [B] (global batch index)}) into the task's batch, in this process."""
    first_row, rows = example_loader.host_rows(spec.global_batch_size, process_index, process_count)
    dataset: grain.IterDataset = StreamRows(spec, range(first_row, first_row + rows))
    workers = worker_count(num_workers, rows)
    if workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; jaxlm's CLI is argparse.
            flags.FLAGS.mark_as_parsed()
        # Each worker prepares its part of `prefetch` batches ahead.
        options = grain.multiprocessing.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=max(1, prefetch))
        dataset = dataset.mp_prefetch(options, worker_init_fn=_worker_setup)
    dataset = dataset.batch(max(workers, 1), drop_remainder=True).map(_host_rows)
    dataset = dataset.map(lambda rows: {**to_batch(rows), "source_tokens": rows["source_tokens"]})
    if not workers and prefetch > 0:
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
    # The batches do not depend on the worker count, but grain's saved position does (one state
    # per worker): a resume with another data.num_workers is refused by the layout check.
    layout = {**layout, "num_workers": workers}
    return StreamTrainIterator(iter(dataset), layout, [s.name for s in spec.sources])
