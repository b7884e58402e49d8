"""LoRA (jaxlm/peft/) and the fine-tuning defaults.

In process, on a tiny BERT-style classifier with a random "pretrained" body: a fresh adapter
changes nothing (bitwise); the frozen base has no gradient and no optimizer state (bytes
counted); the step's merge equals an independent numpy merge (logits 1e-5); on 8 fake devices
(fsdp=8, data=2 x fsdp=2 x tensor=2) the losses are the 1-device ones (1e-4) at every step and
each adapter is sharded as its base. Through the CLI on a tiny Hugging Face BERT: the fine-tuning
defaults are logged and recorded in config.json; a LoRA run's checkpoints hold the adapters and
head only and a resume is bitwise; user errors are one line. Where init_from is resolved: a
command-line learning rate is kept, a from-scratch run and a run from before the defaults keep
the recipe's values. The PEFT-format export and import on the real MiniLM: tests/test_lora_export.py;
adapter dropout (peft.dropout > 0): tests/test_lora_dropout.py.
"""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

from cli_runner import losses
from conftest import minilm_dir, tiny_bert_config
from jaxlm import cli, sharding
from jaxlm import config as config_lib
from jaxlm.compat import mesh_context
from jaxlm.peft.targets import flatten
from jaxlm.sharded_model import ShardedModel
from jaxlm.trainer import CompiledSteps, Trainer, tree_bytes
from sample_data import write_reviews

transformers.logging.set_verbosity_error()
RANK = 4


def tiny_config(mesh=(1, 1, 1), method="lora"):
    c = config_lib.base_config()
    c.task = "classification"
    c.model.update(tiny_bert_config().to_dict())
    c.data.num_labels = 3
    c.classification.update(pooling="cls", pooler=True)
    c.seq_len, c.global_batch_size, c.steps = 16, 8, 10
    c.optim.update(learning_rate=1e-2, warmup_steps=0)
    c.peft.update(method=method, rank=RANK, alpha=8.0)
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return c


def make_mesh(config, devices):
    return sharding.make_mesh(config.mesh, devices)


@pytest.fixture(scope="module")
def source():
    """A random 'pretrained' body (numpy) and a few random global batches."""
    config = tiny_config(method="none")
    model = ShardedModel(config, make_mesh(config, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    body = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), model.abstract_params["body"])
    spec = model.task.batch_spec(config)
    batches = []
    for _ in range(4):
        batches.append({"inputs": rng.integers(0, 64, spec["inputs"].shape).astype(np.int32),
                        "padding_mask": np.ones(spec["padding_mask"].shape, bool),
                        "token_type_ids": np.zeros(spec["token_type_ids"].shape, np.int32),
                        "labels": rng.integers(0, 3, spec["labels"].shape).astype(np.int32),
                        "weights": np.ones(spec["weights"].shape, np.float32)})
    return {"body": body}, batches


def train(config, devices, source, steps=4):
    loaded, batches = source
    trainer = Trainer(config, make_mesh(config, devices))
    state = trainer.init_state(0, pretrained=loaded)
    compiled, step_losses = CompiledSteps(trainer), []
    for step in range(steps):  # two batches in turn: the loss on them falls
        state, metrics = compiled.train(state, sharding.to_global(batches[step % 2], trainer.mesh))
        step_losses.append(float(metrics.compute()["loss"]))
    return trainer, state, step_losses


@pytest.fixture(scope="module")
def one_device(source):
    return train(tiny_config(), jax.devices()[:1], source)


def logits_of(model, params, batch):
    with mesh_context(model.mesh):
        return np.asarray(jax.jit(model.apply)(params, sharding.to_global(batch, model.mesh)))


