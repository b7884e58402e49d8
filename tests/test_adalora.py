"""AdaLoRA (jaxlm/peft/adalora.py).

The budget schedule equals the paper's cubic formula and peft's RankAllocator.budget_schedule step
by step for several (tinit, tfinal, deltaT, T); in a real compiled run every pruning step keeps
exactly the top-b triplets of a numpy score computed from the state's EMAs, the pruned λ are 0 and
the final total rank is the target; the orthogonality term equals numpy's; a fresh adapter
changes nothing (bitwise). Through the CLI on a tiny Hugging Face BERT: a 30-step run writes
adalora_ranks.json with the target total rank; the same run killed with SIGKILL after its first
checkpoint and rerun gives the uninterrupted run's train/loss at every step bitwise, and its ranks.
On the real MiniLM: a 12-step run's `export --adapters_only` is peft's AdaLoRA layout (its
rank_pattern = the run's final ranks, only the kept triplets saved) and loads with peft onto
transformers' AutoModelForSequenceClassification with jaxlm's logits (1e-4), the merged export too.
The recipe configs/minilm_sst2_adalora.py (and :runlocal) gives a valid budget schedule.
"""

import json
import os
import re
import shutil
import time
import types

import jax
import numpy as np
import pytest

from cli_runner import losses, saved_state, start_cli
from conftest import minilm_dir
from jaxlm import cli, pretrained
from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm.compat import mesh_context
from jaxlm.peft import adalora
from jaxlm.peft.targets import flatten
from jaxlm.sharded_model import ShardedModel
from jaxlm.trainer import Trainer
import test_lora
from test_lora import make_mesh, tiny_config, train_argv
from test_lora_export import hf_inputs, jaxlm_logits, torch_logits

source, tiny_hf = test_lora.source, test_lora.tiny_hf  # LoRA's module fixtures, built again for this module

SCHEDULES = [  # (tinit, tfinal, deltaT, T)
    (0, 0, 1, 10), (3, 2, 1, 20), (5, 10, 3, 100), (200, 300, 10, 1500), (1, 1, 2, 8)]


def cubic(t, b0, bt, tinit, tfinal, total):
    """Zhang et al. 2023, eq. for b(t), with peft's integer truncation."""
    if t <= tinit:
        return b0
    if t > total - tfinal:
        return bt
    return int(bt + (b0 - bt) * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3)


@pytest.mark.parametrize("tinit,tfinal,delta_t,total", SCHEDULES)
def test_budget_schedule_is_the_cubic_formula_and_peft_s(tinit, tfinal, delta_t, total):
    from peft.tuners.adalora.layer import RankAllocator  # pylint: disable=import-outside-toplevel
    b0, bt = 12 * 24, 4 * 24
    allocator = RankAllocator.__new__(RankAllocator)  # its budget_schedule reads only these
    allocator.peft_config = types.SimpleNamespace(tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total)
    allocator.init_bgt, allocator.target_bgt = b0, bt
    table = adalora.budget_table(b0, bt, tinit, tfinal, delta_t, total)
    final = total - tfinal
    for t in range(1, total + 1):
        budget, masks = allocator.budget_schedule(t)
        assert table[t, 0] == budget == cubic(t, b0, bt, tinit, tfinal, total), t
        if t < final:
            want = adalora.PRUNE if masks and budget < b0 else adalora.KEEP
        else:
            want = adalora.PRUNE if t == final else adalora.APPLY_FROZEN
        assert table[t, 1] == want, t
    assert table[final, 0] == bt
    assert (table[1:, 0][:-1] >= table[1:, 0][1:]).all()  # never grows


def test_keep_top_keeps_exactly_the_top_b():
    rng = np.random.default_rng(3)
    scores = rng.random(97).astype(np.float32)
    for b in (0, 1, 40, 96, 97):
        got = np.asarray(adalora.keep_top(jax.numpy.asarray(scores), b))
        want = np.zeros(97, np.float32)
        want[np.argsort(-scores)[:b]] = 1
        np.testing.assert_array_equal(got, want)


