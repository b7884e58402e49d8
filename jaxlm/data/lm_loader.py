"""Causal-LM batches from a flat token stream: deterministic, split across hosts, resumable.

Train example i is the window tokens[i*L : i*L + L + 1] (inputs = w[:-1], targets = w[1:]).
The global order of examples depends only on (seed, epoch): grain shuffles the windows afresh in
every epoch and repeats forever. Global batch b is examples [b*G, (b+1)*G) of that order, and
host h of n reads only its rows [h*G/n, (h+1)*G/n), so the same global batches come out
whatever the number of hosts.
"""

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(first row, number of rows) of each global batch that this host feeds to its devices."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the number of"
            f" hosts ({process_count}); change global_batch_size"
        )
    rows = global_batch_size // process_count
    return process_index * rows, rows


def num_train_windows(num_tokens: int, seq_len: int) -> int:
    return max(num_tokens - 1, 0) // seq_len


def _shuffle_seed(seed: int) -> int:
    # grain seeds epoch e with (seed + e), so runs with seeds s and s+1 would share shifted
    # epochs; hashing the seed first makes different seeds unrelated.
    return int(np.random.SeedSequence(seed % 2**64).generate_state(1)[0])


class _HostRowsMapDataset(grain.MapDataset):
    """Element j is row j % B of this host's part of global batch j // B."""

    def __init__(self, parent: grain.MapDataset, *, global_batch_size: int, first_row: int, rows: int):
        super().__init__(parent)
        self._global_batch_size = global_batch_size
        self._first_row = first_row
        self._rows = rows

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        last = self._first_row + self._rows
        return f"_HostRowsMapDataset(rows [{self._first_row}, {last}) of {self._global_batch_size})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._rows)
        return self._parent[batch * self._global_batch_size + self._first_row + row]


def _train_rows(tokens: np.ndarray, seq_len: int, window_ids: np.ndarray) -> Batch:
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in window_ids.tolist()])
    windows = windows.astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "weights": np.ones((len(window_ids), seq_len), np.float32),
    }


class TrainIterator(grain.DatasetIterator):
    """This host's train batches, forever. A grain DatasetIterator, so grain's orbax handler
    (grain.checkpoint.CheckpointSave / CheckpointRestore) can save and restore it.

    The state records the batch position and the data layout; restoring a state written for a
    different layout (sequence length, batch size, seed, data) raises a UserError rather than
    silently training on a different stream.
    """

    def __init__(self, parent: grain.DatasetIterator, layout: dict[str, Any]):
        super().__init__(parent)
        self._layout = layout

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "layout": dict(self._layout)}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("layout", {})
        keys = set(saved) | set(self._layout)
        changed = sorted(k for k in keys if saved.get(k) != self._layout.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)} -> {self._layout.get(k)}" for k in changed)
            raise UserError(
                f"the checkpoint's data position is for other data ({details}); resume with the"
                " original data and batch settings, or start a new workdir"
            )
        self._parent.set_state(state["pipeline"])

    def __str__(self) -> str:
        return f"TrainIterator({self._layout})"


def make_train_iterator(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    data_id: str = "",
) -> TrainIterator:
    """An infinite iterator over this host's rows of the global train batches.

    `tokens` is the train token stream (a memmap; only this host's windows are read).
    `data_id` identifies the stream in the iterator state (e.g. the token cache file).
    """
    first_row, rows = host_rows(global_batch_size, process_index, process_count)
    windows = num_train_windows(len(tokens), seq_len)
    if windows == 0:
        raise UserError(
            f"data: the train split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1};"
            " use more training text or a smaller seq_len"
        )
    order = grain.MapDataset.range(windows).shuffle(seed=_shuffle_seed(seed)).repeat()
    host = _HostRowsMapDataset(
        order, global_batch_size=global_batch_size, first_row=first_row, rows=rows
    )
    batches = host.batch(rows, drop_remainder=True, batch_fn=np.asarray)
    batches = batches.map(lambda window_ids: _train_rows(tokens, seq_len, window_ids))
    # Threads prefetch whole batches; grain hands them out in order, so output stays deterministic.
    read_options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    layout = {
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "num_windows": windows,
        "data_id": data_id,
    }
    return TrainIterator(iter(batches.to_iter_dataset(read_options)), layout)


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
    """Windows covering every target position 1..N-1 once (the last one partial)."""
    return math.ceil(max(num_tokens - 1, 0) / seq_len)


def num_eval_batches(num_tokens: int, seq_len: int, global_batch_size: int) -> int:
    return math.ceil(num_eval_windows(num_tokens, seq_len) / global_batch_size)


def _eval_row(
    tokens: np.ndarray, seq_len: int, window: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inputs = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, pad_id, np.int32)
    weights = np.zeros(seq_len, np.float32)
    start = window * seq_len
    count = max(0, min(seq_len, len(tokens) - 1 - start))  # Zero for the rows padding the last batch.
    if count:
        span = np.asarray(tokens[start : start + count + 1], dtype=np.int32)
        inputs[:count] = span[:-1]
        targets[:count] = span[1:]
        weights[:count] = 1.0
    return inputs, targets, weights


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    pad_id: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """This host's rows of the eval batches, covering every eval target exactly once.

    Windows run over the stream in order; the last partial window is padded (weight 0), and the
    window count is padded to a multiple of the global batch with all-zero-weight rows.
    """
    first_row, rows = host_rows(global_batch_size, process_index, process_count)
    for batch in range(num_eval_batches(len(tokens), seq_len, global_batch_size)):
        first_window = batch * global_batch_size + first_row
        parts = [_eval_row(tokens, seq_len, first_window + row, pad_id) for row in range(rows)]
        inputs, targets, weights = (np.stack(column) for column in zip(*parts))
        yield {"inputs": inputs, "targets": targets, "weights": weights}

