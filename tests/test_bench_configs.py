"""configs/bench/: the exact models of benchmarks/peers/peer_hf_torch.py, and `jaxlm bench` runs them.

The parameter counts are compared with the transformers models built with the peer's own
arguments (copied here; the first test checks the peer still uses these shapes). The bench
runs shrink the depth, batch and length through --config overrides to stay fast; the
exact-size models are only counted, not compiled.
"""

import json
import math
import os

import pytest
from cli_runner import REPO, run_cli

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.trainer import Trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PEER = os.path.join(REPO, "benchmarks", "peers", "peer_hf_torch.py")
L, D, H, F, V = 6, 384, 6, 1536, 8192


def peer_model(name: str):
    """The model peer_hf_torch.py builds, with its exact arguments."""
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=L, n_embd=D, n_head=H, n_inner=F, vocab_size=V, n_positions=256, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, intermediate_size=F, vocab_size=V,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2))


def jaxlm_params(spec: str, overrides: dict | None = None) -> tuple[int, object]:
    config = config_lib.load_recipe(spec, overrides or {})
    trainer = Trainer(config, sharding.make_mesh(config.mesh))
    return trainer.num_params, config


def test_the_peer_still_builds_these_shapes():
    with open(PEER) as f:
        source = f.read()
    assert f"L, D, H, F, V = {L}, {D}, {H}, {F}, {V}" in source
    assert "T, B = 256, 16" in source and "T, B = 128, 32" in source


@pytest.mark.parametrize("name,expected", [("gpt2", 13_891_584), ("bert", 13_991_810)])
def test_parameter_count_equals_the_peers_model(name, expected):
    hf = sum(p.numel() for p in peer_model(name).parameters())
    count, config = jaxlm_params(f"configs/bench/{name}_cpu.py")
    assert hf == expected and count == hf
    assert config.model.vocab_size == V and config.optim.weight_decay == 0.01 and config.optim.clip_norm == 0
    (bf16_count, bf16) = jaxlm_params(f"configs/bench/{name}_cpu.py:bf16")
    assert bf16_count == hf and bf16.model.matmul_dtype == "bfloat16" and bf16.model.param_dtype == "float32"
    assert bf16.model.dtype == "float32"  # Only the matmuls take bf16 inputs.
    assert config.model.dtype == "float32" and config.model.matmul_dtype == ""


# A 1-layer, short, small-batch version of each model: the step compiles and runs in seconds.
SMALL = {"model.num_layers": "1", "global_batch_size": "4", "seq_len": "32"}


# Both models and both precisions (bert's fp32 step is bert:bf16's in float32: not compiled again here).
@pytest.mark.parametrize("spec", ["configs/bench/gpt2_cpu.py", "configs/bench/gpt2_cpu.py:bf16",
                                  "configs/bench/bert_cpu.py:bf16"])
def test_bench_runs_the_config_and_prints_json_last(spec):
    proc = run_cli(["bench", "--mode=train", f"--config={spec}", "--steps=2", "--warmup=1",
                    *[f"--config.{k}={v}" for k, v in SMALL.items()]])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    count, _ = jaxlm_params(spec, SMALL)
    assert report["params"] == count
    assert report["steps"] == 2 and report["global_batch_size"] == 4 and report["seq_len"] == 32
    assert report["dtype"] == "float32"
    assert report["matmul_dtype"] == ("bfloat16" if spec.endswith(":bf16") else "float32")
    assert report["param_dtype"] == "float32"
    assert report["tokens_per_s"] == pytest.approx(4 * 32 / report["step_s_median"])
    assert 0 < report["mfu"] < 1.5  # bf16 is measured against the float32 matmul peak
    # Three steps at lr 1e-4 on one batch from a 0.02-std init (which starts at the uniform loss,
    # log(classes)): lower than that, but not collapsed.
    uniform = math.log(2 if "bert" in spec else V)
    assert 0.5 * uniform < report["last_loss"] < uniform + 0.05
