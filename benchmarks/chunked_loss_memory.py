"""The chunked cross-entropy's memory: one train step compiled with and without loss_chunk_size.

    python benchmarks/chunked_loss_memory.py [--config=configs/gpt2_small.py] [--topology=v5e:2x2]
        [--seq_len=1024] [--batch=64] [--chunks=0,8192] [--json_out=FILE] [--config.F=V ...]

For each loss_chunk_size (0: the plain loss, which builds the whole [batch, seq, vocab] float32
logits array), the train step `jaxlm train` would run is compiled by libtpu on this CPU host for
the topology's mesh (as `jaxlm aot` does; no TPU is needed), with one micro-batch
(grad_accum_steps=1) so the whole batch's logits are live at once, and the compiler's per-device
memory is printed. The last line printed is one JSON object.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from splash_aot import GIB, compile_one, finish  # noqa: E402  (sets JAX_PLATFORMS before jax loads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt2_small.py")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="global batch (a multiple of the chips)")
    parser.add_argument("--chunks", default="0,8192", help="loss_chunk_size values, in tokens")
    parser.add_argument("--json_out", default=None)
    args, rest = parser.parse_known_args(argv)
    extra = dict(a[len("--config."):].split("=", 1) for a in rest if a.startswith("--config.") and "=" in a)
    base = {"seq_len": str(args.seq_len), "model.max_len": str(args.seq_len),
            "global_batch_size": str(args.batch), "grad_accum_steps": "1", **extra}
    results = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        r = compile_one(args.config, args.topology, {**base, "loss_chunk_size": str(chunk)})
        r["loss_chunk_size"] = chunk
        m = r["memory"]
        print(f"loss_chunk_size={chunk:>6}: per device: temporaries {m['temporaries'] / GIB:.2f} GiB, "
              f"arguments {m['arguments'] / GIB:.2f} GiB, total {m['total'] / GIB:.2f} GiB; "
              f"compiled in {r['compile_seconds']:.0f}s", flush=True)
        results.append(r)
    summary = {"config": args.config, "topology": args.topology, "seq_len": args.seq_len,
               "global_batch_size": args.batch, "overrides": extra, "results": results}
    plain = [r for r in results if r["loss_chunk_size"] == 0]
    if plain:
        for r in results:
            if r["loss_chunk_size"]:
                ratio = r["memory"]["total"] / plain[0]["memory"]["total"]
                summary[f"total_chunk{r['loss_chunk_size']}_over_plain"] = ratio
                print(f"total per device: chunks of {r['loss_chunk_size']} {r['memory']['total'] / GIB:.2f} GiB "
                      f"vs plain {plain[0]['memory']['total'] / GIB:.2f} GiB ({ratio:.3f}x)", flush=True)
    return finish(summary, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