def test_fresh_adapters_change_nothing(source):
    loaded, batches = source
    lora = Trainer(tiny_config(), make_mesh(tiny_config(), jax.devices()[:1]))
    state = lora.init_state(0, pretrained=loaded)
    with mesh_context(lora.mesh):
        merged = jax.device_get(jax.jit(lora.adapted.merge)(lora.frozen, state.params))
    plain = Trainer(tiny_config(method="none"), lora.mesh).init_state(0, pretrained=loaded)
    want = flatten(jax.device_get(plain.params))
    got = flatten(merged)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))
    adapters = flatten(jax.device_get(state.params["adapters"]))
    assert len(adapters) == 2 * 4 and all(np.all(v == 0) for p, v in adapters.items() if p[-1] == "lora_B")
    assert all(np.std(v) > 0 for p, v in adapters.items() if p[-1] == "lora_A")
    np.testing.assert_array_equal(logits_of(lora, merged, batches[0]), logits_of(lora, plain.params, batches[0]))


def test_the_frozen_base_has_no_gradient_and_no_optimizer_state(one_device, source):
    trainer, state, _ = one_device
    trained = flatten(jax.device_get(state.params))
    assert {p[0] for p in trained} == {"adapters", "params"}
    assert {p[1] for p in trained if p[0] == "params"} == {"cls_head"}  # the head trains in full, nothing else
    adapter_bytes = sum(v.nbytes for p, v in trained.items() if p[0] == "adapters")
    head_bytes = sum(v.nbytes for p, v in trained.items() if p[0] == "params")
    opt_bytes = tree_bytes(state.opt_state)
    assert opt_bytes <= 2 * (adapter_bytes + head_bytes) + 64  # adam's two moments of the trained params + counts
    full = Trainer(tiny_config(method="none"), trainer.mesh)
    full_opt_bytes = tree_bytes(full.abstract_state.opt_state)
    assert opt_bytes < 0.25 * full_opt_bytes, (opt_bytes, full_opt_bytes)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        key = jax.tree_util.keystr(path)
        assert leaf.size == 1 or "'adapters'" in key or "'params'" in key, key
    # After the steps: the base is still init_from's, the adapters and head moved.
    frozen = flatten(jax.device_get(trainer.frozen))
    for path, value in flatten(source[0]).items():
        np.testing.assert_array_equal(frozen[path], value, err_msg="/".join(path))
    assert all(np.abs(v).max() > 0 for p, v in trained.items() if p[-1] == "lora_B")


def numpy_merge(trainer, state) -> dict:
    """W + (alpha/r) A.B for every target, written independently of jaxlm.peft."""
    flat = flatten(jax.device_get(trainer.frozen))
    flat.update(flatten(jax.device_get(state.params["params"])))
    adapters = flatten(jax.device_get(state.params["adapters"]))
    scale = trainer.config.peft.alpha / trainer.config.peft.rank
    for t in trainer.adapted.targets:
        a, b = adapters[t.path + ("lora_A",)], adapters[t.path + ("lora_B",)]
        layers = t.shape[0]
        delta = a.reshape(layers, -1, RANK).astype(np.float64) @ b.reshape(layers, RANK, -1).astype(np.float64)
        flat[t.path] = (flat[t.path] + scale * delta.reshape(t.shape)).astype(np.float32)
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def test_the_step_merge_equals_a_numpy_merge(one_device, source):
    trainer, state, _ = one_device
    batch = source[1][0]
    with mesh_context(trainer.mesh):
        merged = jax.jit(trainer.adapted.merge)(trainer.frozen, state.params)
    adapter_logits = logits_of(trainer, merged, batch)
    reference = logits_of(trainer, numpy_merge(trainer, state), batch)
    assert np.abs(adapter_logits).max() > 1e-3
    np.testing.assert_allclose(adapter_logits, reference, atol=1e-5, rtol=0)
    eval_loss = float(trainer.eval_batch(state.params, sharding.to_global(batch, trainer.mesh)).compute()["loss"])
    labels = batch["labels"]
    log_probs = jax.nn.log_softmax(reference.astype(np.float64), -1)
    np.testing.assert_allclose(eval_loss, -np.mean(log_probs[np.arange(len(labels)), labels]), atol=1e-5)


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)], ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_eight_devices_give_the_one_device_losses_and_shard_adapters_as_their_base(
        mesh, eight_devices, source, one_device):
    _, _, want = one_device
    trainer, state, got = train(tiny_config(mesh), eight_devices, source)
    assert want[2] < want[0] - 0.01 and want[3] < want[1] - 0.01, want
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
    frozen, adapters = flatten(trainer.frozen), flatten(state.params["adapters"])

    def spec(x):
        return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))

    sharded = 0
    for t in trainer.adapted.targets:
        base, a, b = spec(frozen[t.path]), adapters[t.path + ("lora_A",)], adapters[t.path + ("lora_B",)]
        split = t.lead + t.n_in
        assert spec(a) == base[:split] + (None,), (t.path, spec(a), base)
        assert spec(b) == base[:t.lead] + (None,) + base[split:], (t.path, spec(b), base)
        sharded += sum(x.addressable_shards[0].data.shape != x.shape for x in (a, b))
    assert sharded >= 4


