"""Input pipeline throughput against what the demo's train step consumes, in one run.

    .venv/bin/python benchmarks/data_throughput.py                # 2 workers, 200 batches, 3 rounds
    .venv/bin/python benchmarks/data_throughput.py --workers=0 --batches=100

(a) The pipeline alone: the demo recipe's data (configs/tiny_shakespeare.py, resolved as
`jaxlm train` resolves it: jaxlm.resolve.resolve_run, so build_lm_data with the stream loader)
with data.num_workers=--workers; after --warmup batches, --rounds rounds of --batches batches
each, tokens/s = global_batch_size x seq_len per batch. Nothing consumes the batches but this
loop, so this is what the loader can supply. The iterator is closed before (b).
(b) The train step: the same resolved config's Trainer and CompiledSteps (jaxlm/train.py's),
on synthetic batches of the config's shapes (random tokens, weights 1), after the compile and
--step_warmup steps; --rounds rounds of --steps steps, each batch put on the mesh with
sharding.to_global as the loop does; tokens/s of the step.

Prints both medians and pipeline / step; the goal is >= 20x. The data is prepared into a fresh
data_dir under --scratch (or --data_dir) and the BPE trained into a scratch workdir: neither
is timed. Extra `--config.FIELD=VALUE` arguments override the recipe. A table, then one JSON line.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GOAL_RATIO = 20.0


def pipeline_rounds(train_iter, tokens_per_batch: int, warmup: int, batches: int, rounds: int) -> list[float]:
    for _ in range(warmup):
        next(train_iter)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batches):
            next(train_iter)
        rates.append(batches * tokens_per_batch / (time.perf_counter() - start))
    return rates


def step_rounds(config, mesh, warmup: int, steps_per_round: int, rounds: int, seed: int) -> tuple[list[float], float]:
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from jaxlm import sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import CompiledSteps, Trainer  # pylint: disable=import-outside-toplevel

    trainer = Trainer(config, mesh)
    rng = np.random.default_rng(seed)
    spec = trainer.task.batch_spec(config)

    def synthetic():
        batch = {}
        for key, s in spec.items():
            if key == "weights":
                batch[key] = np.ones(s.shape, s.dtype)
            else:  # Token ids (inputs, targets); segment ids only with segmented packing.
                high = config.model.vocab_size if key in ("inputs", "targets") else 2
                batch[key] = rng.integers(0, high, s.shape, dtype=np.int64).astype(s.dtype)
        return batch

    batches = [synthetic() for _ in range(4)]
    state = trainer.init_state(config.seed)
    steps = CompiledSteps(trainer)
    start = time.perf_counter()
    steps.compiled_train(sharding.to_global(batches[0], mesh))
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        state, _ = steps.train(state, sharding.to_global(batches[i % len(batches)], mesh))
    jax.block_until_ready(state)
    tokens = config.global_batch_size * config.seq_len
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(steps_per_round):
            state, _ = steps.train(state, sharding.to_global(batches[i % len(batches)], mesh))
        jax.block_until_ready(state)
        rates.append(steps_per_round * tokens / (time.perf_counter() - start))
    return rates, compile_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_shakespeare.py", help="recipe (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="pipeline batches before timing (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches per round (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per round (default: %(default)s)")
    parser.add_argument("--step_warmup", type=int, default=3,
                        help="train steps after the compile, before timing (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each, medians reported (default: %(default)s)")
    parser.add_argument("--data_dir", default="", help="tfds data_dir to prepare into or reuse (default: '' = the scratch folder)")
    parser.add_argument("--scratch", default="",
                        help="folder in which a fresh subfolder holds the workdir (and data_dir) "
                             "(default: '' = the system's temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep that subfolder (default: remove it at the end)")
    args, extra = parser.parse_known_args()
    overrides = {}
    for arg in extra:
        if not arg.startswith("--config.") or "=" not in arg:
            parser.error(f"unknown argument {arg}; only --config.FIELD=VALUE ones override the recipe")
        key, value = arg[len("--config."):].split("=", 1)
        overrides[key] = value
    overrides["data.num_workers"] = str(args.workers)

    sys.path.insert(0, REPO)  # Run from anywhere: the recipe and jaxlm resolve against the repo.
    os.chdir(REPO)
    from jaxlm import compat  # pylint: disable=import-outside-toplevel
    if (platforms := compat.platforms_without_tpu_probe()) is not None:  # As the CLI: no libtpu start-up.
        os.environ["JAX_PLATFORMS"] = platforms
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm import sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.resolve import resolve_run  # pylint: disable=import-outside-toplevel

    if args.scratch:
        os.makedirs(args.scratch, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="jaxlm_throughput_", dir=args.scratch or None)
    overrides["data.data_dir"] = args.data_dir or os.path.join(scratch, "data")
    try:
        config = config_lib.load_recipe(args.config, overrides)
        mesh = sharding.make_mesh(config.mesh)
        start = time.perf_counter()
        run = resolve_run(config, os.path.join(scratch, "run"), mesh)  # Prepares the data, trains the BPE.
        resolve_s = time.perf_counter() - start
        config, data = run.config, run.data
        tokens_per_batch = config.global_batch_size * config.seq_len
        try:
            pipe = pipeline_rounds(data.train_iter, tokens_per_batch, args.warmup, args.batches, args.rounds)
        finally:
            data.train_iter.close()
        step, compile_s = step_rounds(config, mesh, args.step_warmup, args.steps, args.rounds, config.seed)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    pipe_med, step_med = statistics.median(pipe), statistics.median(step)
    ratio = pipe_med / step_med
    print(f"\n{args.config}: global batch {config.global_batch_size} x seq_len {config.seq_len} = {tokens_per_batch} "
          f"tokens; data.num_workers={args.workers}; setup (prepare + BPE) {resolve_s:.1f} s, step compile {compile_s:.1f} s")
    print(f"{'':28} {'tokens/s (median)':>18} {'batches/s':>10}  per round")
    print(f"{'(a) input pipeline alone':28} {pipe_med:18,.0f} {pipe_med / tokens_per_batch:10.1f}  "
          + " ".join(f"{r:,.0f}" for r in pipe))
    print(f"{'(b) train step':28} {step_med:18,.0f} {step_med / tokens_per_batch:10.2f}  "
          + " ".join(f"{r:,.0f}" for r in step))
    print(f"pipeline / step: {ratio:.1f}x (goal >= {GOAL_RATIO:g}x: {'met' if ratio >= GOAL_RATIO else 'NOT met'})")
    print(json.dumps({
        "benchmark": "data_throughput", "config": args.config, "workers": args.workers,
        "global_batch_size": config.global_batch_size, "seq_len": config.seq_len,
        "pipeline": {"warmup": args.warmup, "batches": args.batches, "tokens_per_s": [round(r) for r in pipe],
                     "median_tokens_per_s": round(pipe_med)},
        "train_step": {"warmup": args.step_warmup, "steps": args.steps, "compile_s": round(compile_s, 2),
                       "tokens_per_s": [round(r) for r in step], "median_tokens_per_s": round(step_med)},
        "ratio": round(ratio, 2), "goal": GOAL_RATIO, "goal_met": ratio >= GOAL_RATIO,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
