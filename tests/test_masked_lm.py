"""Masked LM data: BERT masking statistics (80/10/10 of the 15% selected, specials never
selected, deterministic per stream), and [CLS] window [SEP] batches from a real WordPiece
tokenizer that agree across hosts and give the same eval masks every time."""

import numpy as np
import pytest

from conftest import minilm_dir
from jaxlm.data import masking
from sample_data import GOOD


def test_masking_statistics_and_special_tokens():
    rng = np.random.default_rng(0)
    vocab, special = 1000, np.array([0, 1, 2, 3])  # pad, cls, sep, mask
    rows, length = 4000, 64
    tokens = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 1, 2  # [CLS] ... [SEP]
    tokens[::2, 40:] = 0  # Padding in half the rows.
    maskable = ~np.isin(tokens, special)
    random_ids = np.arange(4, vocab)
    out = [masking.mask_row(t, m, masking.row_rng(7, i), mask_id=3, random_ids=random_ids)
           for i, (t, m) in enumerate(zip(tokens, maskable))]
    inputs, targets, weights = (np.stack(x) for x in zip(*out))
    selected = weights > 0
    assert not selected[~maskable].any(), "special tokens and padding are never selected"
    assert (inputs[~selected] == tokens[~selected]).all(), "unselected tokens are untouched"
    assert (targets == tokens).all()
    assert selected.sum() / maskable.sum() == pytest.approx(0.15, abs=0.005)
    n = selected.sum()
    masked = (inputs == 3) & selected
    unchanged = (inputs == tokens) & selected
    replaced = selected & ~masked & ~unchanged
    assert masked.sum() / n == pytest.approx(0.8, abs=0.01)
    # A random replacement equals the original 1/996 of the time: counted as unchanged.
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.01)
    assert unchanged.sum() / n == pytest.approx(0.1, abs=0.01)
    assert np.isin(inputs[replaced], random_ids).all()
    # Deterministic per (seed, stream).
    again = masking.mask_row(tokens[5], maskable[5], masking.row_rng(7, 5), mask_id=3, random_ids=random_ids)
    np.testing.assert_array_equal(again[0], inputs[5])


def test_mlm_batches_with_a_bert_tokenizer(tmp_path):
    """[CLS] window [SEP] rows from the MiniLM WordPiece; specials never predicted; hosts agree."""
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.data.mlm_data import build_mlm_data  # pylint: disable=import-outside-toplevel
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"the {w} story number {i} was told again and again" for i, w in
                                enumerate(GOOD * 40)))
    config = config_lib.base_config()
    config.task, config.seq_len, config.global_batch_size = "masked_lm", 16, 8
    config.data.train_file, config.data.data_dir = str(text), str(tmp_path / "tfds")
    config.data.tokenizer = minilm_dir()
    data = build_mlm_data(config, str(tmp_path / "run"))
    tok = data.tokenizer
    batch = next(data.train_iter)
    assert batch["inputs"].shape == (8, 16)
    assert (batch["targets"][:, 0] == tok.cls_token_id).all()
    special = np.isin(batch["targets"], tok.all_special_ids)
    assert not (batch["weights"] > 0)[special].any()
    assert (batch["weights"] > 0).any()
    hosts = [build_mlm_data(config, str(tmp_path / "run"), h, 2).train_iter for h in range(2)]
    halves = [next(h) for h in hosts]
    for key in batch:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])
    evaluation = list(data.eval_batches())
    assert len(evaluation) == data.num_eval_batches
    np.testing.assert_array_equal(evaluation[0]["inputs"], list(data.eval_batches())[0]["inputs"])


def test_mlm_stream_resumes_at_the_exact_next_batch_and_old_runs_keep_the_token_cache(tmp_path):
    """A checkpointed position (JSON, as grain's handler saves it) gives the same next batches,
    masks included; data.loader=token_cache (runs from before streaming) still gives windows."""
    import json  # pylint: disable=import-outside-toplevel

    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.data.mlm_data import build_mlm_data  # pylint: disable=import-outside-toplevel
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"a {w} tale, number {i}, told {i % 7} times" for i, w in enumerate(GOOD * 30)))
    config = config_lib.base_config()
    config.task, config.seq_len, config.global_batch_size = "masked_lm", 16, 4
    config.data.train_file, config.data.data_dir = str(text), str(tmp_path / "tfds")
    config.data.tokenizer = minilm_dir()
    straight = build_mlm_data(config, str(tmp_path / "run")).train_iter
    want = [next(straight) for _ in range(7)]
    first = build_mlm_data(config, str(tmp_path / "run")).train_iter
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = build_mlm_data(config, str(tmp_path / "run")).train_iter
    resumed.set_state(state)
    for expected in want[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    for it in (straight, first, resumed):
        it.close()

    config.data.loader = "token_cache"
    cached = build_mlm_data(config, str(tmp_path / "run")).train_iter
    batch = next(cached)
    assert batch["inputs"].shape == (4, 16) and (batch["targets"][:, 0] == 101).all()  # [CLS] of MiniLM.
    assert not np.array_equal(batch["targets"], want[0]["targets"])  # Another order: windows shuffled globally.
