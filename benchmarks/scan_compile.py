"""Compile time of the train step against depth, with and without scan over layers.

Runs `jaxlm bench --mode=train --steps=1 --warmup=0` of one recipe at several `model.num_layers`,
each in a fresh process with no persistent compilation cache (so every run really compiles),
in rounds (4 8 16 32, 4 8 16 32, ...), and prints each depth's median compile time and its ratio
to the shallowest. With `model.scan_layers=True` (the default) XLA compiles one layer body and
loops over it, so the ratio should stay near 1; `--unrolled` adds the same depths with
`scan_layers=False` for contrast.

    .venv/bin/python benchmarks/scan_compile.py [--config=configs/bench/gpt2_cpu.py] [--layers=4,8,16,32]
        [--rounds=2] [--unrolled]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def compile_seconds(config: str, layers: int, scan: bool, extra: list[str]) -> float:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # A cache hit would time a file read, not a compile.
    command = [sys.executable, "-m", "jaxlm", "bench", "--mode=train", f"--config={config}", "--steps=1",
               "--warmup=0", f"--config.model.num_layers={layers}", f"--config.model.scan_layers={scan}", *extra]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["compile_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench/gpt2_cpu.py")
    parser.add_argument("--layers", default="4,8,16,32", help="comma-separated depths (default: 4,8,16,32)")
    parser.add_argument("--rounds", type=int, default=2, help="timed compiles of each depth (default: 2)")
    parser.add_argument("--unrolled", action="store_true", help="also compile with scan_layers=False")
    args, extra = parser.parse_known_args()
    depths = [int(n) for n in args.layers.split(",")]
    modes = [True, False] if args.unrolled else [True]
    times: dict[tuple[bool, int], list[float]] = {(s, n): [] for s in modes for n in depths}
    for r in range(args.rounds):
        for scan in modes:
            for n in depths:
                t = compile_seconds(args.config, n, scan, extra)
                times[(scan, n)].append(t)
                print(f"round {r + 1}: {n:>3} layers, scan_layers={scan}: compile {t:.2f} s", flush=True)
    print(f"\n{'layers':>6} {'scan_layers':>12} {'median compile':>15} {'vs ' + str(depths[0]) + ' layers':>12}")
    summary = {}
    for scan in modes:
        base = statistics.median(times[(scan, depths[0])])
        for n in depths:
            med = statistics.median(times[(scan, n)])
            summary[f"{'scan' if scan else 'unrolled'}_{n}"] = round(med, 3)
            print(f"{n:>6} {str(scan):>12} {med:>13.2f} s {med / base:>11.2f}x")
    print(json.dumps({"config": args.config, "rounds": args.rounds, "compile_s_median": summary}))


if __name__ == "__main__":
    main()
