"""`jaxlm bench --mode=decode`: jaxlm's KV-cache decoding next to transformers' generate().

Same model (the GPT-2 shape of benchmarks/peers/peer_hf_torch.py: 6 layers, d_model 384,
6 heads, d_ff 1536, vocab 8192, 256 positions, tied, gelu_tanh), same random weights (jaxlm
exports them and transformers loads the export), same prompts, greedy, the same number of new
tokens (no early stop), fp32, same CPU, in one process. HF runs with torch's default thread
count and with 1 thread (on a busy machine torch's spinning worker threads can make the default
many times slower); jaxlm is compared with the faster. Runs alternate (jaxlm, HF, HF 1 thread,
jaxlm, …) and medians are compared; compiles and first calls are warm-up, not timed.
"""

import statistics
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.errors import UserError
from jaxlm.generate import Generator
from jaxlm.models import Model, ModelConfig

GPT2_BENCH_SHAPE = ModelConfig(vocab_size=8192, num_layers=6, d_model=384, num_heads=6, d_ff=1536, max_len=256,
                               activation="gelu_tanh", norm="layernorm", positions="learned", tie_embeddings=True)


def random_params(cfg: ModelConfig, seed: int = 0):
    """GPT-2-like init (normal 0.02, unit norm scales, zero biases) drawn in numpy: no compile."""
    abstract = nn.unbox(jax.eval_shape(Model(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, a):
        leaf = path[-1].key
        if leaf == "scale":
            return jnp.ones(a.shape, a.dtype)
        if leaf == "bias":
            return jnp.zeros(a.shape, a.dtype)
        return jnp.asarray(rng.normal(0.0, cfg.init_std, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _hf_model(cfg: ModelConfig, params):
    try:
        import torch  # pylint: disable=import-outside-toplevel
        import transformers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise UserError(f"bench --mode=decode compares with transformers + PyTorch, which are not installed "
                        f"({e.name}); pip install torch transformers") from None
    from jaxlm.convert import export_hf  # pylint: disable=import-outside-toplevel
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" is not this benchmark's output.
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(cfg, params, tmp)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    return torch, model


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_bench(batch_sizes: Sequence[int] = (1, 16), prompt_len: int = 64, new_tokens: int = 128,
                 rounds: int = 5, seed: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """tokens/s of jaxlm and of transformers' generate() per batch size (one dict per batch size)."""
    cfg = GPT2_BENCH_SHAPE
    if prompt_len < 1 or new_tokens < 1 or prompt_len + new_tokens > cfg.max_len:
        raise UserError(f"--prompt_len={prompt_len} + --new_tokens={new_tokens} must fit the model's "
                        f"{cfg.max_len} positions (each at least 1)")
    if rounds < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--rounds and every --batch_sizes entry must be at least 1")
    params = random_params(cfg, seed)
    torch, hf = _hf_model(cfg, params)
    generator = Generator(cfg, params)
    thread_counts = sorted({torch.get_num_threads(), 1}, reverse=True)
    log(f"decode bench: GPT-2 shape ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}), "
        f"prompt {prompt_len} tokens, {new_tokens} new tokens, greedy, fp32, {rounds} alternating rounds; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")
    results = []
    for batch in batch_sizes:
        prompts = np.random.default_rng(seed + batch).integers(1, cfg.vocab_size, (batch, prompt_len))
        ids = torch.tensor(prompts)

        def run_jaxlm(prompts=prompts):
            return generator.generate(prompts.tolist(), new_tokens)

        def run_hf(threads: int, ids=ids):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        runners = {"jaxlm": run_jaxlm, **{f"hf_{n}t": (lambda n=n: run_hf(n)) for n in thread_counts}}
        ours, theirs = run_jaxlm(), run_hf(thread_counts[0])  # Warm-up (compiles), and a sanity check.
        agree = float(np.mean(np.asarray(ours) == theirs[:, prompt_len:].numpy()))
        for n in thread_counts[1:]:
            run_hf(n)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):  # jaxlm, HF, HF (1 thread), jaxlm, HF, …
            for name, run in runners.items():
                times[name].append(_seconds(run))
        row = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "greedy_token_agreement": agree}
        for name, ts in times.items():
            row[f"{name}_tokens_per_s"] = batch * new_tokens / statistics.median(ts)
        best_hf = max((k for k in row if k.startswith("hf_")), key=row.get)
        row["speedup_vs_best_hf"] = row["jaxlm_tokens_per_s"] / row[best_hf]
        hf_figures = "   ".join(f"hf generate() {n} thread{'s' if n > 1 else ''} {row[f'hf_{n}t_tokens_per_s']:7.1f}"
                               for n in thread_counts)
        log(f"batch {batch:>3}: jaxlm {row['jaxlm_tokens_per_s']:7.1f} tok/s   {hf_figures}   "
            f"jaxlm/best hf {row['speedup_vs_best_hf']:.2f}x   (medians of {rounds}; greedy tokens identical: "
            f"{agree:.1%})")
        results.append(row)
    torch.set_num_threads(thread_counts[0])
    return results
