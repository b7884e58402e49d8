"""One GPU session, prepared: what jaxlm's train step makes of an H200, and what users do with a GPU.

    python benchmarks/gpu_h200.py [--out=DIR]     # on the GPU machine, from the repository root
    python benchmarks/gpu_h200.py --dry_run       # the same sequence on this CPU with tiny shapes

1. Train step of a ~1.2B Llama-shaped model (configs/llama_1b.py's shape) at seq 2048 in bf16 on
   one device, one row per variant: XLA against cuDNN attention, the chunked loss off and on,
   remat policies. Each row is `jaxlm bench --mode=train` in its own process (so peak memory is
   that variant's): tokens/s, MFU over the device's dense bf16 peak (989 TFLOP/s on an H200),
   peak memory, compile time. A variant that fails (out of memory, an unsupported kernel) is a
   row with its error, and the script goes on.
2. Decoding: `jaxlm bench --mode=decode` against transformers' generate() (needs torch).
3. A small run trained on the CPU (created here, tiny Shakespeare `:runlocal`), evaluated on the
   CPU and on the GPU: eval/loss must agree within 1e-4. It also prints the GPU devices
   TensorFlow sees after jaxlm hid them (it must see none) and the eval process's GPU memory as
   nvidia-smi reports it.
4. `jaxlm generate` from that run on the GPU.

Everything lands in --out (default benchmarks/figures/gpu_h200_<time>/): a log per command, the
table as results.md and results.json. Planned to finish in under 8 minutes on one H200, compiles
included (each command has its own timeout, so a hang costs one row, not the session).
--dry_run shrinks the model to `:runlocal` shapes (the CPU-trained run to 10 steps), maps cuDNN
to XLA, forces the CPU and leaves out the TensorFlow GPU probe (a CPU has no GPU to hide), so
the suite can run the whole sequence (tests/test_gpu_script.py).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EVAL_TOLERANCE = 1e-4

# (name, attention_impl, loss_chunk_size (-1: --loss_chunk), remat_policy)
VARIANTS = [
    ("xla attention, plain loss, remat dots_no_batch", "xla", 0, "dots_no_batch"),
    ("cudnn attention, plain loss, remat dots_no_batch", "cudnn", 0, "dots_no_batch"),
    ("cudnn attention, chunked loss, remat dots_no_batch", "cudnn", -1, "dots_no_batch"),
    ("cudnn attention, chunked loss, remat full", "cudnn", -1, "full"),
    ("cudnn attention, chunked loss, no remat", "cudnn", -1, "none"),
]


def run(command: list[str], log: str, env: dict, timeout: float, poll_gpu: bool = False) -> tuple[int, str, int]:
    """Runs one command with its output in `log`; returns (exit code, stdout, the most GPU memory
    in MiB that nvidia-smi saw the process use, or -1 when not polled or not available)."""
    started = time.time()
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        most = [-1]
        if poll_gpu and shutil.which("nvidia-smi"):
            threading.Thread(target=_poll_gpu_memory, args=(proc, most), daemon=True).start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            return 124, out or "", most[0]
    print(f"  ({time.time() - started:.0f} s, exit {proc.returncode}, log {os.path.relpath(log, REPO)})", flush=True)
    return proc.returncode, out, most[0]


def _poll_gpu_memory(proc: subprocess.Popen, most: list[int]) -> None:
    while proc.poll() is None:
        query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, check=False)
        for line in query.stdout.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(proc.pid) and used.strip().isdigit():
                most[0] = max(most[0], int(used))
        time.sleep(0.5)


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def train_rows(args, env: dict, out: str) -> list[dict]:
    rows = []
    shape = ["--config=configs/llama_1b.py" + (":runlocal" if args.dry_run else ""),
             f"--config.seq_len={args.seq_len}", f"--config.model.max_len={args.seq_len}",
             f"--config.global_batch_size={args.batch}", "--config.grad_accum_steps=1",
             "--config.model.dtype=bfloat16", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
    for i, (name, attention, chunk, remat) in enumerate(VARIANTS):
        if args.variants and str(i + 1) not in args.variants.split(","):
            continue
        if args.dry_run and attention == "cudnn":
            attention = "xla"  # No cuDNN on a CPU: the dry run checks the sequence, not the kernel.
        print(f"train {i + 1}/{len(VARIANTS)}: {name}", flush=True)
        chunk = args.loss_chunk if chunk < 0 else chunk
        command = [sys.executable, "-m", "jaxlm", "bench", "--mode=train", *shape, f"--steps={args.steps}",
                   "--warmup=2", f"--config.model.attention_impl={attention}", f"--config.loss_chunk_size={chunk}",
                   f"--config.model.remat_policy={remat}"]
        code, stdout, _ = run(command, os.path.join(out, f"train_{i + 1}.log"), env, args.row_timeout)
        r = last_json(stdout) if code == 0 else {}
        rows.append({"variant": name, "exit": code, **{k: r.get(k) for k in (
            "tokens_per_s", "mfu", "peak_memory_bytes", "compile_s", "step_s_median", "params", "peak_source")},
            "error": "" if r else _last_line(os.path.join(out, f"train_{i + 1}.log"))})
    return rows


def _last_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else "no output"


def eval_rows(args, env: dict, cpu_env: dict, out: str) -> dict:
    workdir = os.path.join(out, "cpu_run")
    print("train a small run on the CPU (tiny Shakespeare :runlocal)", flush=True)
    # A dry run only needs a checkpoint to evaluate: 10 steps, no evaluation during training.
    short = ["--config.steps=10", "--config.eval_every=0", "--config.checkpoint_every=10"] if args.dry_run else []
    code, _, _ = run([sys.executable, "-m", "jaxlm", "train", "--config=configs/tiny_shakespeare.py:runlocal",
                      f"--workdir={workdir}", f"--config.data.data_dir={os.path.join(out, 'tfds')}", *short],
                     os.path.join(out, "cpu_train.log"), cpu_env, args.row_timeout * 2)
    if code != 0:
        return {"error": f"CPU training failed (exit {code}): {_last_line(os.path.join(out, 'cpu_train.log'))}"}
    losses = {}
    for where, e in (("cpu", cpu_env), ("device", env)):
        print(f"jaxlm eval on the {where}", flush=True)
        code, _, gpu_mib = run([sys.executable, "-m", "jaxlm", "eval", f"--workdir={workdir}"],
                               os.path.join(out, f"eval_{where}.log"), e, args.row_timeout, poll_gpu=where == "device")
        if code != 0:
            return {"error": f"eval on the {where} failed (exit {code}): {_last_line(os.path.join(out, f'eval_{where}.log'))}"}
        reports = sorted(f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json"))
        with open(os.path.join(workdir, "eval", reports[-1]), encoding="utf-8") as f:
            losses[where] = json.load(f)["eval/loss"]
        os.rename(os.path.join(workdir, "eval", reports[-1]), os.path.join(out, f"eval_{where}.json"))
        if where == "device":
            losses["device_process_gpu_mib"] = gpu_mib
    losses["abs_diff"] = abs(losses["cpu"] - losses["device"])
    losses["within_tolerance"] = losses["abs_diff"] <= EVAL_TOLERANCE
    if args.dry_run:  # No GPU to hide on a CPU (tests/test_console.py checks the hiding itself).
        losses["tensorflow_visible_gpus"] = "not probed (dry run)"
    else:
        probe = ("from jaxlm.commands.common import hide_gpus_from_tensorflow as h; h(); import tensorflow as tf; "
                 "print(len(tf.config.get_visible_devices('GPU')))")
        proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                              check=False)
        losses["tensorflow_visible_gpus"] = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else "error"
    print("jaxlm generate on the device", flush=True)
    code, stdout, _ = run([sys.executable, "-m", "jaxlm", "generate", f"--workdir={workdir}", "--prompt=ROMEO:",
                           "--max_new_tokens=48"], os.path.join(out, "generate.log"), env, args.row_timeout)
    losses["generate_exit"], losses["generated"] = code, stdout.strip()[-400:]
    return losses


def report(rows: list[dict], decode: str, evals: dict) -> str:
    lines = ["| variant | tokens/s | MFU | peak memory | compile | exit |", "|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        comp = f"{r['compile_s']:.0f} s" if r.get("compile_s") else "-"
        lines.append(f"| {r['variant']} | {tps} | {mfu} | {mem} | {comp} | {r['exit']} {r['error']} |")
    lines += ["", "decode:", decode or "(failed: see decode.log)", "", "eval of a CPU-trained run:",
              json.dumps(evals, indent=1)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="default: benchmarks/figures/gpu_h200_<time>")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes on the CPU (what the suite runs)")
    parser.add_argument("--seq_len", type=int, default=0, help="default: 2048 (dry run: 64)")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (default: 8; dry run: 2)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per variant (default: 8; dry run: 1)")
    parser.add_argument("--loss_chunk", type=int, default=0, help="loss_chunk_size of the chunked rows (default: 4096 tokens; dry run: 32)")
    parser.add_argument("--row_timeout", type=float, default=0, help="seconds per command (default: 150)")
    parser.add_argument("--variants", default="", help="comma-separated rows of the train table to run, e.g. 1,3 (default: all)")
    parser.add_argument("--skip_decode", action="store_true", help="leave out the decode benchmark")
    args = parser.parse_args()
    args.seq_len = args.seq_len or (64 if args.dry_run else 2048)
    args.batch = args.batch or (2 if args.dry_run else 8)
    args.steps = args.steps or (1 if args.dry_run else 8)
    args.loss_chunk = args.loss_chunk or (32 if args.dry_run else 4096)
    args.row_timeout = args.row_timeout or (600 if args.dry_run else 150)
    out = os.path.abspath(args.out or os.path.join(HERE, "figures", time.strftime("gpu_h200_%Y%m%d_%H%M%S")))
    os.makedirs(out, exist_ok=True)
    cpu_env = dict(os.environ, JAX_PLATFORMS="cpu")
    env = cpu_env if args.dry_run else {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    started = time.time()
    devices = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__, jax.devices())"], cwd=REPO,
                             env=env, capture_output=True, text=True, check=False)
    print(f"jax and devices: {devices.stdout.strip() or devices.stderr.strip()[-300:]}", flush=True)

    rows = train_rows(args, env, out)
    decode = "(skipped: --skip_decode)"
    if not args.skip_decode:
        print("decode benchmark", flush=True)
        extra = ["--rounds=1", "--new_tokens=16", "--batch_sizes=1"] if args.dry_run else ["--rounds=3"]
        code, stdout, _ = run([sys.executable, "-m", "jaxlm", "bench", "--mode=decode", *extra],
                              os.path.join(out, "decode.log"), env, args.row_timeout)
        decode = "\n".join(line for line in stdout.splitlines() if line.startswith(("batch", "decode"))) if code == 0 else ""
    evals = eval_rows(args, env, cpu_env, out)
    text = report(rows, decode, evals)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"train": rows, "decode": decode, "eval": evals, "dry_run": args.dry_run,
                   "wall_s": round(time.time() - started, 1), "jax_devices": devices.stdout.strip()}, f, indent=1)
    print(text)
    print(f"wall time {time.time() - started:.0f} s; results in {out}")
    ok = all(r["exit"] == 0 for r in rows) and evals.get("within_tolerance") and evals.get("generate_exit") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
