"""Decoding variants side by side in one process: the greedy pick and the KV-cache growth step.

    python benchmarks/decode_variants.py [--rounds=9] [--batch_sizes=16,1]

The model, prompts and token counts of `jaxlm bench --mode=decode` (GPT-2 shape, 64-token
prompts, 128 new tokens, fp32). For each batch size, Generators that differ in one thing each
decode the same prompts in turn (round robin, compiles and first calls untimed), and the median
tokens/s of each is printed with its ratio to jaxlm's shipped choice (first, the greedy pick
alone on a [16, vocab] logits array):

  greedy   jnp.argmax (the variadic reduce) against jaxlm.generate.greedy (a max, then a min
           over the positions that hold it)
  growth   generate.CACHE_GROWTH at 16 and 64 slots against the shipped 32 (a smaller step reads
           fewer empty slots but compiles the decode step more often: the compiles are not timed)

Every variant must produce the same greedy tokens (checked). On a shared machine only the ratios
within one run mean anything.
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch_sizes", default="16,1")
    args = parser.parse_args()

    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jaxlm import generate  # pylint: disable=import-outside-toplevel
    from jaxlm.bench import GPT2_BENCH_SHAPE, random_params  # pylint: disable=import-outside-toplevel

    cfg, shipped_greedy, shipped_growth = GPT2_BENCH_SHAPE, generate.greedy, generate.CACHE_GROWTH
    params = random_params(cfg)

    def argmax(logits):
        return jnp.argmax(logits, -1).astype(jnp.int32)

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((16, cfg.vocab_size), np.float32))
    for name, pick in (("jaxlm.generate.greedy", shipped_greedy), ("jnp.argmax", argmax)):
        print(f"the pick alone, [16, {cfg.vocab_size}] logits: {name:22s} {pick_ms(pick, logits, args.rounds):.3f} ms "
              f"a call (median of {args.rounds} x 200, dispatch included)", flush=True)

    # name -> (greedy function, cache growth); the first is the shipped choice.
    variants = {"shipped (greedy, growth 32)": (shipped_greedy, shipped_growth),
                "jnp.argmax": (argmax, shipped_growth),
                "growth 16": (shipped_greedy, 16), "growth 64": (shipped_greedy, 64)}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = np.random.default_rng(batch).integers(1, cfg.vocab_size, (batch, 64)).tolist()
        generators, reference = {}, None
        for name, (pick, growth) in variants.items():
            generate.greedy, generate.CACHE_GROWTH = pick, growth  # read when the step is traced / run
            generators[name] = generate.Generator(cfg, params)
            rows = generators[name].generate(prompts, 128)  # compiles every cache size
            reference = reference or rows
            if rows != reference:
                print(f"{name}: other greedy tokens than the shipped decoder", file=sys.stderr)
                return 1
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, generator in generators.items():
                generate.CACHE_GROWTH = variants[name][1]
                start = time.perf_counter()
                generator.generate(prompts, 128)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[next(iter(variants))])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            print(f"batch {batch:3d}  {name:28s} {batch * 128 / median:8.1f} tok/s  {base / median:6.3f}x "
                  f"(median of {args.rounds}; same tokens)", flush=True)
    generate.greedy, generate.CACHE_GROWTH = shipped_greedy, shipped_growth
    return 0


def pick_ms(pick, logits, rounds: int) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    fn = jax.jit(pick)
    fn(logits).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(200):
            out = fn(logits)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / 200 * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
