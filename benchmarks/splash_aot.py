"""Splash attention against XLA attention in the real train step, compiled for a TPU slice here.

    python benchmarks/splash_aot.py [--config=configs/llama_1b.py] [--topology=v5p:2x2x2]
        [--seq_len=8192] [--batch=8] [--impls=splash,xla] [--json_out=FILE] [--config.F=V ...]

For each model.attention_impl, the train step `jaxlm train` would run (jaxlm.trainer.Trainer on
the topology's mesh, as `jaxlm aot` builds it) is compiled by libtpu on this CPU host, and printed:
whether the compiled program holds the splash kernel (Mosaic `tpu_custom_call`s named
splash_mha_*), and the compiler's per-device memory (temporaries, arguments, total). Nothing runs;
no TPU is needed. Extra --config.F=V flags override the recipe (model.vocab_size must be set,
the recipe's is). The last line printed is one JSON object.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu compiles; nothing probes for a chip.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GIB = 1024 ** 3


def compile_one(recipe: str, topology: str, overrides: dict) -> dict:
    from jaxlm import aot, hlo_analysis, sharding  # pylint: disable=import-outside-toplevel
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.tpu_topology import topology_devices  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import Trainer  # pylint: disable=import-outside-toplevel
    config = aot.prepare_config(config_lib.load_recipe(recipe, overrides), num_slices=1)
    mesh = sharding.make_mesh(config.mesh, devices=topology_devices(topology))
    trainer = Trainer(config, mesh)
    start = time.perf_counter()
    compiled = trainer.compile_train(trainer.task.batch_spec(config))
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    kernels = hlo_analysis.splash_kernels(text)
    return {"attention_impl": config.model.attention_impl, "compile_seconds": round(seconds, 1),
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "tpu_custom_calls": text.count('custom_call_target="tpu_custom_call"'),
            "splash_kernels": kernels, "has_splash": bool(kernels), "memory": aot._memory(compiled)}


def finish(summary: dict, json_out: str) -> int:
    """The summary to --json_out (if given) and as the last line printed."""
    if json_out:
        with open(json_out, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama_1b.py")
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the chips)")
    parser.add_argument("--impls", default="splash,xla")
    parser.add_argument("--json_out", default=None)
    args, rest = parser.parse_known_args(argv)
    extra = dict(a[len("--config."):].split("=", 1) for a in rest if a.startswith("--config.") and "=" in a)
    base = {"seq_len": str(args.seq_len), "model.max_len": str(args.seq_len),
            "global_batch_size": str(args.batch), **extra}
    results = []
    for impl in args.impls.split(","):
        r = compile_one(args.config, args.topology, {**base, "model.attention_impl": impl})
        m = r["memory"]
        print(f"{impl:>7}: splash kernel in compiled HLO: {'yes' if r['has_splash'] else 'no'} "
              f"({r['tpu_custom_calls']} tpu_custom_call ops; {', '.join(r['splash_kernels']) or '-'}); "
              f"per device: temporaries {m['temporaries'] / GIB:.2f} GiB, arguments "
              f"{m['arguments'] / GIB:.2f} GiB, total {m['total'] / GIB:.2f} GiB; "
              f"compiled in {r['compile_seconds']:.0f}s", flush=True)
        results.append(r)
    by = {r["attention_impl"]: r for r in results}
    summary = {"config": args.config, "topology": args.topology, "seq_len": args.seq_len,
               "global_batch_size": args.batch, "overrides": extra, "results": results}
    if "splash" in by and "xla" in by:
        s, x = by["splash"]["memory"]["temporaries"], by["xla"]["memory"]["temporaries"]
        summary["temporaries_splash_over_xla"] = s / x
        print(f"temporaries per device: splash {s / GIB:.2f} GiB vs xla {x / GIB:.2f} GiB "
              f"({s / x:.3f}x)", flush=True)
    return finish(summary, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
