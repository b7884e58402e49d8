"""LoRA in the Hugging Face PEFT format (jaxlm/peft/hf_format.py, jaxlm/peft/export.py), on the real
MiniLM: `export --adapters_only` of a run with peft.dropout=0.1 writes lora_dropout 0.1 and loads
with peft onto transformers' AutoModelForSequenceClassification with jaxlm's (eval-mode) logits
(1e-4), the merged export too, its config.json naming the run's classes (id2label); a LoRA made by
peft imports (init_from=its directory) with peft's logits.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import test_lora
from conftest import minilm_dir
from jaxlm import cli, pretrained, sharding
from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.sharded_model import ShardedModel
from jaxlm.trainer import Trainer
from test_lora import logits_of

transformers.logging.set_verbosity_error()
tiny_hf = test_lora.tiny_hf  # LoRA's module fixture (the tiny BERT's tokenizer files), built again here


def hf_inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 20000, (2, 12))
    ids[:, 0] = 101  # [CLS]
    mask = np.ones(ids.shape, bool)
    mask[1, 8:] = False
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                     token_type_ids=torch.zeros(ids.shape, dtype=torch.long)).logits.numpy()


def jaxlm_logits(model, params, ids, mask):
    batch = {"inputs": ids.astype(np.int32), "padding_mask": mask, "token_type_ids": np.zeros(ids.shape, np.int32)}
    return logits_of(model, params, batch)


@pytest.fixture(scope="module")
def minilm_lora_run(tmp_path_factory):
    """A LoRA run directory on the real MiniLM as `jaxlm train` leaves it, with random (nonzero)
    adapters and head at step 1, trained with adapter dropout (peft.dropout=0.1)."""
    workdir = tmp_path_factory.mktemp("minilm_lora")
    config = config_lib.base_config()
    config.task, config.init_from = "classification", minilm_dir()
    config.classification.update(pooling="cls", pooler=True)
    config.peft.update(method="lora", targets="attn/(query|value|out)/kernel$", dropout=0.1)
    source = pretrained.resolve_init_from(config)
    with config.data.ignore_type():
        config.data.update(num_labels=2, label_names=["negative", "positive"], label_kind="name")
    with open(workdir / "config.json", "w") as f:
        f.write(config_lib.to_json(config))
    mesh = sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])
    trainer = Trainer(config, mesh, init_source=source)
    state = trainer.init_state(0, pretrained=source.load(trainer.abstract_params))
    rng = np.random.default_rng(2)
    moved = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 0.02, p.shape), p.dtype), state.params)
    checkpointer = Checkpointer(str(workdir), asynchronous=False, with_data=False)
    checkpointer.save(1, state.replace(params=moved), force=True)
    checkpointer.close()
    return workdir


def test_peft_export_loads_with_peft_onto_transformers_with_jaxlm_logits(minilm_lora_run, tmp_path, capsys):
    import peft  # pylint: disable=import-outside-toplevel
    workdir = str(minilm_lora_run)
    assert cli.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'adapters'}", "--adapters_only"]) == 0
    assert cli.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'merged'}"]) == 0
    assert "as a Hugging Face PEFT adapter (bert)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "adapters")) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(tmp_path / "adapters" / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert adapter_config["r"] == 8 and adapter_config["base_model_name_or_path"] == minilm_dir()
    assert adapter_config["lora_dropout"] == 0.1  # the run's peft.dropout; eval-mode logits are unaffected
    assert adapter_config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    ids, mask = hf_inputs()
    opened = run_lib.open_run(workdir)
    want = jaxlm_logits(opened.model, opened.params, ids, mask)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    with_adapters = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")).eval()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}  # the run's classes, for pipelines
    assert merged.config.label2id == {"negative": 0, "positive": 1}
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(torch_logits(with_adapters, ids, mask), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(torch_logits(merged, ids, mask), want, atol=1e-4, rtol=0)


def test_a_lora_made_by_peft_imports_with_peft_logits(tmp_path, tiny_hf):
    import peft  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    base_dir = str(tmp_path / "base")
    base = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))
    base.save_pretrained(base_dir, safe_serialization=True)
    for name in os.listdir(tiny_hf["bert"]):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(tiny_hf["bert"], name), base_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,  # B random too: the adapter matters
        target_modules=["query", "value", "attention.output.dense", "intermediate.dense"]))
    with torch.no_grad():
        lora.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    lora.save_pretrained(str(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = base_dir
    with open(tmp_path / "adapter" / "adapter_config.json", "w") as f:
        json.dump(adapter_config, f)
    ids, mask = hf_inputs()
    want = torch_logits(lora.eval(), ids, mask)

    config = config_lib.base_config()
    config.task, config.init_from = "classification", str(tmp_path / "adapter")
    config.classification.update(pooling="cls", pooler=True)
    config.data.num_labels = 3
    source = pretrained.resolve_init_from(config)
    assert config.data.tokenizer == base_dir
    model = ShardedModel(config, sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1]))
    got = jaxlm_logits(model, source.load(model.abstract_params), ids, mask)
    plain = torch_logits(transformers.BertForSequenceClassification.from_pretrained(base_dir).eval(), ids, mask)
    assert np.abs(want - plain).max() > 1e-2  # the adapters and the saved classifier change the logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
