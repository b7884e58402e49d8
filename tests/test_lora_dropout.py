"""Adapter dropout (peft.dropout > 0, jaxlm/models/adapter_branch.py and AdaptedParams.train_variables).

A layer given factors in the "lora" collection adds (dropout(x)·left)·right: for an attention
projection with a 1- and a 2-axis input and for an MLP Dense, the output equals a numpy reference
built from the dropout mask the layer applied (recovered from its captured output), 1e-5, and
without dropout it equals the layer with the merged kernel. On the tiny BERT classifier with
random adapters the eval model given the factors equals the merged model (1e-5) and the train
model depends on the dropout rng. Short LoRA runs with dropout 0.5 (scanned; unscanned with remat
and bf16 matmuls; 8 devices) train: the loss falls, every adapter array has a nonzero Adam first
moment (a gradient reached it, A only through the branch), the first step's loss is the dropout-0
run's bitwise (B = 0) and later ones differ, and the mesh gives the 1-device losses (1e-4).
AdaLoRA with dropout keeps its top-b masks (numpy scores), zeroes the pruned λ, reaches its target
rank, and its sensitivity EMAs show gradients on P, λ and Q. Dropout 0 keeps the merged step (the
plain train model, {"params": merge} bitwise). The one-line UserError for a head target:
tests/test_lora.py; the PEFT export's lora_dropout: tests/test_lora_export.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_lora
from conftest import FAST_COMPILE, tiny_bert_config
from jaxlm import sharding
from jaxlm.compat import mesh_context
from jaxlm.models.adapter_branch import COLLECTION, BranchDense
from jaxlm.models.transformer import Projection
from jaxlm.peft import adalora
from jaxlm.peft.targets import flatten
from jaxlm.trainer import CompiledSteps, Trainer
from test_adalora import ada_config, numpy_triplet_scores
from test_lora import make_mesh, tiny_config

source = test_lora.source  # LoRA's module fixture, built again for this module
RATE, R = 0.5, 3
CFG = tiny_bert_config()
LAYERS = {  # name: (module, x shape, left shape, right shape, x·W, x·left, h·right, left·right) as einsums
    "query": (Projection(CFG, "btd,dhk->bthk", (32, 4, 8), ("embed", "heads", "head_dim"), (4, 8), RATE),
              (2, 5, 32), (32, R), (R, 4, 8), "btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk", "dr,rhk->dhk"),
    "out": (Projection(CFG, "bthk,hkd->btd", (4, 8, 32), ("heads", "head_dim", "embed"), (32,), RATE),
            (2, 5, 4, 8), (4, 8, R), (R, 32), "bthk,hkd->btd", "bthk,hkr->btr", "btr,rd->btd", "hkr,rd->hkd"),
    "mlp": (BranchDense(64, cfg=CFG, lora_dropout=RATE), (2, 5, 32), (32, R), (R, 64), "bti,io->bto", "bti,ir->btr",
            "btr,ro->bto", "ir,ro->io"),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_layer_adds_the_dropped_out_branch_as_numpy_computes_it(name):
    module, x_shape, left_shape, right_shape, base_eq, left_eq, right_eq, merge_eq = LAYERS[name]
    rng = np.random.default_rng(0)
    x, left, right = (rng.normal(0, std, s).astype(np.float32) for std, s in ((1, x_shape), (0.2, left_shape),
                                                                              (0.2, right_shape)))
    params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32),
                          nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"]))
    factors = {COLLECTION: {"left": left, "right": right}}
    apply = jax.jit(lambda variables, x, module=module: module.apply(
        variables, x, rngs={"dropout": jax.random.key(1)}, capture_intermediates=lambda m, _: isinstance(m, nn.Dropout),
        mutable=["intermediates"]), compiler_options=FAST_COMPILE)
    y, state = apply({"params": params, **factors}, x)
    dropped = np.asarray(state["intermediates"]["lora_dropout"]["__call__"][0], np.float64)
    kept = dropped != 0
    assert 0.3 < kept.mean() < 0.7  # rate 0.5 on every element (x has no zeros)
    np.testing.assert_allclose(dropped[kept], x[kept] / (1 - RATE), rtol=1e-6)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    plain = np.einsum(base_eq, f64(x), f64(params["kernel"])) + f64(params["bias"])
    reference = plain + np.einsum(right_eq, np.einsum(left_eq, dropped, f64(left)), f64(right))
    assert np.abs(reference - plain).max() > 0.1
    np.testing.assert_allclose(np.asarray(y), reference, atol=1e-5, rtol=0)
    # Without dropout the branch is the merged kernel's difference: the layer with W + left·right.
    no_drop = jax.jit(module.clone(lora_dropout=0.0).apply, compiler_options=FAST_COMPILE)
    delta = np.einsum(merge_eq, left, right)
    np.testing.assert_allclose(np.asarray(no_drop({"params": params, **factors}, x)),
                               np.asarray(no_drop({"params": dict(params, kernel=params["kernel"] + delta)}, x)),
                               atol=1e-5, rtol=0)


def unscanned(body: dict) -> dict:
    out = {k: v for k, v in body.items() if k != "layers"}
    for i in range(2):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], body["layers"])
    return out


def dropout_config(scan=True, dropout=RATE, mesh=(1, 1, 1), **model):
    c = tiny_config(mesh)
    c.peft.dropout = dropout
    c.peft.targets = "attn/(query|value)/kernel$|mlp/wi/kernel$"  # projections and a Dense
    c.model.update(scan_layers=scan, **model)
    return c


def train(config, source, devices=1, steps=4):
    loaded, batches = source
    if not config.model.scan_layers:
        loaded = {"body": unscanned(loaded["body"])}
    trainer = Trainer(config, make_mesh(config, jax.devices()[:devices]))
    state = trainer.init_state(0, pretrained=loaded)
    compiled, losses = CompiledSteps(trainer), []
    for step in range(steps):
        state, metrics = compiled.train(state, sharding.to_global(batches[step % 2], trainer.mesh))
        losses.append(float(metrics.compute()["loss"]))
    return trainer, state, losses


@pytest.fixture(scope="module")
def runs(source):
    """LoRA runs: dropout 0, dropout 0.5 scanned, and unscanned with remat and bf16 matmuls."""
    return {"none": train(dropout_config(dropout=0.0), source), "scanned": train(dropout_config(), source),
            "unscanned": train(dropout_config(scan=False, remat_policy="full", matmul_dtype="bfloat16"), source)}


def first_moments(opt_state) -> dict:
    """Adam's first moment of every adapter array: nonzero only where some step had a gradient."""
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(jax.device_get(opt_state))[0]
            if ".mu" in jax.tree_util.keystr(path) and "'adapters'" in jax.tree_util.keystr(path)}


