"""`jaxlm export`: a run's checkpoint becomes a Hugging Face directory that transformers loads with
from_pretrained, with logits equal to jaxlm's (1e-4) for GPT-2, Llama and BERT runs and for a run
of the embedded default (tiny_shakespeare, tokenizer included); transformers' greedy `generate` on
the export gives `jaxlm generate`'s text (the tokenizer frames a prompt as training framed a
document; padding ids are suppressed); files follow the umask; export -> import -> export is
byte-stable; user errors are one line, exit 2."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: F401  (transformers' PyTorch models; the test extra installs it)
import transformers
from tokenizers import Tokenizer, processors

from jaxlm import cli, restore
from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.convert import export_hf, load_hf_model
from jaxlm.convert.hf_tokenizer import export_tokenizer
from jaxlm.data.corpora import path as corpus_path
from jaxlm.data.tokenizer import train_bpe_tokenizer
from jaxlm.generate import Generator, encode_prompts
from jaxlm.models import Model
from jaxlm.tasks import get_task
from jaxlm.trainer import Trainer

transformers.logging.set_verbosity_error()
TOL = 1e-4
STEP = 3
TINY = dict(vocab_size=384, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64)  # 300 tokens, padded
FAMILIES = {
    "gpt2": ("causal_lm", dict(activation="gelu_tanh"), "AutoModelForCausalLM", "GPT2LMHeadModel"),
    "llama": ("causal_lm", dict(positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
                                tie_embeddings=False, num_kv_heads=2, norm_eps=1e-6), "AutoModelForCausalLM",
              "LlamaForCausalLM"),
    "bert": ("masked_lm", dict(causal=False, norm_position="post", embed_norm=True, type_vocab_size=2,
                               activation="gelu", norm_eps=1e-12), "AutoModelForMaskedLM", "BertForMaskedLM"),
}


def one_device_mesh():
    return restore.inference_mesh(config_lib.base_config(), {})


def corpus_texts(n: int = 400) -> list[str]:
    with open(corpus_path("tiny_shakespeare"), encoding="utf-8") as f:
        return f.read().split("\n\n")[:n]


def make_run(workdir: str, task: str, model_fields: dict) -> dict:
    """A run directory as `jaxlm train` leaves it (config.json, tokenizer/, an orbax checkpoint at
    STEP), with random params that move biases and norm scales too. Returns those params."""
    config = config_lib.base_config()
    config.task, config.seq_len = task, 32
    config.model.update({**TINY, **model_fields})
    train_bpe_tokenizer(corpus_texts(), 300, os.path.join(workdir, "tokenizer"), mask_token=task == "masked_lm")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    trainer = Trainer(config, one_device_mesh())
    state = trainer.init_state(0)
    rng = np.random.default_rng(len(workdir))
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 0.1, p.shape), p.dtype), state.params)
    checkpointer = Checkpointer(workdir, asynchronous=False, with_data=False)
    checkpointer.save(STEP, state.replace(params=params), force=True)
    checkpointer.close()
    return params


def jaxlm_logits(workdir: str, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    config = restore.load_run_config(workdir, {})
    model = Model(config_lib.model_config(config), **get_task(config.task).model_kwargs(config))
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), padding_mask=jnp.asarray(mask)))


def hf_logits(out_dir: str, auto: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = getattr(transformers, auto).from_pretrained(out_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def sample_inputs(vocab: int = 300):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (2, 12))
    mask = np.ones(ids.shape, bool)
    mask[1, 8:] = False  # right padding in row 1
    return ids, mask


def max_diff(a, b, mask):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64))[mask].max())


def export(capsys, *args):
    code = cli.main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_command_loads_in_transformers(family, tmp_path, capsys):
    task, fields, auto, architecture = FAMILIES[family]
    workdir, out = tmp_path / "run", tmp_path / "hf"
    workdir.mkdir()
    params = make_run(str(workdir), task, fields)
    code, printed, err = export(capsys, f"--workdir={workdir}", f"--out={out}", f"--step={STEP}")
    assert code == 0, err
    assert f"exported step {STEP} as a Hugging Face {family} model" in printed
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == [architecture] and hf_config["vocab_size"] == TINY["vocab_size"]

    ids, mask = sample_inputs()
    ours, theirs = jaxlm_logits(str(workdir), params, ids, mask), hf_logits(str(out), auto, ids, mask)
    assert ours.shape == theirs.shape == (2, 12, TINY["vocab_size"])
    diff = max_diff(ours, theirs, mask)
    print(f"\n[export parity] {family}: max |jaxlm - transformers| = {diff:.2e}")
    assert diff <= TOL

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    run_tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "tokenizer")
    text = "Wherefore art thou Romeo?"
    if task == "causal_lm":  # A prompt is framed as a new document, as `jaxlm generate` frames it.
        assert tokenizer(text)["input_ids"] == encode_prompts(run_tokenizer, [text])[0]
        assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id == run_tokenizer.eos_token_id
    else:
        assert tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"]
    assert tokenizer.model_max_length == TINY["max_len"]

    # export -> import -> export: the same bytes.
    cfg, imported, _ = load_hf_model(str(out), scan_layers=True)
    export_hf(cfg, imported, tmp_path / "again", tokenizer=tokenizer)
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """configs/tiny_shakespeare.py trained 2 steps with the CLI, and its export: (workdir, out)."""
    root = tmp_path_factory.mktemp("default_run")
    workdir, out = root / "run", root / "hf"
    assert cli.main(["train", "--config=configs/tiny_shakespeare.py", f"--workdir={workdir}",
                     f"--config.data.data_dir={root / 'tfds'}", "--config.steps=2", "--config.eval_batches=1",
                     "--config.mesh.data=8"]) == 0
    assert cli.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
    return workdir, out


def test_embedded_default_run_exports_as_gpt2(default_run, capsys):
    """configs/tiny_shakespeare.py, trained 2 steps: GPT-2 family, tokenizer included, padded vocab kept."""
    workdir, out = default_run
    code, printed, err = export(capsys, f"--workdir={workdir}", f"--out={out.parent / 'again'}")
    assert code == 0, err
    assert "exported step 2 as a Hugging Face gpt2 model" in printed
    run_config = json.loads((workdir / "config.json").read_text())
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["GPT2LMHeadModel"]
    assert hf_config["vocab_size"] == run_config["model"]["vocab_size"]
    assert hf_config["activation_function"] == "gelu_new" and hf_config["tie_word_embeddings"]
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors", "generation_config.json"} <= set(
        os.listdir(out))

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) <= hf_config["vocab_size"]
    assert tokenizer.model_max_length == run_config["model"]["max_len"] == 256
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    mask = np.ones(ids.shape, bool)
    config = restore.load_run_config(str(workdir), {})
    trainer = Trainer(config, one_device_mesh())
    params = restore.restore_params(restore.find_checkpoint(str(workdir)), trainer.abstract_params,
                                    trainer.param_shardings)
    ours = jaxlm_logits(str(workdir), params, ids, mask)
    diff = max_diff(ours, hf_logits(str(out), "AutoModelForCausalLM", ids, mask), mask)
    print(f"\n[export parity] tiny_shakespeare default: max |jaxlm - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_exported_files_follow_the_umask(default_run):
    _, out = default_run
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: oct(os.stat(out / name).st_mode & 0o777) for name in sorted(os.listdir(out))}
    assert modes == {name: oct(0o666 & ~umask) for name in modes}, modes
    assert "model.safetensors" in modes


def test_transformers_greedy_text_equals_jaxlm_generate(default_run, capsys):
    """`tokenizer(prompt)` + `model.generate` on the export give `jaxlm generate`'s greedy text."""
    workdir, out = default_run
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak."]
    new_tokens = 24
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    prompts_file = out.parent / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    code = cli.main(["generate", f"--workdir={workdir}", f"--prompts_file={prompts_file}", "--temperature=0",
                     f"--max_new_tokens={new_tokens}"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert printed == "".join(f"[{i}] {text}\n" for i, text in enumerate(texts))
    assert all(text.startswith(prompt) and len(text) > len(prompt) for text, prompt in zip(texts, prompts))
    code = cli.main(["generate", f"--workdir={workdir}", f"--prompt={prompts[0]}", "--temperature=0",
                     f"--max_new_tokens={new_tokens}"])
    assert code == 0 and capsys.readouterr()[0] == texts[0] + "\n"


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpt2_run")
    make_run(str(workdir), "causal_lm", FAMILIES["gpt2"][1])
    return workdir


def test_padding_ids_are_never_generated(gpt2_run, tmp_path):
    """The gpt2 run's vocab is padded (300 tokens in 384 rows). With the padding rows of its tied
    embedding made to win the argmax, transformers still generates jaxlm's greedy tokens:
    generation_config.json suppresses the padding ids, as jaxlm never produces them."""
    config = restore.load_run_config(str(gpt2_run), {})
    trainer = Trainer(config, one_device_mesh())
    params = restore.restore_params(restore.find_checkpoint(str(gpt2_run)), trainer.abstract_state.params,
                                    trainer.param_shardings)
    table = params["body"]["embed"]["token"]["embedding"]
    params["body"]["embed"]["token"]["embedding"] = table.at[300:].set(4.0 * table[:TINY["vocab_size"] - 300])
    run_tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_run / "tokenizer")
    out = export_hf(trainer.model_config, params, tmp_path / "hf", tokenizer=run_tokenizer)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
                          "suppress_tokens": list(range(300, TINY["vocab_size"]))}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt, new_tokens = "Wherefore art thou", 16
    ours = Generator(trainer.model_config, params, valid_vocab=300).generate(
        encode_prompts(run_tokenizer, [prompt]), new_tokens, eos_id=0)[0]
    inputs = tokenizer(prompt, return_tensors="pt")
    start = inputs["input_ids"].shape[1]

    def hf_greedy(**kwargs):
        with torch.no_grad():
            row = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, **kwargs)[0, start:].tolist()
        return row[:row.index(0)] if 0 in row else row

    assert hf_greedy() == ours and len(ours) > 0
    assert max(hf_greedy(suppress_tokens=[])) >= 300, "without the suppression, padding ids are generated"


