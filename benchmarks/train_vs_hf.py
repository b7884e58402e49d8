"""jaxlm's train step against Hugging Face + PyTorch on the same model, alternating on this machine.

For each model (gpt2, bert) and precision (fp32, bf16) it runs, in fresh processes, A B A B ...
for --pairs pairs:

  A  python -m jaxlm bench --mode=train --config=configs/bench/<model>_cpu.py[:bf16] --steps=N
     (its last line is JSON: the median step after the compile and warm-up steps)
  B  python benchmarks/peers/peer_hf_torch.py <model> --dtype fp32|bf16 --steps N
     (2 untimed warm-up steps, then the median of N; bf16 is torch.autocast)

and prints each pair, then a table: median tokens/s of each, the median of the per-pair ratios
jaxlm / peer, and jaxlm's MFU (against the float32 matmul peak it measures, for bf16 too). Compile
time is in neither figure. Ratios from one run are what count: on a shared machine the absolute
figures move with the load.

    .venv/bin/python benchmarks/train_vs_hf.py [--models=gpt2,bert] [--dtypes=fp32,bf16] [--pairs=3]
        [--steps=8] [--xla_flags='--xla_cpu_use_onednn=true'] [--json] [--config.FIELD=VALUE ...]

--xla_flags sets XLA_FLAGS for the jaxlm runs only; --config.* overrides go to every jaxlm run
(they change the model, so the peer no longer matches unless the field is a speed knob such as
model.attention_impl).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "benchmarks", "peers", "peer_hf_torch.py")
MODELS = ("gpt2", "bert")
DTYPES = ("fp32", "bf16")


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def run_jaxlm(model: str, dtype: str, steps: int, warmup: int, xla_flags: str | None,
              overrides: list[str]) -> dict:
    config = f"configs/bench/{model}_cpu.py" + (":bf16" if dtype == "bf16" else "")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    cmd = [sys.executable, "-m", "jaxlm", "bench", "--mode=train", f"--config={config}", f"--steps={steps}",
           f"--warmup={warmup}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": _tail(proc)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_peer(line: str) -> dict:
    """The peer's one line, `key=value` pairs, as numbers where they are numbers."""
    out: dict = {}
    for key, value in re.findall(r"(\w+)=(\S+)", line):
        try:
            out[key] = float(value.rstrip("M"))
        except ValueError:
            out[key] = value
    return out


def run_peer(model: str, dtype: str, steps: int) -> dict:
    proc = subprocess.run([sys.executable, PEER, model, "--dtype", dtype, "--steps", str(steps)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if "tokens_per_s=" in ln]
    if proc.returncode != 0 or not lines:
        return {"error": _tail(proc)}
    return parse_peer(lines[-1])


def summarize(model: str, dtype: str, pairs: list[tuple[dict, dict]]) -> dict:
    ok = [(a, b) for a, b in pairs if "error" not in a and "error" not in b]
    if not ok:
        return {"model": model, "dtype": dtype, "pairs": 0}
    return {
        "model": model, "dtype": dtype, "pairs": len(ok),
        "jaxlm_tokens_per_s": statistics.median(a["tokens_per_s"] for a, _ in ok),
        "peer_tokens_per_s": statistics.median(b["tokens_per_s"] for _, b in ok),
        "ratio": statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in ok),
        "ratios": [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in ok],
        "jaxlm_mfu": statistics.median(a["mfu"] for a, _ in ok),
        "jaxlm_compile_s": statistics.median(a["compile_s"] for a, _ in ok),
        "jaxlm_last_loss": ok[-1][0]["last_loss"], "params": ok[-1][0]["params"],
        "peer_params_m": ok[-1][1].get("params"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: gpt2, bert")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: fp32, bf16")
    parser.add_argument("--pairs", type=int, default=3, help="jaxlm/peer pairs per model and precision")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process (both)")
    parser.add_argument("--warmup", type=int, default=2, help="jaxlm's untimed steps after the compile (the peer: 2)")
    parser.add_argument("--xla_flags", default=None, help="XLA_FLAGS for the jaxlm runs (default: inherited)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args, rest = parser.parse_known_args()
    overrides = [r for r in rest if r.startswith("--config.")]
    if len(overrides) != len(rest):
        parser.error(f"unknown arguments: {' '.join(r for r in rest if r not in overrides)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [m for m in models if m not in MODELS] + [d for d in dtypes if d not in DTYPES]
    if bad or args.pairs < 1 or args.steps < 1:
        parser.error(f"--models from {MODELS}, --dtypes from {DTYPES}, --pairs and --steps >= 1 (got {bad})")

    rows = []
    for model in models:
        for dtype in dtypes:
            pairs = []
            for i in range(args.pairs):
                a = run_jaxlm(model, dtype, args.steps, args.warmup, args.xla_flags, overrides)
                b = run_peer(model, dtype, args.steps)
                pairs.append((a, b))
                if "error" in a or "error" in b:
                    print(f"{model} {dtype} pair {i + 1}: jaxlm {a.get('error', 'ok')} | peer {b.get('error', 'ok')}",
                          flush=True)
                    continue
                print(f"{model} {dtype} pair {i + 1}: jaxlm {a['tokens_per_s']:,.0f} tok/s "
                      f"(step {a['step_s_median'] * 1e3:.0f} ms, loss {a['last_loss']:.4f}, MFU {100 * a['mfu']:.1f}%)"
                      f" | peer {b['tokens_per_s']:,.0f} tok/s (step {b['median_step_s'] * 1e3:.0f} ms)"
                      f" | ratio {a['tokens_per_s'] / b['tokens_per_s']:.2f}x", flush=True)
            rows.append(summarize(model, dtype, pairs))

    print(f"\n{'model':<6} {'dtype':<5} {'pairs':>5} {'jaxlm tok/s':>12} {'peer tok/s':>11} {'jaxlm/peer':>11} "
          f"{'jaxlm MFU*':>11}")
    for r in rows:
        if not r["pairs"]:
            print(f"{r['model']:<6} {r['dtype']:<5} {0:>5}  (every pair failed)")
            continue
        print(f"{r['model']:<6} {r['dtype']:<5} {r['pairs']:>5} {r['jaxlm_tokens_per_s']:>12,.0f} "
              f"{r['peer_tokens_per_s']:>11,.0f} {r['ratio']:>10.2f}x {100 * r['jaxlm_mfu']:>10.1f}%")
    print("medians over the pairs; the ratio is the median of the per-pair ratios; *MFU against the "
          "float32 matmul peak jaxlm measures (bf16 rows too)")
    if args.json:
        print(json.dumps({"xla_flags": args.xla_flags, "overrides": overrides, "steps": args.steps, "rows": rows}))
    return 0 if all(r["pairs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
