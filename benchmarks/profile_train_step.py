"""Where the time of jaxlm's train step goes on this machine: a jax.profiler trace, summed by op.

    python benchmarks/profile_train_step.py [--config=configs/bench/gpt2_cpu.py] [--steps=3]
        [--top=25] [--trace_dir=DIR] [--config.F=V ...]

Compiles the train step `jaxlm bench --mode=train` times (synthetic batches of the config's
shapes), runs two untimed steps, then --steps under `jax.profiler.trace`, and prints the ops of
the compiled program (XLA:CPU's thunks: fusions, dots, copies) by total time per step, with their
share of the step; then the same time grouped by what the ops belong to: forward or backward
(`transpose(...)` in the op name) and the model's module path from the HLO metadata (layer
indices folded, e.g. `bwd layers/attn/query`). The trace stays in --trace_dir for TensorBoard's or
Perfetto's trace viewer.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench/gpt2_cpu.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace_dir", default="")
    args, rest = parser.parse_known_args(argv)
    overrides = dict(a[len("--config."):].split("=", 1) for a in rest if a.startswith("--config.") and "=" in a)

    import jax  # pylint: disable=import-outside-toplevel
    from jaxlm import config as config_lib, sharding  # pylint: disable=import-outside-toplevel
    from jaxlm.train_bench import synthetic_batch  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import Trainer  # pylint: disable=import-outside-toplevel

    config = config_lib.load_recipe(args.config, overrides)
    trainer = Trainer(config, sharding.make_mesh(config.mesh))
    host_batch = synthetic_batch(trainer.task.batch_spec(config), trainer.model_config.vocab_size, config.seed)
    shardings, _ = trainer.batch_layout(host_batch)
    batch = jax.device_put(host_batch, shardings)
    train = trainer.compile_train(host_batch)
    state = trainer.init_state(config.seed)
    for _ in range(2):
        state, m = train(state, batch)
    jax.block_until_ready(m)

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxlm_profile_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = train(state, batch)
            jax.block_until_ready(m)
    step_s = (time.perf_counter() - start) / args.steps

    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        print(f"no trace.json.gz under {trace_dir}: this jax wrote none", file=sys.stderr)
        return 1
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] / 1e6 / args.steps
            count[e["name"]] += 1
    print(f"step {step_s * 1e3:.0f} ms (under the profiler), {len(total)} event names; top {args.top} by time per step:")
    for name, seconds in total.most_common(args.top):
        print(f"{seconds * 1e3:9.1f} ms {100 * seconds / step_s:5.1f}%  x{count[name] // args.steps:<4} {name[:100]}")
    ops = program_ops(train.as_text())
    groups, ungrouped = collections.Counter(), 0.0
    for name, seconds in total.items():
        if name in ops:
            groups[ops[name]] += seconds
        elif not name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
            ungrouped += seconds
    dots = sum(t for g, t in groups.items() if "dot_general" in g or "conv" in g)
    print(f"\nby module path (forward / backward), top {args.top}; {ungrouped * 1e3:.1f} ms in other events; "
          f"fusions holding a matmul {dots * 1e3:.0f} ms ({100 * dots / step_s:.0f}% of the step), the rest "
          f"{(sum(groups.values()) - dots) * 1e3:.0f} ms:")
    for group, seconds in groups.most_common(args.top):
        print(f"{seconds * 1e3:9.1f} ms {100 * seconds / step_s:5.1f}%  {group}")
    print(f"trace: {trace_dir}")
    return 0


def program_ops(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'fwd|bwd <module path>/<op>' from its metadata op_name. A fusion
    that holds a dot (XLA:CPU fuses a matmul with its bias, residual and a norm's first
    reduction) is named after the dot, the work that dominates it."""
    computations = dict(re.findall(r"^(?:ENTRY )?%([\w.\-]+) .*?\{\n(.*?)^\}", hlo_text, re.M | re.S))
    dot_op = {}
    for comp, body in computations.items():
        m = re.search(r"= \S+ (?:dot|convolution)\(.*?op_name=\"([^\"]*)\"", body)
        if m:
            dot_op[comp] = m.group(1)
    out = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?)op_name=\"([^\"]*)\"", hlo_text, re.M):
        name, line, op = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called and called.group(1) in dot_op:
            op = dot_op[called.group(1)]
        side = "bwd" if "transpose(" in op else "fwd"
        path = re.sub(r"\w+\(|\)", "", op).replace("jit/", "").split("/")
        path = [re.sub(r"_\d+$", "", p) for p in path if p and p not in ("train_step", "body", "closed_call",
                                                                     "while", "checkpoint", "jit")]
        out[name] = f"{side} {'/'.join(path[-3:])}"
    return out


if __name__ == "__main__":
    sys.exit(main())