@pytest.mark.parametrize("kind", ["scanned", "unscanned"])
def test_runs_with_dropout_train_every_adapter_and_differ_from_dropout_0(runs, kind):
    trainer, state, losses = runs[kind]
    _, _, plain = runs["none"]
    assert trainer.train_model.lora_dropout == RATE and runs["none"][0].train_model.lora_dropout == 0
    assert losses[3] < losses[0] and losses[2] < losses[0], losses
    if kind == "scanned":  # B = 0 at step 1: the branch adds exactly 0, as the merged delta does
        assert losses[0] == plain[0]
    assert all(a != b for a, b in zip(losses[1:], plain[1:])), (losses, plain)
    # A gets a gradient only through the branch (B != 0 after step 1), so the branch ran in every layer.
    moments = first_moments(state.opt_state)
    assert len(moments) == 2 * 3 * (2 if kind == "unscanned" else 1)
    for key, mu in moments.items():
        assert np.any(mu != 0), key


def random_adapters(state, seed=2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 0.05, p.shape), p.dtype), state.params)


def test_eval_with_the_factors_is_the_merged_model_and_train_depends_on_the_rng(runs, source):
    trainer, state, _ = runs["scanned"]
    trained, batch = random_adapters(state), sharding.to_global(source[1][0], trainer.mesh)
    inputs = trainer.task.model_inputs(batch)

    def outputs(trained):
        variables = trainer.adapted.train_variables(trainer.frozen, trained)
        assert set(variables) == {"params", COLLECTION}
        merged = trainer.adapted.merge(trainer.frozen, trained)
        with nn.logical_axis_rules(trainer.rules):
            def train(seed):  # the train model: adapter dropout on the "dropout" rng
                return trainer.train_model.apply(variables, **inputs, rngs={"dropout": jax.random.key(seed)})
            unmerged = trainer.eval_model.apply(variables, **inputs)  # the factors beside, no dropout
            return unmerged, trainer.eval_model.apply({"params": merged}, **inputs), train(0), train(0), train(1)

    with mesh_context(trainer.mesh):
        unmerged, merged, train0, again, train1 = jax.device_get(
            jax.jit(outputs, compiler_options=FAST_COMPILE)(trained))
    assert np.abs(merged).max() > 1e-2
    np.testing.assert_allclose(unmerged, merged, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(train0, again)
    assert np.abs(train0 - train1).max() > 1e-4 and np.abs(train0 - merged).max() > 1e-4


def test_eight_devices_give_the_one_device_losses_with_dropout(runs, source):
    _, _, want = runs["scanned"]
    _, _, got = train(dropout_config(mesh=(2, 2, 2)), source, devices=8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)


def test_dropout_0_keeps_the_merged_step(runs):
    trainer, state, _ = runs["none"]
    variables = trainer.adapted.train_variables(trainer.frozen, state.params)
    assert set(variables) == {"params"}
    with mesh_context(trainer.mesh):
        merged = jax.jit(trainer.adapted.merge)(trainer.frozen, state.params)
    for path, value in flatten(jax.device_get(merged)).items():
        np.testing.assert_array_equal(flatten(jax.device_get(variables["params"]))[path], value)


def test_adalora_with_dropout_keeps_its_masks_and_reaches_the_target_rank(source):
    loaded, batches = source
    config = ada_config(dropout=RATE, targets="attn/(query|out)/kernel$")
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    state, compiled = trainer.init_state(0, pretrained=loaded), CompiledSteps(trainer)
    targets, method = trainer.adapted.targets, trainer.adapted.method
    table = adalora.budget_table(*method.budgets(targets), 1, 2, 2, 8)
    pruned = 0
    for t in range(1, config.steps + 1):
        state, _ = compiled.train(state, sharding.to_global(batches[(t - 1) % 2], trainer.mesh))
        host = jax.device_get(state)
        mask = np.concatenate([np.asarray(flatten(host.opt_state.mask["adapters"])[tg.path + ("lora_E",)]).ravel()
                               for tg in targets])
        lam = np.concatenate([np.asarray(flatten(host.params["adapters"])[tg.path + ("lora_E",)]).ravel()
                              for tg in targets])
        if table[t, 1] == adalora.PRUNE:
            pruned += 1
            want = np.zeros_like(mask)
            want[np.argsort(-numpy_triplet_scores(host.opt_state, targets), kind="stable")[:table[t, 0]]] = 1
            np.testing.assert_array_equal(mask, want, err_msg=f"step {t}")
        if table[t, 1] != adalora.KEEP:
            assert mask.sum() == table[t, 0] and np.all(lam[mask == 0] == 0), t
    assert pruned >= 3 and sum(adalora.ranks(state.opt_state, targets).values()) == 2 * 4
    # The sensitivity EMAs, |θ·∇θ|: P, λ and Q all got gradients through the unmerged branch.
    ipt = flatten(jax.device_get(state.opt_state.ipt["adapters"]))
    assert len(ipt) == 3 * 2 and all(np.any(v > 0) for v in ipt.values()), {k[-3:]: v.max() for k, v in ipt.items()}