def ada_config(steps=8, **peft):
    c = tiny_config(method="adalora")
    c.steps = steps
    c.peft.update(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=2, **peft)
    return c


def numpy_triplet_scores(state, targets):
    ipt, unc = flatten(jax.device_get(state.ipt["adapters"])), flatten(jax.device_get(state.unc["adapters"]))
    out = []
    for t in targets:
        score = {n: np.asarray(ipt[t.path + (n,)]) * np.asarray(unc[t.path + (n,)]) for n in ("lora_A", "lora_E", "lora_B")}
        lead = len(t.lead_shape)
        p = score["lora_A"].mean(axis=tuple(range(lead, lead + len(t.in_shape))))
        q = score["lora_B"].mean(axis=tuple(range(lead + 1, score["lora_B"].ndim)))
        out.append((score["lora_E"] + p + q).reshape(-1))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def stepped(source):
    """An 8-step in-process run, the state after every step."""
    loaded, batches = source
    from jaxlm import sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import CompiledSteps  # pylint: disable=import-outside-toplevel
    config = ada_config()
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    state = trainer.init_state(0, pretrained=loaded)
    compiled, states, step_losses = CompiledSteps(trainer), [], []
    for step in range(config.steps):
        state, metrics = compiled.train(state, sharding.to_global(batches[step % 2], trainer.mesh))
        states.append(jax.device_get(state))
        step_losses.append(float(metrics.compute()["loss"]))
    return trainer, states, step_losses


def test_pruning_keeps_the_top_b_triplets_and_reaches_the_target(stepped):
    trainer, states, _ = stepped
    targets, method = trainer.adapted.targets, trainer.adapted.method
    b0, bt = method.budgets(targets)
    table = adalora.budget_table(b0, bt, 1, 2, 2, 8)
    pruned = 0
    for t, state in enumerate(states, start=1):
        opt = state.opt_state
        mask = np.concatenate([np.asarray(flatten(opt.mask["adapters"])[tg.path + ("lora_E",)]).reshape(-1)
                               for tg in targets])
        lam = np.concatenate([np.asarray(flatten(state.params["adapters"])[tg.path + ("lora_E",)]).reshape(-1)
                              for tg in targets])
        if table[t, 1] == adalora.PRUNE:
            pruned += 1
            want = np.zeros_like(mask)
            want[np.argsort(-numpy_triplet_scores(opt, targets), kind="stable")[:table[t, 0]]] = 1
            np.testing.assert_array_equal(mask, want, err_msg=f"step {t}")
        if table[t, 1] != adalora.KEEP:
            assert mask.sum() == table[t, 0] and np.all(lam[mask == 0] == 0), t
    assert pruned >= 3 and int(states[-1].opt_state.count) == 8
    ranks = adalora.ranks(states[-1].opt_state, targets)
    assert len(ranks) == 8 and sum(ranks.values()) == bt == 2 * 8


def test_orthogonality_term_equals_numpy(stepped):
    trainer, states, _ = stepped
    targets, method = trainer.adapted.targets, trainer.adapted.method
    adapters = states[-1].params["adapters"]
    got = float(jax.jit(lambda a: method.orthogonality(a, targets))(adapters))
    flat, norms = flatten(adapters), []
    for t in targets:
        p = np.asarray(flat[t.path + ("lora_A",)], np.float64).reshape(t.matrices, t.fan_in, 4)
        q = np.asarray(flat[t.path + ("lora_B",)], np.float64).reshape(t.matrices, 4, -1)
        for m in range(t.matrices):
            norms.append(np.linalg.norm(p[m].T @ p[m] - np.eye(4), "fro"))
            norms.append(np.linalg.norm(q[m] @ q[m].T - np.eye(4), "fro"))
    assert got > 0.01
    np.testing.assert_allclose(got, np.mean(norms), rtol=1e-5)
    assert float(method.penalty(adapters, targets)) == pytest.approx(0.5 * got, rel=1e-6)