# -- through the CLI, on a tiny Hugging Face BERT ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny BertModel with MiniLM's WordPiece tokenizer, and the review CSVs."""
    root = tmp_path_factory.mktemp("tiny_hf")
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    model.save_pretrained(str(root / "bert"), safe_serialization=True)
    for name in os.listdir(minilm_dir()):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(minilm_dir(), name), root / "bert" / name)
    return {"bert": str(root / "bert"), "root": root, "train": write_reviews(root / "train.csv", 200, seed=0),
            "eval": write_reviews(root / "eval.csv", 40, seed=1)}


def train_argv(workdir, tiny_hf, *extra, data_dir="tfds"):
    # Each test its own data_dir: a token cache another run wrote changes the data position's id
    # (the tokenizer fingerprint is taken after encoding; see the report on jaxlm/data/tokenizer.py).
    return ["train", "--config=configs/csv_classification.py:runlocal", f"--workdir={workdir}",
            f"--config.data.data_dir={tiny_hf['root'] / data_dir}", f"--config.data.train_file={tiny_hf['train']}",
            f"--config.data.eval_file={tiny_hf['eval']}", "--config.data.text_column=review",
            "--config.data.label_column=sentiment", f"--config.init_from={tiny_hf['bert']}",
            "--config.classification.pooling=cls", "--config.classification.pooler=true", "--config.seq_len=16",
            "--config.global_batch_size=8", "--config.log_every=1", "--config.eval_every=0",
            "--config.async_checkpointing=false", "--config.best_metric=", *extra]


def defaults_line(workdir) -> str:
    with open(os.path.join(workdir, "jaxlm.log")) as f:
        lines = [line for line in f if "fine-tuning defaults (init_from=" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_hf):
    workdir = tmp_path_factory.mktemp("lora") / "run"
    argv = train_argv(workdir, tiny_hf, "--config.peft.method=lora", "--config.steps=6",
                      "--config.checkpoint_every=3", "--config.keep_checkpoints=5")
    assert cli.main(argv) == 0
    return workdir, argv, losses(str(workdir))


def test_fine_tuning_defaults_are_logged_and_recorded(lora_run):
    workdir, _, _ = lora_run
    line = defaults_line(workdir)
    for part in ("optim.learning_rate=0.0005 (lora)", "optim.warmup_steps=1 (0.1 of 6 steps)",
                 "optim.weight_decay=0.01", "model.dropout=0.1 (the source's)",
                 "model.attention_dropout=0.1 (the source's)"):
        assert part in line, line
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert (saved["optim"]["learning_rate"], saved["optim"]["warmup_steps"], saved["model"]["dropout"],
            saved["model"]["attention_dropout"]) == (5e-4, 1, 0.1, 0.1)  # the recipe's runlocal values are 3e-3, 10
    assert saved["peft"]["method"] == "lora" and saved["finetune"]["defaults"] is True


