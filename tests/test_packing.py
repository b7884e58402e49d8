"""Segmented packing (data.packing=segmented): attention stays inside each packed document and
positions restart at each, from segment ids the loader computes at every EOS; concat (the
default) is left exactly as it was."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runner import losses, run_cli
from conftest import FAST_COMPILE, tiny_config, tiny_llama_config
from jaxlm import config as config_lib
from jaxlm import config_checks
from jaxlm.data import lm_loader
from jaxlm.errors import UserError
from jaxlm.models import Model
from jaxlm.models.transformer import attention_mask, segment_positions
from jaxlm.tasks import get_task

EOS = 0
DOC_A = [5, 6, 7, 8]
DOC_B = [9, 10, 11, 12, 13, 14, 15]
WINDOW = np.array([DOC_A + [EOS] + DOC_B], np.int32)  # [docA, EOS, docB]: 12 tokens.
B_START = len(DOC_A)  # docB's segment opens with the EOS before it.
MODELS = {"learned": tiny_config(), "rope_gqa": tiny_llama_config()}


@functools.lru_cache(maxsize=None)
def model_and_forward(name: str):
    model = Model(MODELS[name])
    params = model.init(jax.random.key(0), jnp.asarray(WINDOW))["params"]
    forward = jax.jit(lambda tokens, segment_ids: model.apply({"params": params}, tokens, segment_ids=segment_ids),
                      compiler_options=FAST_COMPILE)
    concat = jax.jit(lambda tokens: model.apply({"params": params}, tokens), compiler_options=FAST_COMPILE)
    return forward, concat


def segmented_logits(name: str, tokens: np.ndarray) -> np.ndarray:
    forward, _ = model_and_forward(name)
    return np.asarray(forward(tokens, lm_loader.segment_ids(tokens, EOS)))


def concat_logits(name: str, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model_and_forward(name)[1](tokens))


# -- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_attention_does_not_cross_a_document_boundary(name):
    other_a, other_b = WINDOW.copy(), WINDOW.copy()
    other_a[0, :B_START] = [20, 21, 22, 23]
    other_b[0, B_START + 1:] = [30, 31, 32, 33, 34, 35, 36]
    base = segmented_logits(name, WINDOW)
    np.testing.assert_allclose(segmented_logits(name, other_a)[0, B_START:], base[0, B_START:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(segmented_logits(name, other_b)[0, :B_START], base[0, :B_START], atol=1e-6, rtol=0)
    # Under concat docB attends to docA, so the same change moves docB's logits: the check can fail.
    moved = np.abs(concat_logits(name, other_a)[0, B_START:] - concat_logits(name, WINDOW)[0, B_START:]).max()
    assert moved > 1e-3, moved


@pytest.mark.parametrize("name", MODELS)
def test_positions_restart_at_each_document(name):
    """docB packed after docA gives the logits of EOS + docB alone at the start of a padded window."""
    alone = np.full_like(WINDOW, 3)
    alone[0, :len(DOC_B) + 1] = WINDOW[0, B_START:]
    want = concat_logits(name, alone)[0, :len(DOC_B) + 1]
    np.testing.assert_allclose(segmented_logits(name, WINDOW)[0, B_START:], want, atol=1e-5, rtol=0)


def test_segment_positions_and_masks_compose():
    segments = jnp.array([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
    padding = jnp.array([[True] * 6, [True, True, True, True, False, False]])
    mask = np.asarray(attention_mask(padding, 6, True, segments))[:, 0]
    causal = np.tril(np.ones((6, 6), bool))
    same = np.asarray(segments)[:, :, None] == np.asarray(segments)[:, None, :]
    np.testing.assert_array_equal(mask, causal & same & np.asarray(padding)[:, None, :])
    assert mask[0, 2, 1] == 0 and mask[0, 4, 2] == 1 and mask[1, 5, 4] == 0  # boundary, segment, padding
    assert attention_mask(None, 6, True, None) is None  # concat: plain causal, as before


# -- the loader ----------------------------------------------------------------------------------
# seq_len 4: window i's inputs are STREAM[4i : 4i+4]; EOS (0) opens a segment, even a lone one.
STREAM = np.array([0, 5, 6, 0, 7, 8, 9, 0, 0, 0, 4, 5, 6, 0, 2, 9, 1], np.uint16)
EXPECTED_SEGMENTS = {0: [1, 1, 1, 2], 1: [0, 0, 0, 1], 2: [1, 2, 2, 2], 3: [0, 1, 1, 1]}


def train_batch(eos_id):
    iterator = lm_loader.make_train_iterator(STREAM, seq_len=4, global_batch_size=4, seed=3, eos_id=eos_id)
    return iterator, next(iterator)


def test_loader_gives_segment_ids_per_window():
    _, segmented = train_batch(EOS)
    _, concat = train_batch(None)
    assert sorted(concat) == ["inputs", "targets", "weights"]
    for key in concat:  # Same windows, same order, targets and weights unchanged.
        np.testing.assert_array_equal(segmented[key], concat[key])
    assert segmented["segment_ids"].dtype == np.int32
    windows = {tuple(STREAM[4 * i:4 * i + 4].tolist()): i for i in EXPECTED_SEGMENTS}
    seen = []
    for inputs, ids in zip(segmented["inputs"], segmented["segment_ids"]):
        window = windows[tuple(inputs.tolist())]
        seen.append(window)
        np.testing.assert_array_equal(ids, EXPECTED_SEGMENTS[window])
    assert sorted(seen) == [0, 1, 2, 3]


def test_eval_batches_carry_segment_ids():
    batches = list(lm_loader.eval_batches(STREAM, seq_len=4, global_batch_size=4, pad_id=1, eos_id=EOS))
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0]["segment_ids"], [EXPECTED_SEGMENTS[i] for i in range(4)])
    plain = next(lm_loader.eval_batches(STREAM, seq_len=4, global_batch_size=4, pad_id=1))
    assert "segment_ids" not in plain


def test_resume_refuses_a_switch_of_packing():
    segmented, _ = train_batch(EOS)
    concat, _ = train_batch(None)
    assert "packing" not in concat.get_state()["layout"]  # concat's saved state is as before
    with pytest.raises(UserError, match="packing"):
        concat.set_state(segmented.get_state())


# -- the config and the task ---------------------------------------------------------------------
def test_batch_spec_has_segment_ids_only_when_segmented():
    task = get_task("causal_lm")
    config = config_lib.base_config()
    config.global_batch_size, config.seq_len = 4, 8
    assert sorted(task.batch_spec(config)) == ["inputs", "targets", "weights"]
    assert sorted(task.init_inputs(config)) == ["tokens"]
    config.data.packing = "segmented"
    spec = task.batch_spec(config)
    assert sorted(spec) == ["inputs", "segment_ids", "targets", "weights"]
    assert spec["segment_ids"].shape == (4, 8) and spec["segment_ids"].dtype == jnp.int32
    assert sorted(task.init_inputs(config)) == ["segment_ids", "tokens"]


@pytest.mark.parametrize("task,packing,message", [
    ("masked_lm", "segmented", "data.packing=segmented"),
    ("classification", "segmented", "data.packing=segmented"),
    ("causal_lm", "documents", "data.packing='documents'"),
])
def test_packing_is_validated(task, packing, message):
    config = config_lib.base_config()
    config.task, config.data.packing = task, packing
    with pytest.raises(UserError, match=message):
        config_checks.validate(config)


# -- one short run -------------------------------------------------------------------------------
def test_segmented_training_changes_the_losses_and_concat_is_the_default(tmp_path):
    data_dir = str(tmp_path / "data")

    def train(name, *flags):
        workdir = str(tmp_path / name)
        run_cli(["train", "--config=configs/tiny_shakespeare.py:runlocal", f"--workdir={workdir}",
                 f"--config.data.data_dir={data_dir}", "--config.steps=6", "--config.log_every=1",
                 "--config.eval_every=0", "--config.eval_batches=1", *flags])
        return workdir

    # concat is the default: the recipe's run without the flag is the concat run.
    assert config_lib.load_config("configs/tiny_shakespeare.py:runlocal").data.packing == "concat"
    concat = train("concat")
    segmented = train("segmented", "--config.data.packing=segmented")
    with open(os.path.join(concat, "config.json")) as f:
        assert json.load(f)["data"]["packing"] == "concat"
    got, want = losses(segmented), losses(concat)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert all(np.isfinite(got[s]) and got[s] != want[s] for s in got), (got, want)
    with open(os.path.join(segmented, "config.json")) as f:
        assert json.load(f)["data"]["packing"] == "segmented"