def test_a_tokenizer_with_its_own_bos_gets_the_training_framing_not_a_second_bos(gpt2_run, tmp_path):
    """A run whose data.tokenizer adds a BOS of its own (as Llama's adds <s>) trained on documents
    encoded without it, each after an EOS: the exported tokenizer frames a prompt that way too."""
    backend = Tokenizer.from_str(transformers.AutoTokenizer.from_pretrained(gpt2_run / "tokenizer")
                                 .backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", special_tokens=[("<s>", bos)])
    own_bos = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                   eos_token="<|endoftext|>", pad_token="<|pad|>")
    text = "Wherefore art thou Romeo?"
    plain = own_bos(text, add_special_tokens=False)["input_ids"]
    assert own_bos(text)["input_ids"] == [bos] + plain
    assert encode_prompts(own_bos, [text]) == [[0] + plain]  # as its documents in training

    export_tokenizer(own_bos, 64, causal=True).save_pretrained(tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported(text)["input_ids"] == [0] + plain
    assert exported.bos_token == "<|endoftext|>" and exported.model_max_length == 64
    assert own_bos(text)["input_ids"] == [bos] + plain, "the run's tokenizer is left as it was"
    export_tokenizer(own_bos, 64, causal=False).save_pretrained(tmp_path / "mlm")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "mlm")(text)["input_ids"] == [bos] + plain


def expect_error(capsys, needle, *args):
    code, _, err = export(capsys, *args)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("jaxlm: error: ") and needle in line, err[-2000:]


def test_export_user_errors(tmp_path, capsys, gpt2_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, "is not empty", f"--workdir={gpt2_run}", f"--out={out}")
    assert os.listdir(out) == ["keep.txt"]
    expect_error(capsys, "--step=99: no such checkpoint", f"--workdir={gpt2_run}", f"--out={tmp_path / 'a'}",
                 "--step=99")
    expect_error(capsys, "--out is required", f"--workdir={gpt2_run}")
    expect_error(capsys, "matches no Hugging Face family", f"--workdir={gpt2_run}", f"--out={tmp_path / 'b'}",
                 "--config.model.norm=rmsnorm")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((gpt2_run / "config.json").read_text())
    expect_error(capsys, "no checkpoint", f"--workdir={empty}", f"--out={tmp_path / 'c'}")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))