def test_eight_devices_give_the_one_device_losses_and_shard_the_scores_as_the_adapters(stepped, source):
    from jaxlm import sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import CompiledSteps  # pylint: disable=import-outside-toplevel
    _, states, want = stepped
    loaded, batches = source
    config = ada_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    trainer = Trainer(config, make_mesh(config, jax.devices()[:8]))
    state, compiled, got = trainer.init_state(0, pretrained=loaded), CompiledSteps(trainer).train, []
    for step in range(config.steps):
        state, metrics = compiled(state, sharding.to_global(batches[step % 2], trainer.mesh))
        got.append(float(metrics.compute()["loss"]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
    np.testing.assert_array_equal(jax.device_get(state.opt_state.mask["adapters"]["body"]["layers"]["attn"]["value"]
                                                 ["kernel"]["lora_E"]),
                                  states[-1].opt_state.mask["adapters"]["body"]["layers"]["attn"]["value"]["kernel"]
                                  ["lora_E"])
    adapters = flatten(state.params["adapters"])
    sharded = 0
    for tree in (state.opt_state.ipt["adapters"], state.opt_state.unc["adapters"]):
        for path, x in flatten(tree).items():
            assert x.sharding.spec == adapters[path].sharding.spec, path
            sharded += x.addressable_shards[0].data.shape != x.shape
    assert sharded >= 4


def test_fresh_adapters_change_nothing(source):
    loaded, _ = source
    config = ada_config()
    ada = Trainer(config, make_mesh(config, jax.devices()[:1]))
    state = ada.init_state(0, pretrained=loaded)
    with mesh_context(ada.mesh):
        merged = flatten(jax.device_get(jax.jit(ada.adapted.merge)(ada.frozen, state.params)))
    plain = flatten(jax.device_get(Trainer(tiny_config(method="none"), ada.mesh).init_state(0, pretrained=loaded).params))
    assert merged.keys() == plain.keys()
    for path in plain:
        np.testing.assert_array_equal(merged[path], plain[path], err_msg="/".join(path))
    adapters = flatten(jax.device_get(state.params["adapters"]))
    assert all(np.all(v == 0) for p, v in adapters.items() if p[-1] == "lora_E")
    assert all(np.std(v) > 0 for p, v in adapters.items() if p[-1] in ("lora_A", "lora_B"))


def read_ranks(workdir):
    with open(workdir / adalora.RANKS_FILE) as f:
        return json.load(f)


def ada_argv(workdir, tiny_hf, data_dir):
    return train_argv(workdir, tiny_hf, "--config.peft.method=adalora", "--config.steps=30", "--config.peft.init_r=4",
                      "--config.peft.target_r=2", "--config.peft.tinit=2", "--config.peft.tfinal=4",
                      "--config.peft.delta_t=2", "--config.checkpoint_every=3", "--config.keep_checkpoints=20",
                      data_dir=data_dir)


def test_a_cli_run_reaches_the_target_rank_and_a_kill_9_resumes_bitwise(tmp_path, tiny_hf):
    whole = tmp_path / "whole"
    assert cli.main(ada_argv(whole, tiny_hf, "tfds_adalora_whole")) == 0
    first, ranks = losses(str(whole)), read_ranks(whole)
    assert sorted(first) == list(range(1, 31))
    assert ranks["total_rank"] == ranks["target_total_rank"] == 2 * 8 == sum(ranks["ranks"].values())
    assert len(ranks["ranks"]) == 8 and len(set(ranks["ranks"].values())) > 1  # ranks moved between matrices
    with open(whole / "jaxlm.log") as f:
        assert "adalora: total rank 16 (target 16) over 8 matrices" in f.read()

    killed = tmp_path / "killed"
    argv = ada_argv(killed, tiny_hf, "tfds_adalora_killed")
    # As many devices as this process: a 1-device start resumed on 8 sums the gradients in another
    # order, and the float32 losses can agree while the states differ in the last bit.
    proc = start_cli(argv, devices=jax.device_count(), log_path=str(tmp_path / "killed.log"))
    try:  # SIGKILL once the first checkpoint (step 3, mid-pruning) is on disk
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (killed / "checkpoints" / "3").is_dir():
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before its first checkpoint"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / adalora.RANKS_FILE).exists()
    assert cli.main(argv) == 0
    again = losses(str(killed))
    assert sorted(again) == list(range(1, 31))
    assert again == first  # bitwise, every step (EMAs, mask and the count restored from the checkpoint)
    want, got = saved_state(str(whole), 30), saved_state(str(killed), 30)
    assert sorted(got) == sorted(want) and any("lora_E" in k for k in want)
    for key, value in want.items():  # the whole final state, optimizer moments and AdaLoRA's EMAs included
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert read_ranks(killed) == ranks


# -- the real MiniLM: `export --adapters_only` as peft's AdaLoRA, loaded by peft -----------------------------
HF_MODULES = {"query": "attention.self.query", "value": "attention.self.value", "out": "attention.output.dense"}


def hf_ranks(ranks: dict) -> dict:
    """adalora_ranks.json's {jaxlm matrix: rank} as {peft rank_pattern key: rank}."""
    out = {}
    for key, rank in ranks.items():
        m = re.fullmatch(r"body/layers(?:_(\d+))?/attn/(\w+)/kernel(?:\[(\d+)\])?", key)
        out[f"bert.encoder.layer.{m.group(1) or m.group(3)}.{HF_MODULES[m.group(2)]}.lora_E"] = rank
    return out


def test_peft_export_of_an_adalora_run_loads_with_peft_with_jaxlm_logits(tmp_path, tiny_hf, capsys):
    import peft  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    workdir, out = tmp_path / "run", tmp_path / "adapters"
    argv = [a for a in train_argv(workdir, tiny_hf, data_dir="tfds_minilm_adalora")
            if not a.startswith("--config.init_from=")]
    argv += [f"--config.init_from={minilm_dir()}", "--config.peft.method=adalora",
             "--config.peft.targets=attn/(query|value|out)/kernel$", "--config.steps=12", "--config.peft.init_r=4",
             "--config.peft.target_r=2", "--config.peft.tinit=2", "--config.peft.tfinal=3", "--config.peft.delta_t=2",
             "--config.optim.learning_rate=0.01"]  # a rate at which 12 steps move λ enough to matter
    assert cli.main(argv) == 0
    ranks = read_ranks(workdir)
    assert ranks["total_rank"] == ranks["target_total_rank"] == 2 * 18
    assert cli.main(["export", f"--workdir={workdir}", f"--out={out}", "--adapters_only"]) == 0
    assert cli.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'merged'}"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(out / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["peft_type"] == "ADALORA" and saved["task_type"] == "SEQ_CLS"
    assert [saved[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "lora_alpha")] == [
        4, 2, 2, 3, 2, 12, 8]
    assert (saved["beta1"], saved["beta2"], saved["orth_reg_weight"]) == (0.85, 0.85, 0.5)
    assert saved["modules_to_save"] == ["bert.pooler.dense", "classifier"] and len(saved["target_modules"]) == 18
    assert {k: sum(v) for k, v in saved["rank_pattern"].items()} == hf_ranks(ranks["ranks"])  # the final mask
    with safe_open(str(out / "adapter_model.safetensors"), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, pattern in saved["rank_pattern"].items():
        module, k = "base_model.model." + key[:-len(".lora_E")], sum(pattern)
        assert (shapes[module + ".lora_A"], shapes[module + ".lora_E"], shapes[module + ".lora_B"]) == (
            (k, 384), (k, 1), (384, k)), key

    ids, mask = hf_inputs()
    opened = run_lib.open_run(str(workdir))
    want = jaxlm_logits(opened.model, opened.params, ids, mask)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    got = torch_logits(loaded, ids, mask)
    merged = torch_logits(transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "merged")).eval(), ids, mask)
    layers = [m for m in loaded.modules() if isinstance(m, peft.tuners.adalora.SVDLinear)]
    assert len(layers) == 18 and all(float(m.ranknum["default"]) == 4 for m in layers if m.r["default"])
    with torch.no_grad():  # the same model without its adapters: the head alone does not explain the logits
        for m in layers:
            m.lora_E["default"].zero_()
    head_only = torch_logits(loaded, ids, mask)
    print(f"max |peft - jaxlm| {np.abs(got - want).max():.2e}, max |merged - jaxlm| {np.abs(merged - want).max():.2e}, "
          f"max |head only - jaxlm| {np.abs(head_only - want).max():.2e}")
    assert np.abs(head_only - want).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged, want, atol=1e-4, rtol=0)



