"""The grain LM loader: windows, per-epoch shuffles, host splitting, exact resume, eval coverage."""

import json
import math
import threading

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxlm.data import lm_loader
from jaxlm.errors import UserError

SEQ_LEN = 10
TOKENS = np.arange(1000, dtype=np.uint16)  # Token k sits at position k: windows are readable.
WINDOWS = (len(TOKENS) - 1) // SEQ_LEN  # 99: an epoch ends inside batch 12 when G = 8.


class RecordingTokens:
    """A token array that remembers which slices were read."""

    def __init__(self, tokens):
        self._tokens = tokens
        self._lock = threading.Lock()
        self.reads = []

    def __len__(self):
        return len(self._tokens)

    def __getitem__(self, index):
        with self._lock:
            self.reads.append((index.start, index.stop))
        return self._tokens[index]


def train_iter(tokens=TOKENS, **overrides):
    kwargs = dict(seq_len=SEQ_LEN, global_batch_size=8, seed=3, prefetch=2)
    kwargs.update(overrides)
    return lm_loader.make_train_iterator(tokens, **kwargs)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def window_ids(batch):
    return (batch["inputs"][:, 0] // SEQ_LEN).tolist()


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        for key in e:
            np.testing.assert_array_equal(a[key], e[key])


def test_windows_are_packed_and_shifted_by_one():
    batch = next(train_iter())
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, SEQ_LEN)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # Next token, everywhere.
    starts = batch["inputs"][:, 0]
    assert (starts % SEQ_LEN == 0).all()  # Non-overlapping windows at multiples of L.
    np.testing.assert_array_equal(batch["inputs"], starts[:, None] + np.arange(SEQ_LEN))
    assert (batch["weights"] == 1).all()


def test_each_epoch_is_a_fresh_permutation_fixed_by_the_seed():
    order = sum((window_ids(b) for b in take(train_iter(), 40)), [])  # 320 examples, > 3 epochs.
    epochs = [order[e * WINDOWS : (e + 1) * WINDOWS] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(WINDOWS))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(WINDOWS))
    assert order == sum((window_ids(b) for b in take(train_iter(), 40)), [])
    assert order != sum((window_ids(b) for b in take(train_iter(seed=4), 40)), [])


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_rows_concatenate_to_the_single_host_batches(process_count):
    single = take(train_iter(), 30)  # Crosses two epoch boundaries.
    hosts = [train_iter(process_index=h, process_count=process_count) for h in range(process_count)]
    per_host = [take(host, 30) for host in hosts]
    for step, expected in enumerate(single):
        joined = {key: np.concatenate([rows[step][key] for rows in per_host]) for key in expected}
        assert_same_batches([joined], [expected])
    assert per_host[0][0]["inputs"].shape == (8 // process_count, SEQ_LEN)


def test_hosts_read_only_their_own_windows():
    recorders = [RecordingTokens(TOKENS) for _ in range(2)]
    # No prefetch, so that what was read is exactly what was handed out.
    iterators = [train_iter(r, process_index=h, process_count=2, prefetch=0) for h, r in enumerate(recorders)]
    batches = [take(iterator, 5) for iterator in iterators]
    for recorder, host_batches in zip(recorders, batches):
        fed = sorted(w for b in host_batches for w in window_ids(b))
        read = sorted(start // SEQ_LEN for start, _ in recorder.reads)
        assert read == fed
        assert all(stop - start == SEQ_LEN + 1 for start, stop in recorder.reads)
    first_batch_rows = [set(window_ids(b[0])) for b in batches]
    assert not first_batch_rows[0] & first_batch_rows[1]


def test_batch_size_must_split_evenly_across_hosts():
    with pytest.raises(UserError, match=r"global_batch_size=6 must be a positive multiple of .* hosts \(4\)"):
        train_iter(global_batch_size=6, process_index=0, process_count=4)


@pytest.mark.parametrize("consumed", [0, 5, 11, 13])  # 11 and 13 straddle the first epoch's end.
def test_resume_continues_exactly(consumed):
    uninterrupted = take(train_iter(), 30)
    interrupted = train_iter()
    take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.get_state()))  # Must survive JSON.
    resumed = train_iter()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 30 - consumed), uninterrupted[consumed:])


def test_resume_refuses_a_state_for_other_data():
    iterator = train_iter()
    take(iterator, 3)
    state = iterator.get_state()
    with pytest.raises(UserError, match=r"seq_len: 10 -> 12.*original data and batch settings"):
        train_iter(seq_len=12).set_state(state)
    with pytest.raises(UserError, match=r"global_batch_size: 8 -> 16"):
        train_iter(global_batch_size=16).set_state(state)


def test_orbax_saves_and_restores_the_iterator(tmp_path):
    iterator = train_iter()
    take(iterator, 7)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    assert (tmp_path / "ckpt" / "7" / "data" / "process_0-of-1.json").exists()
    expected = take(iterator, 5)

    restored = train_iter()
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 5), expected)
    manager.close()


def test_too_few_tokens_for_one_window():
    with pytest.raises(UserError, match="fewer than seq_len \\+ 1 = 11"):
        train_iter(tokens=np.arange(10, dtype=np.uint16))


@pytest.mark.parametrize(
    "num_tokens, seq_len, global_batch, process_count",
    [(101, 10, 4, 1), (100, 10, 4, 2), (57, 8, 3, 1), (57, 8, 6, 3), (12, 16, 2, 2), (2, 4, 4, 4)],
)
def test_eval_covers_every_target_once(num_tokens, seq_len, global_batch, process_count):
    tokens = (np.arange(num_tokens) * 7 % 50 + 2).astype(np.uint16)  # Never the pad id (1).
    hosts = [
        list(lm_loader.eval_batches(tokens, seq_len=seq_len, global_batch_size=global_batch, pad_id=1,
                                    process_index=h, process_count=process_count))
        for h in range(process_count)
    ]
    expected_batches = math.ceil(math.ceil((num_tokens - 1) / seq_len) / global_batch)
    assert lm_loader.num_eval_batches(num_tokens, seq_len, global_batch) == expected_batches
    assert all(len(batches) == expected_batches for batches in hosts)
    batches = [
        {key: np.concatenate([host[b][key] for host in hosts]) for key in hosts[0][b]}
        for b in range(expected_batches)
    ]
    for batch in batches:
        assert batch["inputs"].shape == (global_batch, seq_len) and batch["inputs"].dtype == np.int32
    inputs = np.concatenate([b["inputs"].ravel() for b in batches])
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    weights = np.concatenate([b["weights"].ravel() for b in batches])
    counted = weights == 1
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert counted.sum() == num_tokens - 1
    np.testing.assert_array_equal(targets[counted], tokens[1:])  # Each target once, in order.
    np.testing.assert_array_equal(inputs[counted], tokens[:-1])
    assert (inputs[~counted] == 1).all() and (targets[~counted] == 1).all()
    assert counted[: num_tokens - 1].all()  # Padding only after the last real target.
