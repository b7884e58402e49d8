"""Causal-LM batches from a flat token stream: deterministic, split across hosts, resumable.

Train example i is the window tokens[i*L : i*L + L + 1] (inputs = w[:-1], targets = w[1:]).
The global order of examples depends only on (seed, epoch): grain shuffles the windows afresh in
every epoch and repeats forever. Global batch b is examples [b*G, (b+1)*G) of that order, and
host h of n reads only its rows [h*G/n, (h+1)*G/n), so the same global batches come out
whatever the number of hosts. The host split, iterator state and eval padding are shared with
the other loaders (`example_loader`).

Segmented packing (`eos_id` given): each row also gets segment_ids [L], a new segment starting at
every EOS in the inputs, so the EOS that separates two documents opens the next one (as
`jaxlm generate` frames a prompt: EOS + text). The model keeps attention inside a segment and
restarts positions at each; targets and weights are the same as without it.
"""

import math
from collections.abc import Iterator
from typing import Optional

import grain
import numpy as np

from jaxlm.data import example_loader
from jaxlm.data.example_loader import Batch, TrainIterator, host_rows
from jaxlm.errors import UserError

__all__ = ["Batch", "TrainIterator", "eval_batches", "host_rows", "make_train_iterator",
           "num_eval_batches", "num_eval_windows", "num_train_windows", "segment_ids"]


def num_train_windows(num_tokens: int, seq_len: int) -> int:
    return max(num_tokens - 1, 0) // seq_len


def segment_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """[..., L] int32: the count of EOS tokens at or before each input position, so a new segment
    starts at every EOS (ids only need to differ between segments of one row)."""
    return np.cumsum(inputs == eos_id, axis=-1, dtype=np.int32)


def _with_segments(batch: Batch, eos_id: Optional[int]) -> Batch:
    if eos_id is not None:
        batch["segment_ids"] = segment_ids(batch["inputs"], eos_id)
    return batch


def _train_rows(tokens: np.ndarray, seq_len: int, window_ids: np.ndarray, eos_id: Optional[int]) -> Batch:
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in window_ids.tolist()])
    windows = windows.astype(np.int32)
    return _with_segments({
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "weights": np.ones((len(window_ids), seq_len), np.float32),
    }, eos_id)


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, prefetch: int = 2, data_id: str = "",
                        eos_id: Optional[int] = None) -> TrainIterator:
    """An infinite iterator over this host's rows of the global train batches.

    `tokens` is the train token stream (a memmap; only this host's windows are read).
    `data_id` identifies the stream in the iterator state (e.g. the token cache file).
    `eos_id`: segmented packing, batches also hold segment_ids (None: concatenated, no ids).
    """
    first_row, rows = host_rows(global_batch_size, process_index, process_count)
    windows = num_train_windows(len(tokens), seq_len)
    if windows == 0:
        raise UserError(
            f"data: the train split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1};"
            " use more training text or a smaller seq_len"
        )
    order = grain.MapDataset.range(windows).shuffle(seed=example_loader.shuffle_seed(seed)).repeat()
    host = example_loader.HostRowsMapDataset(
        order, global_batch_size=global_batch_size, first_row=first_row, rows=rows
    )
    batches = host.batch(rows, drop_remainder=True, batch_fn=np.asarray)
    batches = batches.map(lambda window_ids: _train_rows(tokens, seq_len, window_ids, eos_id))
    # Threads prefetch whole batches; grain hands them out in order, so output stays deterministic.
    read_options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    layout = {
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "num_windows": windows,
        "data_id": data_id,
    }
    if eos_id is not None:  # Only then: concat runs keep the iterator state they always had.
        layout["packing"] = "segmented"
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


def eval_batches(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, pad_id: int,
                 process_index: int = 0, process_count: int = 1, eos_id: Optional[int] = None) -> Iterator[Batch]:
    """This host's rows of the eval batches, covering every eval target exactly once.

    Windows run over the stream in order; the last partial window is padded (weight 0), and the
    window count is padded to a multiple of the global batch with all-zero-weight rows.
    `eos_id`: segmented packing, as in make_train_iterator (the padding after the last real token
    needs no mask of its own: causal attention never looks ahead to it).
    """

    def read_rows(window_ids: np.ndarray) -> Batch:
        parts = [_eval_row(tokens, seq_len, int(window), pad_id) for window in window_ids]
        inputs, targets, weights = (np.stack(column) for column in zip(*parts))
        return _with_segments({"inputs": inputs, "targets": targets, "weights": weights}, eos_id)

    return example_loader.eval_batches(
        num_eval_windows(len(tokens), seq_len), read_rows, global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count)