def test_an_adalora_made_by_peft_imports_with_peft_logits(tmp_path, tiny_hf):
    import peft  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from jaxlm import sharding  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    hf_config = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(transformers.BertConfig(**hf_config)).save_pretrained(base_dir)
    for name in os.listdir(tiny_hf["bert"]):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(tiny_hf["bert"], name), base_dir)
    model = peft.get_peft_model(transformers.BertForSequenceClassification.from_pretrained(base_dir), peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=8,
        target_modules=["query", "value", "attention.output.dense", "intermediate.dense"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(1, 7):  # peft's own training loop: its pruning leaves a rank_pattern
        batch = torch.randint(1000, 20000, (4, 10))
        model(input_ids=batch, labels=torch.randint(0, 3, (4,))).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(adapter_dir)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert sum(map(sum, adapter_config["rank_pattern"].values())) == 2 * 8
    adapter_config["base_model_name_or_path"] = base_dir
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f)
    ids, mask = hf_inputs()
    want = torch_logits(peft.PeftModel.from_pretrained(
        transformers.BertForSequenceClassification.from_pretrained(base_dir), adapter_dir).eval(), ids, mask)
    plain = torch_logits(transformers.BertForSequenceClassification.from_pretrained(base_dir).eval(), ids, mask)

    config = config_lib.base_config()
    config.task, config.init_from = "classification", adapter_dir
    config.classification.update(pooling="cls", pooler=True)
    config.data.num_labels = 3
    source = pretrained.resolve_init_from(config)
    model = ShardedModel(config, sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1]))
    got = jaxlm_logits(model, source.load(model.abstract_params), ids, mask)
    print(f"max |jaxlm - peft| {np.abs(got - want).max():.2e}, max |base - peft| {np.abs(plain - want).max():.2e}")
    assert np.abs(want - plain).max() > 1e-2  # the adapters and the saved classifier change the logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_the_minilm_sst2_adalora_recipe_has_a_budget_phase(arg):
    config = config_lib.load_recipe(f"configs/minilm_sst2_adalora.py{':' + arg if arg else ''}", {})
    method = adalora.AdaLoRA(config.peft)
    assert config.peft.method == "adalora" and config.peft.trainable == "^cls_head/"
    assert method.tinit < config.steps - method.tfinal  # else wrap_optimizer's UserError
    targets = 6 * 2  # query and value of MiniLM's 6 layers
    table = adalora.budget_table(method.init_r * targets, method.target_r * targets, method.tinit, method.tfinal,
                                 method.delta_t, config.steps)
    assert table[config.steps - method.tfinal, 0] == method.target_r * targets
    assert (table[1:, 1] == adalora.PRUNE).sum() >= 3
