"""`jaxlm aot`: the real train step compiled for TPU topologies on this CPU machine (libtpu).

The training recipes are compiled for the topology their docstrings name, at their defaults
(batch, sequence length, gradient accumulation, chunked loss, remat, splash attention): GPT-2
small on v5e:2x2, Llama 1B on v5p:2x2x2; then a model too big for v5e:2x2. They run as
`python -m jaxlm aot` subprocesses started together, so they share the CI machine's cores; each
test waits for its own. The scaling sweep's largest run (configs/scaling_c4_tpu.py, 27.08 of 95
GiB on v5p:2x2x2) is left to the command in its docstring: another 80 s would take the suite
past its 25 minutes on the 2-core CI machine.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxlm import aot, hlo_analysis, tpu_topology
from jaxlm import config as config_lib
from jaxlm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3

RUNS = {
    "gpt2": ["--config=configs/gpt2_small.py", "--topology=v5e:2x2"],
    "llama": ["--config=configs/llama_1b.py", "--topology=v5p:2x2x2"],
    # ~10B parameters, replicated (data parallel): far beyond a v5e's 16 GiB.
    "too_big": ["--config=configs/gpt2_small.py", "--topology=v5e:2x2", "--config.global_batch_size=8",
                "--config.seq_len=128", "--config.grad_accum_steps=1", "--config.model.d_model=8192", "--config.model.num_heads=64",
                "--config.model.d_ff=32768"],
    "bad_topology": ["--config=configs/gpt2_small.py", "--topology=v5e:3x3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (returncode, stdout, stderr, JSON report) of `python -m jaxlm aot` with RUNS[name].

    All runs start together at first use, so they share the cores; under pytest-xdist, whose
    workers would each start all of them, a run starts only when its test asks for it.
    """
    tmp = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    # The program users compile: without the suite's XLA:CPU optimisation level (conftest).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_backend_optimization_level="))
    procs, done = {}, {}

    def start(name):
        if name not in procs:
            with open(tmp / f"{name}.out", "w") as stdout, open(tmp / f"{name}.err", "w") as stderr:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "jaxlm", "aot", *RUNS[name], f"--json_out={tmp / f'{name}.json'}"],
                    cwd=REPO, env=env, stdout=stdout, stderr=stderr)

    def result(name):
        if name not in done:
            for other in ([name] if "PYTEST_XDIST_WORKER" in os.environ else RUNS):
                start(other)
            returncode = procs[name].wait(timeout=900)
            out = tmp / f"{name}.json"
            report = json.loads(out.read_text()) if out.exists() else None
            done[name] = (returncode, (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text(), report)
        return done[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_fits(rc, stdout, stderr, report, hbm_gib):
    assert rc == 0, stderr[-3000:]
    assert report["fits"] and "FITS" in stdout
    for step in ("train", "eval"):
        mem = report["memory"][step]
        assert mem["arguments"] > 0 and mem["temporaries"] > 0 and mem["generated_code"] > 0, mem
        assert 0 < mem["total"] < hbm_gib * GIB, mem
    train = report["memory"]["train"]
    # The donated train state is aliased into its outputs, and counted once.
    assert train["aliased"] > 0.9 * train["outputs"]
    assert train["total"] == (train["arguments"] + train["outputs"] - train["aliased"] + train["temporaries"]
                              + train["generated_code"])


def check_flops(report, num_layers):
    flops, batch = report["flops"], report["batch"]
    model = flops["analytic_model_per_step"]
    compiled = flops["compiled_per_step"]
    assert compiled, flops["method"]
    # Loops: gradient accumulation (the micro-batches), the scanned layers (one forward, one
    # backward loop, each run num_layers times) and the loss chunks of each micro-batch; XLA's
    # own figure counts each body once, so it is far below the weighted one.
    # (XLA may peel an iteration out of a loop: it is then counted outside it.)
    layers = set(range(num_layers - 2, num_layers + 1))
    chunks = batch["tokens_per_step"] // batch["grad_accum_steps"] // max(batch["loss_chunk_size"], 1)
    allowed = layers | {batch["grad_accum_steps"], chunks}
    # XLA's own loops around one matmul (libtpu splits an FSDP all-gather over the matmul, in
    # windows) are named after that dot_general and may run any number of times.
    trips = [loop["trips"] for loop in flops["loops"] if not loop["op"].endswith("/dot_general")]
    assert sum(t in layers for t in trips) >= 2 and all(t in allowed for t in trips), (flops["loops"], allowed)
    assert flops["xla_cost_analysis_per_device"] * report["num_devices"] < 0.5 * compiled
    # Compiled vs analytic FLOPs: model FLOPs plus the recomputation that remat, the chunked loss
    # and splash's backward kernels add (quantified analytically); the rest is elementwise work
    # (norms, softmax, the optimizer update).
    hardware = flops["analytic_hardware_per_step"]
    assert hardware > model and abs(compiled / hardware - 1) < 0.05, (compiled, hardware)
    assert compiled >= hardware * 0.995  # The matmuls are all there.


def check_splash(report):
    assert report["model"]["attention_impl"] == "splash"  # "auto" on a TPU.
    kinds = {name.split("_")[2] for name in report["splash_kernels"]}
    assert kinds == {"fwd", "dq", "dkv"}, report["splash_kernels"]


def test_gpt2_small_on_v5e_2x2(runs):
    rc, stdout, stderr, report = runs("gpt2")
    check_fits(rc, stdout, stderr, report, hbm_gib=16)
    assert report["num_devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["model"]["params"] == 124_475_904  # GPT-2 small, padded vocabulary (50,304).
    assert report["batch"]["grad_accum_steps"] == 8 and report["batch"]["tokens_per_step"] == 512 * 1024
    check_flops(report, num_layers=12)
    check_splash(report)
    # Pure data parallel: gradients are all-reduced, nothing is gathered.
    coll = report["collectives"]
    assert coll["all-reduce"]["executed"] > 0 and coll["all-reduce"]["bytes_per_step"] > 0
    assert coll["all-gather"]["bytes_per_step"] < 0.1 * coll["all-reduce"]["bytes_per_step"]


def test_llama_1b_on_v5p_2x2x2(runs):
    rc, stdout, stderr, report = runs("llama")
    check_fits(rc, stdout, stderr, report, hbm_gib=95)
    assert report["num_devices"] == 8 and report["device_kind"] == "TPU v5"
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["model"]["params"] == 1_235_814_400
    # fp32 params + two Adam moments = 12 bytes per parameter, sharded 8 ways (FSDP), donated.
    state = 12 * report["model"]["params"] / 8
    assert report["state_bytes_per_device"] == pytest.approx(state, rel=0.01)
    assert state <= report["memory"]["train"]["arguments"] < state * 1.05
    assert report["batch"]["grad_accum_steps"] == 4 and report["batch"]["tokens_per_step"] == 512 * 2048
    check_flops(report, num_layers=16)
    check_splash(report)
    # FSDP: each layer's weights are gathered inside the scanned loops (forward and backward) and
    # the gradients reduced back to their shards. libtpu picks the ops (on 8 chips: all-gathers
    # and all-reduces; at 64 chips it gathers with all-reduces too), so count them together: at
    # least 2 per layer, moving at least the bf16 layer weights once.
    coll = report["collectives"]
    kinds = ("all-gather", "all-reduce", "reduce-scatter")
    assert sum(coll[k]["executed"] for k in kinds) >= 2 * 16, coll
    assert coll["all-gather"]["executed"] + coll["reduce-scatter"]["executed"] > 0, coll
    layer_params = report["model"]["params"] - 128_256 * 2048  # All but the (tied) embedding.
    assert sum(coll[k]["bytes_per_step"] for k in kinds) >= 2 * layer_params * 7 / 8, coll


def test_does_not_fit_exits_3(runs):
    rc, stdout, stderr, report = runs("too_big")
    assert rc == aot.EXIT_DOES_NOT_FIT, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("jaxlm: error:")]
    assert len(lines) == 1 and "does not fit on v5e:2x2" in lines[0] and "16 GiB" in lines[0], stderr
    assert report["fits"] is False and "DOES NOT FIT" in stdout
    assert report["state_bytes_per_device"] > 16 * GIB  # 12 bytes x 10B params, replicated.


def test_bad_topology_is_a_user_error(runs):
    rc, _, stderr, _ = runs("bad_topology")
    assert rc == 2
    assert "--topology=v5e:3x3" in stderr and "v5p:2x2x2" in stderr, stderr


def test_topology_names():
    assert tpu_topology.parse_topology("v5p:2x2x2") == ("v5p", "2x2x2")
    assert tpu_topology.parse_topology("V5E:2x4") == ("v5e", "2x4")
    for bad in ("v5p-16", "tpu:2x2", "v5e", ""):
        with pytest.raises(UserError, match="--topology"):
            tpu_topology.parse_topology(bad)


def test_vocab_size_and_slices_are_checked():
    config = config_lib.load_config("configs/gpt2_small.py:runlocal")  # vocab_size=0: from the tokenizer.
    with pytest.raises(UserError, match="--config.model.vocab_size"):
        aot.prepare_config(config, 1)
    config.model.vocab_size = 256
    assert aot.prepare_config(config, 2).mesh.dcn_data == 2
    assert config.mesh.dcn_data == 1  # The caller's config is left alone.
    config.mesh.dcn_data = 2
    with pytest.raises(UserError, match="--num_slices=4"):
        aot.prepare_config(config, 4)


def test_loop_weighted_flops_match_an_unrolled_program():
    """The HLO re-analysis on a CPU program: a scanned matmul counts once per iteration."""
    w = jnp.ones((6, 128, 128), jnp.float32)
    x = jnp.ones((32, 128), jnp.float32)

    def scanned(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    def unrolled(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x

    scan_c = jax.jit(scanned).lower(w, x).compile()
    unrolled_c = jax.jit(unrolled).lower(w, x).compile()
    program = hlo_analysis.HloProgram(scan_c.as_text())
    weighted, loops = hlo_analysis.loop_weighted_flops(program)
    assert [loop["trips"] for loop in loops] == [6]
    matmuls = 6 * 2 * 32 * 128 * 128
    assert matmuls <= weighted < 1.05 * matmuls
    cost = unrolled_c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert weighted == pytest.approx(cost["flops"], rel=0.02)


def test_multiline_kernel_attributes_are_stripped_and_splash_flops_counted():
    """A Mosaic kernel's frontend_attributes span lines and hold braces inside quoted JSON."""
    line = ('  %splash_mha_dq_no_residuals.1 = (f32[4,256,64]{2,1,0}, bf16[4,12,256,64]{3,2,1,0}) custom-call('
            '%a, %b, %q, %k, %v), custom_call_target="tpu_custom_call", operand_layout_constraints={'
            's8[1,1,1]{2,1,0}, s8[1,1,1]{2,1,0}, bf16[4,12,256,64]{3,2,1,0}, bf16[4,12,512,64]{3,2,1,0}, '
            'bf16[4,12,512,64]{3,2,1,0}}, frontend_attributes={kernel_metadata={\n'
            '"xprof_metadata":"{\\"block_q\\": 256, \\"note\\": \\"}}{\\"}"\n'
            '}}, metadata={op_name="x"}')
    stripped = hlo_analysis.strip_attribute(line, "frontend_attributes")
    assert "\n" not in stripped and stripped.endswith(', metadata={op_name="x"}')
    assert "kernel_metadata" not in stripped
    # dq: 3 matmuls of 2 x (4 x 12 x 256 x 64 query elements) x 512 keys.
    assert hlo_analysis.kernel_flops(stripped) == 3 * 2 * (4 * 12 * 256 * 64) * 512
    assert hlo_analysis.kernel_flops(stripped.replace("splash_mha_dq", "fusion")) == 0