def test_a_learning_rate_given_on_the_command_line_is_kept(caplog, tiny_hf):
    from jaxlm.peft import finetuning  # pylint: disable=import-outside-toplevel
    config = config_lib.load_recipe("configs/csv_classification.py:runlocal", {
        "init_from": tiny_hf["bert"], "optim.learning_rate": "0.001", "steps": "2"})
    with caplog.at_level("INFO"):
        finetuning.resolve_init_from(config, {})
    line = next(r.getMessage() for r in caplog.records if "fine-tuning defaults (init_from=" in r.getMessage())
    chosen, kept = line.split("; kept: ")
    assert "optim.learning_rate" not in chosen and kept == "optim.learning_rate=0.001", line
    assert "optim.warmup_steps=0 (0.1 of 2 steps)" in chosen, line
    saved = json.loads(config_lib.to_json(config))  # what DIR/config.json records
    assert saved["optim"]["learning_rate"] == 0.001 and "optim.learning_rate" in saved["finetune"]["keep"].split(",")


def test_finetune_dropout_sets_both_dropouts_and_an_older_run_resumes_without_attention_dropout(caplog, tiny_hf):
    from jaxlm.peft import finetuning  # pylint: disable=import-outside-toplevel
    recipe, base = "configs/csv_classification.py:runlocal", {"init_from": tiny_hf["bert"], "steps": "2"}
    cases = [  # (overrides, saved config.json, (model.dropout, model.attention_dropout), expected log part)
        ({}, {}, (0.1, 0.1), "model.attention_dropout=0.1 (the source's)"),
        ({"finetune.dropout": "0.0"}, {}, (0.0, 0.0), "model.attention_dropout=0.0"),
        ({"model.attention_dropout": "0.05"}, {}, (0.1, 0.05), "kept: model.attention_dropout=0.05"),
        ({}, {"finetune": {}, "model": {"dropout": 0.1}}, (0.1, 0.0), "model.attention_dropout=0.0 (as the run started)"),
        ({}, {"finetune": {}, "model": {"dropout": 0.1, "attention_dropout": 0.1}}, (0.1, 0.1), "(the source's)"),
    ]
    for overrides, saved, want, part in cases:
        config = config_lib.load_recipe(recipe, {**base, **overrides})
        caplog.clear()
        with caplog.at_level("INFO"):
            finetuning.resolve_init_from(config, saved)
        line = next(r.getMessage() for r in caplog.records if "fine-tuning defaults (init_from=" in r.getMessage())
        assert (config.model.dropout, config.model.attention_dropout) == want, (overrides, saved, line)
        assert part in line, (overrides, line)
    old = config_lib.load_recipe(recipe, base)  # a run from before the fine-tuning defaults, too
    finetuning.resolve_init_from(old, {"task": "classification", "model": {"dropout": 0.1}})
    assert old.model.attention_dropout == 0.0


def test_a_classifier_takes_the_sources_pretrained_pooler_unless_told_or_resumed_without(caplog, tiny_hf):
    """BertModel saves its pooler: a fresh classification run uses it (as BertForSequenceClassification
    does); the command line's value is kept; a resume keeps what its run started with."""
    from jaxlm.peft import finetuning  # pylint: disable=import-outside-toplevel
    recipe, base = "configs/csv_classification.py:runlocal", {"init_from": tiny_hf["bert"], "steps": "2"}
    cases = [({}, {}, True), ({"classification.pooler": "false"}, {}, False),
             ({}, {"finetune": {}, "classification": {"pooler": False}}, False),
             ({}, {"finetune": {}, "classification": {"pooler": True}}, True)]
    for overrides, saved, want in cases:
        config = config_lib.load_recipe(recipe, {**base, **overrides})
        assert config.classification.pooler is False  # the recipe's own value
        caplog.clear()
        with caplog.at_level("INFO"):
            finetuning.resolve_init_from(config, saved)
        line = next(r.getMessage() for r in caplog.records if "fine-tuning defaults (init_from=" in r.getMessage())
        assert config.classification.pooler is want, (overrides, saved, line)
        if not overrides and not saved:
            assert "classification.pooler=True (the source's pretrained pooler)" in line, line
        if overrides:
            assert "kept: " in line and "classification.pooler=False" in line.split("kept: ")[1], line


