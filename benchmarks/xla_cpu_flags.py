"""Which XLA:CPU flags make jaxlm's train step faster on this machine.

Runs `jaxlm bench --mode=train` of a recipe once per flag set, in rounds (A B C ... A B C ...), in
fresh processes (XLA reads XLA_FLAGS once per process), and prints each set's median step time
and its ratio to the default. jaxlm sets only the flags a run of this script shows to help.

    .venv/bin/python benchmarks/xla_cpu_flags.py [--config=configs/tiny_shakespeare.py] [--rounds=3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_graph_fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    # AVX-512 hosts: LLVM's loops at 512-bit vectors (XLA's default prefers 256).
    "vector_512": "--xla_cpu_prefer_vector_width=512",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    # YNNPACK (jaxlib 0.10's default dot library on x86) for dots only, or for elementwise and reductions too.
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "ynn_dot_eltwise_reduce": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,"
                              "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
}


def one_run(config: str, flags: str, steps: int, extra: list[str]) -> dict:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Each flag set compiles its own program.
    proc = subprocess.run([sys.executable, "-m", "jaxlm", "bench", "--mode=train", f"--config={config}",
                           f"--steps={steps}", *extra], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_shakespeare.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated flag-set names (default: all)")
    args, extra = parser.parse_known_args()
    names = [n for n in FLAG_SETS if not args.only or n in args.only.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            out = one_run(args.config, FLAG_SETS[name], args.steps, extra)
            results[name].append(out)
            shown = f"{out['step_s_median'] * 1e3:.1f} ms" if "error" not in out else out["error"]
            print(f"round {r + 1} {name}: {shown}", flush=True)
    base = statistics.median(o["step_s_median"] for o in results["default"]) if "default" in results else None
    print(f"\n{'flags':<22} {'median step':>12} {'vs default':>11} {'last loss':>10}")
    for name in names:
        ok = [o for o in results[name] if "error" not in o]
        if not ok:
            print(f"{name:<22} {'failed':>12}  {results[name][0]['error']}")
            continue
        med = statistics.median(o["step_s_median"] for o in ok)
        ratio = f"{base / med:.2f}x" if base else "-"
        print(f"{name:<22} {med * 1e3:>9.1f} ms {ratio:>11} {ok[-1]['last_loss']:>10.4f}")


if __name__ == "__main__":
    main()
