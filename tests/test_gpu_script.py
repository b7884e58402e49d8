"""benchmarks/gpu_h200.py's CPU dry run: the GPU session's whole sequence (train-step rows, a
CPU-trained run evaluated on the CPU and on "the device", generate) with tiny shapes, so the
script is known to work before an H200's minutes are spent on it."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_script_dry_run_completes_with_every_row_and_equal_eval_losses(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # One CPU device, as one GPU: the rows' mesh is 1 x 1 x 1.
    # Row 3 (cuDNN attention mapped to XLA on a CPU, chunked loss): the row most unlike the plain
    # bench tests, which cover the plain loss and decode.
    proc = subprocess.run([sys.executable, "benchmarks/gpu_h200.py", "--dry_run", f"--out={out}", "--variants=3",
                           "--skip_decode"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    rows = results["train"]
    assert [r["variant"] for r in rows] == ["cudnn attention, chunked loss, remat dots_no_batch"]
    for r in rows:
        assert r["exit"] == 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1, r
    evals = results["eval"]
    assert evals["within_tolerance"] and abs(evals["cpu"] - evals["device"]) <= 1e-4
    assert evals["cpu"] > 0
    assert evals["generate_exit"] == 0 and evals["generated"].startswith("ROMEO:")
    assert "| variant | tokens/s |" in (out / "results.md").read_text()
