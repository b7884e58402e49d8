"""KV-cache generation: greedy decoding equals greedy decoding by full forward passes, token for
token, for a left-padded batch of prompts of different lengths; sampling filters; EOS; one
compile per shape; no warning when the cache grows; streamed text in prompt order; the
`jaxlm generate` command and its user errors."""

import json
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_llama_config
from jaxlm import cli
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.generate import CACHE_GROWTH, Generator, Sampling, TextStream, greedy, left_pad, next_token, read_prompts
from jaxlm.errors import UserError
from jaxlm.models import Model

CONFIG = "configs/tiny_shakespeare.py"
NEW = 64
PROMPTS = [[3, 17, 5], [9, 4, 4, 21, 30, 2, 11, 8, 6, 40, 12], [7, 7, 1, 33, 60, 15]]
VALID_VOCAB = 90  # of 96: the last ids are vocab padding and must never be produced


def random_params(model: Model, seed: int = 0):
    """Params of init's tree drawn in numpy (no compile); large enough for well-separated logits."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, a):
        x = rng.normal(0.0, 0.3, a.shape) + (1.0 if path[-1].key == "scale" else 0.0)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def greedy_by_full_forward(cfg, params, prompts, new_tokens, valid_vocab):
    """Each step runs the whole sequence through the model (no cache) and takes the argmax at the
    last real token. Prompts are left-padded to one length, so the tokens so far always end at
    column P + t; the columns after it are causally invisible. One compile for all steps."""
    model = Model(cfg)
    prompt_len = max(len(p) for p in prompts)
    tokens, mask, _ = left_pad(prompts, prompt_len)
    tokens = np.concatenate([tokens, np.zeros((len(prompts), new_tokens), np.int32)], 1)
    mask = np.concatenate([mask, np.ones((len(prompts), new_tokens), np.bool_)], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)

    @jax.jit
    def logits_at(tokens, column):
        logits = model.apply({"params": params}, tokens, positions=positions, padding_mask=mask)
        return jax.lax.dynamic_index_in_dim(logits, column, 1, keepdims=False)

    out = []
    for t in range(new_tokens):
        logits = np.array(logits_at(tokens, prompt_len + t - 1))
        logits[:, valid_vocab:] = -np.inf
        chosen = logits.argmax(-1)
        out.append(chosen)
        if t + 1 < new_tokens:
            tokens[:, prompt_len + t] = chosen
    return np.stack(out, 1).tolist()


@pytest.mark.parametrize("make_cfg", [
    lambda: tiny_config(vocab_size=96, max_len=96, activation="gelu_tanh"),
    lambda: tiny_llama_config(vocab_size=96, max_len=96),
    lambda: tiny_llama_config(vocab_size=96, max_len=96, scan_layers=False),
], ids=["gpt2-scan", "llama-gqa-scan", "llama-gqa-unrolled"])
def test_greedy_kv_cache_equals_full_forward_every_step(make_cfg):
    cfg = make_cfg()
    params = random_params(Model(cfg))
    generator = Generator(cfg, params, valid_vocab=VALID_VOCAB)
    cached = generator.generate(PROMPTS, NEW)
    reference = greedy_by_full_forward(cfg, params, PROMPTS, NEW, VALID_VOCAB)
    assert [len(r) for r in cached] == [NEW] * len(PROMPTS)
    for row, (got, want) in enumerate(zip(cached, reference)):
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert first is None, f"prompt {row}: first difference at new token {first}"
    assert max(max(r) for r in cached) < VALID_VOCAB
    assert len({tuple(r) for r in cached}) == len(PROMPTS), "different prompts should continue differently"


@pytest.fixture(scope="module")
def gpt2_generator():
    cfg = tiny_config(vocab_size=96, max_len=96, activation="gelu_tanh")
    return Generator(cfg, random_params(Model(cfg), seed=1), valid_vocab=VALID_VOCAB)


def test_prefill_and_step_compile_once_per_shape(gpt2_generator):
    gpt2_generator.generate(PROMPTS, 8)
    gpt2_generator.generate([p[::-1] for p in PROMPTS], 8)  # same batch, lengths in the same bucket
    prefill, step = gpt2_generator._fns[Sampling()]  # pylint: disable=protected-access
    assert prefill._cache_size() == 1 and step._cache_size() == 1  # pylint: disable=protected-access


def test_generation_stops_at_eos(gpt2_generator):
    free = gpt2_generator.generate(PROMPTS[:1], 24)[0]
    eos = free[5]
    seen = []
    stopped = gpt2_generator.generate(PROMPTS[:1], 24, eos_id=eos, on_tokens=lambda t, done: seen.append(int(t[0])))
    assert stopped[0] == free[:free.index(eos)]
    assert len(seen) == free.index(eos) + 1, "decoding goes on no further than the EOS token"


def test_growing_the_cache_warns_nothing(gpt2_generator):
    """A batch of 4 (a shape no other test compiles, so everything lowers here) past two cache
    growths: no warning (jax warns when a donated buffer cannot be reused, e.g. by a grown cache)."""
    prompts = PROMPTS + [[5, 6]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = gpt2_generator.generate(prompts, 2 * CACHE_GROWTH + 8)
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert rows[:3] == gpt2_generator.generate(PROMPTS, 2 * CACHE_GROWTH + 8), "the extra row changes no other row"


def test_sampling_filters():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4, 96)), jnp.float32)
    greedy = next_token(logits, jax.random.key(0), Sampling(), VALID_VOCAB)
    assert (greedy == jnp.argmax(logits[:, :VALID_VOCAB], -1)).all()
    for sampling in (Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
        assert (next_token(logits, jax.random.key(1), sampling, VALID_VOCAB) == greedy).all()
    top3 = set(np.argsort(-np.asarray(logits[0, :VALID_VOCAB]))[:3].tolist())
    draws = {int(next_token(logits, jax.random.key(s), Sampling(temperature=5.0, top_k=3), VALID_VOCAB)[0])
             for s in range(40)}
    assert draws <= top3 and len(draws) > 1
    hot = [int(next_token(logits, jax.random.key(s), Sampling(temperature=100.0), VALID_VOCAB)[0]) for s in range(200)]
    assert max(hot) < VALID_VOCAB, "vocab padding is never sampled"


def test_greedy_is_argmax_with_its_ties_nans_and_infinities():
    rows = np.random.default_rng(1).normal(0, 1, (6, 40)).astype(np.float32)
    rows[1, [7, 3, 30]] = 9.0  # a tie: the first maximum
    rows[2, [12, 5]] = np.nan  # a NaN counts as the maximum, the first one
    rows[3] = -np.inf  # all masked
    rows[4, 20:] = -np.inf
    rows[5, 0] = np.inf
    got = np.asarray(jax.jit(greedy)(jnp.asarray(rows)))
    assert got.dtype == np.int32 and got.tolist() == np.asarray(jnp.argmax(jnp.asarray(rows), -1)).tolist()
    assert got[1:4].tolist() == [3, 5, 0]


def test_sampling_is_seeded(gpt2_generator):
    sampling = Sampling(temperature=1.0, top_p=0.9)
    a = gpt2_generator.generate(PROMPTS, 16, sampling, seed=3)
    assert a == gpt2_generator.generate(PROMPTS, 16, sampling, seed=3)
    assert a != gpt2_generator.generate(PROMPTS, 16, sampling, seed=4)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(["x", "y"]))
    assert read_prompts(None, str(tmp_path / "p.txt")) == ["one", "two"]
    assert read_prompts("first", str(tmp_path / "p.jsonl")) == ["first", "a", "b"]
    assert read_prompts(None, str(tmp_path / "p.json")) == ["x", "y"]
    with pytest.raises(UserError, match="unknown format"):
        read_prompts(None, str(tmp_path / "p.csv"))


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gen_run"))
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert cli.main(["train", f"--config={CONFIG}:runlocal", f"--workdir={workdir}",
                     f"--config.data.data_dir={data_dir}",
                     "--config.steps=2", "--config.checkpoint_every=1", "--config.eval_batches=1",
                     "--config.mesh.data=8"]) == 0
    return workdir


def generate(capsys, *args):
    code = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_command_greedy_and_sampled(capsys, run_dir):
    code, out, err = generate(capsys, f"--workdir={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=12")
    assert code == 0, err
    assert out.startswith("ROMEO:") and out.endswith("\n")
    assert generate(capsys, f"--workdir={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=12")[1] == out
    prompts = os.path.join(run_dir, "..", "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write('{"prompt": "KING:"}\n{"prompt": "First Citizen:"}\n')
    code, out, err = generate(capsys, f"--workdir={run_dir}", f"--prompts_file={prompts}", "--num_samples=2",
                              "--temperature=0.9", "--top_k=40", "--top_p=0.95", "--seed=1", "--max_new_tokens=8",
                              "--step=1")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[0", "[1", "[2", "[3"], out  # in prompt order
    assert {line.split("] ")[1][:5] for line in lines} == {"KING:", "First"}


def test_text_stream_prints_sequences_in_order(run_dir):
    """Rows finish out of order (2, then 0, then 1 at the token limit): the blocks come in index
    order, the first streams token by token, and the others are written whole once it ends."""
    tokenizer = load_tokenizer("bpe", run_dir)
    eos = tokenizer.eos_token_id
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" fair", " Verona", " lies")]
    steps = [  # one column per row; eos ends a row, and what follows it is ignored
        [words[0][0], words[1][0], words[2][0]],
        [words[1][0], words[0][0], eos],
        [eos, words[2][0], words[0][0]],
        [words[0][0], words[1][0], words[1][0]],
    ]
    writes: list[str] = []
    stream = TextStream(tokenizer, ["A:", "B:", "C:"], eos, writes.append)
    seen = []
    for step in steps:
        stream(np.asarray(step), np.zeros(3, bool))
        seen.append("".join(writes))
    stream.close()
    fair, verona, lies = (tokenizer.decode(w[:1]) for w in words)
    assert seen == [f"[0] A:{fair}", f"[0] A:{fair}{verona}", f"[0] A:{fair}{verona}\n[1] B:{verona}{fair}{lies}",
                    f"[0] A:{fair}{verona}\n[1] B:{verona}{fair}{lies}{verona}"]
    assert "".join(writes) == (f"[0] A:{fair}{verona}\n[1] B:{verona}{fair}{lies}{verona}\n"
                               f"[2] C:{lies}\n")

    writes.clear()  # One sequence: streamed token by token, without a label.
    stream = TextStream(tokenizer, ["ROMEO:"], eos, writes.append)
    for token in words[0] + words[1]:
        stream(np.asarray([token]), np.zeros(1, bool))
    stream(np.asarray([eos]), np.zeros(1, bool))
    stream.close()
    assert writes == ["ROMEO:"] + [tokenizer.decode([t]) for t in words[0] + words[1]] + ["\n"]


@pytest.mark.parametrize("args,needle", [
    (["--prompt=" + "word " * 400], "the model's context"),
    (["--prompts_file=prompts.csv"], "unknown format"),
    (["--prompt=hi", "--step=7"], "--step=7: no such checkpoint"),
    (["--prompt=hi", "--top_p=0"], "--top_p=0.0"),
], ids=["prompt-too-long", "prompt-file-format", "missing-step", "bad-top-p"])
def test_generate_user_errors(capsys, run_dir, args, needle):
    code, out, err = generate(capsys, f"--workdir={run_dir}", *args)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("jaxlm: error: ") and needle in lines[-1], err[-2000:]


def test_generate_without_checkpoint(capsys, tmp_path, run_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = generate(capsys, f"--workdir={empty}", "--prompt=hi")
    assert code == 2 and "config.json not found" in err.strip().splitlines()[-1]
    (empty / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    code, _, err = generate(capsys, f"--workdir={empty}", "--prompt=hi")
    assert code == 2 and "no checkpoint" in err.strip().splitlines()[-1]
