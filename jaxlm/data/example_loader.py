"""Batches from any random-access example source: deterministic, split across hosts, resumable.

The causal-LM loader (`lm_loader`) and the fixed-row loaders (classification, masked LM) share
this design:

- The global order of examples depends only on (seed, epoch). Global batch b is a fixed set of
  example ids; host h of n feeds rows [h*G/n, (h+1)*G/n) of it, so the same global batches come
  out whatever the number of hosts.
- The train iterator is a grain DatasetIterator: its state (the batch position plus the data
  layout) goes into orbax checkpoints through grain's handler, and resuming continues exactly.
- Eval batches cover every example once, in order; the last global batch is padded with rows
  the reader gives weight 0, so metrics are exact whatever the batch size.

Optional length bucketing: each global batch gets one sequence length (the smallest bucket that
fits its longest example), so short examples are not padded to the maximum length.
"""

import functools
import gc
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import grain
import numpy as np

from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]
# Examples per sorting pool, in global batches: sorting within a pool groups similar lengths
# while the pools (and then the batches) stay shuffled.
BUCKET_POOL_BATCHES = 64


def host_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """(first row, number of rows) of each global batch that this host feeds to its devices."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the number of"
            f" hosts ({process_count}); change global_batch_size"
        )
    rows = global_batch_size // process_count
    return process_index * rows, rows


def shuffle_seed(seed: int) -> int:
    # grain seeds epoch e with (seed + e), so runs with seeds s and s+1 would share shifted
    # epochs; hashing the seed first makes different seeds unrelated.
    return int(np.random.SeedSequence(seed % 2**64).generate_state(1)[0])


class HostRowsMapDataset(grain.MapDataset):
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
        return f"HostRowsMapDataset(rows [{self._first_row}, {last}) of {self._global_batch_size})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._rows)
        return self._parent[batch * self._global_batch_size + self._first_row + row]


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

    def tokens_by_source(self) -> dict[str, int]:
        """Input tokens each source supplied to this host so far ({}: the loader does not count)."""
        return {}

    def close(self) -> None:
        """Stops prefetch threads and worker processes (at the end of training)."""
        if not self._parents:
            return
        self._parent.close()
        # Collect the pipeline now: grain iterators left for interpreter shutdown print
        # "Exception ignored in __del__" tracebacks once their modules are torn down.
        self._parents = ()
        gc.collect()

    def __str__(self) -> str:
        return f"TrainIterator({self._layout})"


def bucket_lengths(max_len: int, num_buckets: int, multiple: int = 8) -> tuple[int, ...]:
    """max_len, max_len/2, max_len/4 ... (num_buckets of them, multiples of `multiple`)."""
    lengths = {max_len}
    for k in range(1, max(num_buckets, 1)):
        lengths.add(max(multiple, int(math.ceil(max_len / 2**k / multiple)) * multiple))
    return tuple(sorted(l for l in lengths if l <= max_len))


class GlobalBatchPlan(grain.MapDataset):
    """Element b: global batch b as {"batch": b, "ids": example ids [G], "length": int}, forever.

    Each epoch is a fresh permutation fixed by (seed, epoch); the remainder of an epoch that
    does not fill a global batch is dropped. With `lengths` and more than one bucket, examples
    are grouped by bucket inside pools of BUCKET_POOL_BATCHES batches and the batches shuffled.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int,
                 lengths: Optional[np.ndarray] = None, buckets: Sequence[int] = ()):
        super().__init__()
        if num_examples < global_batch_size:
            raise UserError(f"data: the train split has {num_examples} examples, fewer than one global batch "
                            f"(global_batch_size={global_batch_size}); use more data or a smaller batch")
        self._num_examples = num_examples
        self._global_batch_size = global_batch_size
        self._seed = shuffle_seed(seed)
        self._buckets = np.asarray(sorted(buckets), np.int64)
        self._bucket_of = None
        if lengths is not None and len(self._buckets) > 1:
            self._bucket_of = np.minimum(np.searchsorted(self._buckets, lengths), len(self._buckets) - 1)
        self.batches_per_epoch = num_examples // global_batch_size

    def __len__(self) -> int:
        return sys.maxsize  # Infinite, like grain's repeat().

    def __str__(self) -> str:
        return (f"GlobalBatchPlan({self._num_examples} examples, G={self._global_batch_size}, "
                f"buckets={self._buckets.tolist()})")

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self._seed, epoch])
        order = rng.permutation(self._num_examples)
        g = self._global_batch_size
        used = self.batches_per_epoch * g
        if self._bucket_of is None:
            ids = order[:used].reshape(-1, g)
            length = int(self._buckets[-1]) if len(self._buckets) else 0
            return ids, np.full(len(ids), length, np.int64)
        pool = BUCKET_POOL_BATCHES * g
        parts = []
        for start in range(0, used, pool):
            chunk = order[start:min(start + pool, used)]
            parts.append(chunk[np.argsort(self._bucket_of[chunk], kind="stable")])
        ids = np.concatenate(parts).reshape(-1, g)
        ids = ids[rng.permutation(len(ids))]
        lengths = self._buckets[self._bucket_of[ids].max(axis=1)]
        return ids, lengths

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, batch = divmod(index, self.batches_per_epoch)
        ids, lengths = self._epoch(epoch)
        return {"batch": index, "ids": ids[batch], "length": int(lengths[batch])}


RowReader = Callable[[np.ndarray, int, int, int], Batch]  # (ids, length, batch index, first row)


def make_train_iterator(plan: GlobalBatchPlan, read_rows: RowReader, *, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                        layout: Optional[dict[str, Any]] = None) -> TrainIterator:
    """This host's rows of each global batch of `plan`, read by `read_rows(ids, length, b, first_row)`.

    `layout` describes the data (sizes, seed, dataset id); a checkpoint written for another
    layout is refused on restore.
    """
    first_row, rows = host_rows(global_batch_size, process_index, process_count)

    def read(element):
        ids = element["ids"][first_row:first_row + rows]
        return read_rows(ids, element["length"], element["batch"], first_row)

    batches = plan.map(read)
    # Threads prefetch whole batches; grain hands them out in order, so output stays deterministic.
    read_options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    layout = {"global_batch_size": global_batch_size, **(layout or {})}
    return TrainIterator(iter(batches.to_iter_dataset(read_options)), layout)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return math.ceil(num_examples / global_batch_size)


def eval_batches(num_examples: int, read_rows: Callable[[np.ndarray], Batch], *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """This host's rows of the eval batches, covering examples 0..N-1 once, in order.

    `read_rows(ids)` must give ids >= num_examples (the rows padding the last global batch)
    weight 0.
    """
    first_row, rows = host_rows(global_batch_size, process_index, process_count)
    for batch in range(num_eval_batches(num_examples, global_batch_size)):
        yield read_rows(batch * global_batch_size + first_row + np.arange(rows))
