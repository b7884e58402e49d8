"""LoRA against full fine-tuning of the real MiniLM-L6 on SST-2, at the same training-time budget:
configs/minilm_sst2_lora.py (rank 8 on query and value, the head in full) and configs/minilm_sst2.py,
one after the other, then one line each with dev accuracy, trainable parameters (count and share
of the model) and optimizer-state bytes, as the runs logged them.

    python benchmarks/lora_sst2.py                        # 20 minutes of training each
    python benchmarks/lora_sst2.py --budget_minutes=10 --only=lora

The budget counts the training loop, as benchmarks/sst2_finetune.py (whose summary this reuses).
Extra `--config.FIELD=VALUE` arguments go to both `jaxlm train` runs.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from sst2_finetune import SST2_DIR, summarize  # noqa: E402

CONFIGS = {"lora": "configs/minilm_sst2_lora.py", "full": "configs/minilm_sst2.py"}
TRAINABLE = re.compile(r"trainable parameters: ([\d,]+) of the model's ([\d,]+) \(([\d.]+)%\)")
OPTIMIZER = re.compile(r"optimizer state: ([\d,]+) bytes, ([\d.]+)% of full fine-tuning's ([\d,]+) bytes")


def logged(workdir: str) -> dict:
    """The LoRA run's own figures from DIR/jaxlm.log (a full run logs neither line)."""
    with open(os.path.join(workdir, "jaxlm.log"), encoding="utf-8") as f:
        text = f.read()
    out = {}
    if (m := TRAINABLE.search(text)):
        out.update(trainable=m.group(1), model_params=m.group(2), trainable_pct=m.group(3))
    if (m := OPTIMIZER.search(text)):
        out.update(optimizer_bytes=m.group(1), optimizer_pct_of_full=m.group(2), full_optimizer_bytes=m.group(3))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_minutes", type=float, default=20.0)
    parser.add_argument("--only", choices=sorted(CONFIGS), default="", help="run one of the two")
    parser.add_argument("--data_dir", default="", help="tfds data_dir for the prepared SST-2 files")
    parser.add_argument("--sst2_dir", default=os.environ.get("JAXLM_SST2_DIR", SST2_DIR))
    args, overrides = parser.parse_known_args()
    stamp = time.strftime("%Y%m%d_%H%M%S")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), JAXLM_SST2_DIR=args.sst2_dir)
    for name in [args.only] if args.only else list(CONFIGS):
        workdir = os.path.join(REPO, "runs", f"bench_lora_sst2_{name}_{stamp}")
        command = [sys.executable, "-m", "jaxlm", "train", f"--config={CONFIGS[name]}", f"--workdir={workdir}",
                   f"--config.train_time_budget_minutes={args.budget_minutes}", *overrides]
        if args.data_dir:
            command.append(f"--config.data.data_dir={args.data_dir}")
        print("$", " ".join(command), flush=True)
        if subprocess.run(command, cwd=REPO, env=env).returncode != 0:
            print(f"jaxlm train ({name}) failed", file=sys.stderr)
            return 1
        s, extra = summarize(workdir), logged(workdir)
        print(f"jaxlm task=sst2 model=minilm fine_tuning={name} budget_min={args.budget_minutes:g} "
              f"steps={s['steps']} examples_per_s={s['examples_per_s']:.1f} dev_accuracy={s['dev_accuracy']:.4f} "
              f"dev_f1={s['dev_f1']:.4f} " + " ".join(f"{k}={v}" for k, v in extra.items()) + f" workdir={workdir}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