def test_checkpoints_hold_adapters_and_head_and_a_resume_is_bitwise(lora_run):
    workdir, argv, first = lora_run
    tree = ocp.PyTreeCheckpointHandler().metadata(workdir / "checkpoints" / "3" / "state").tree
    assert set(tree["params"]) == {"adapters", "params"} and set(tree["params"]["params"]) == {"cls_head"}
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]]
    assert opt_paths and all("'body'" not in p or "'adapters'" in p for p in opt_paths), opt_paths
    sizes = [int(np.prod(m.shape)) for m in jax.tree.leaves(tree["params"])]
    assert sum(sizes) < 0.02 * 30522 * 32  # far below the base's token embedding alone
    shutil.rmtree(workdir / "checkpoints" / "6")  # as if killed after step 5
    assert cli.main(argv) == 0
    again = losses(str(workdir))
    assert sorted(again) == list(range(1, 7))
    assert [again[s] for s in range(4, 7)] == [first[s] for s in range(4, 7)]


def test_no_defaults_from_scratch_nor_for_a_run_from_before_them(tiny_hf):
    from jaxlm.peft import finetuning  # pylint: disable=import-outside-toplevel
    recipe = "configs/csv_classification.py:runlocal"
    scratch = config_lib.load_recipe(recipe, {})
    assert finetuning.resolve_init_from(scratch, {}) is None
    assert (scratch.optim.learning_rate, scratch.optim.warmup_steps, scratch.model.dropout) == (3e-3, 10, 0.1)
    old = config_lib.load_recipe(recipe, {"init_from": tiny_hf["bert"]})
    saved = {"task": "classification", "model": old.model.to_dict(), "optim": old.optim.to_dict()}  # no finetune
    assert finetuning.resolve_init_from(old, saved) is not None
    assert (old.optim.learning_rate, old.optim.warmup_steps) == (3e-3, 10)
    fresh = config_lib.load_recipe(recipe, {"init_from": tiny_hf["bert"]})
    finetuning.resolve_init_from(fresh, {})
    assert (fresh.optim.learning_rate, fresh.optim.warmup_steps) == (5e-5, 8)  # 10% of 80 steps


@pytest.mark.parametrize("flags, needles", [
    (["--config.init_from="], ["peft.method=lora adapts a pretrained model", "init_from"]),
    (["--config.peft.method=adalora", "--config.peft.target_r=20"], ["peft.target_r=20", "peft.init_r=12"]),
    (["--config.peft.dropout=0.1", "--config.peft.targets=pooler/kernel", "--config.peft.trainable=classifier"],
     ["peft.dropout=0.1", "peft.targets='pooler/kernel' picks cls_head/pooler/kernel", "or set peft.dropout=0"]),
    (["--config.peft.targets=mlp/nothing"], ["peft.targets='mlp/nothing' matches no kernel"]),
])
def test_peft_user_errors_are_one_line(capsys, tmp_path, tiny_hf, flags, needles):
    workdir = tmp_path / "run"
    code = cli.main(train_argv(workdir, tiny_hf, "--config.peft.method=lora", *flags, data_dir="tfds_errors"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("jaxlm: error: ") and "Traceback" not in "\n".join(err), err[-5:]
    for needle in needles:
        assert needle in err[-1], err[-1]
    assert not workdir.exists()
