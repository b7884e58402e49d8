"""Time to the first train step against corpus size: the stream loader's promise that nothing
before the first batch grows with the corpus.

    .venv/bin/python benchmarks/data_first_step.py                 # x1, x30, x300, 3 rounds
    .venv/bin/python benchmarks/data_first_step.py --sizes=1,30 --repeats=1 --keep

Corpus xN is N copies of tiny Shakespeare (jaxlm/data/corpora/tiny_shakespeare.txt); every
paragraph of copy i starts with the line "== copy i ==", so the exact-duplicate removal of
`jaxlm prepare` keeps every copy (x300 is 366 MB). Each corpus is prepared once with
`jaxlm prepare` (timed and reported, not part of the measurement). Then, per round and per size
(interleaved: x1, x30, x300, x1, ...), one `jaxlm train` of the demo recipe with a fresh workdir,
--config.steps=1 --config.eval_every=0; the figure is the "first train step done X s after the
start (data ready after Y s)" line of WORKDIR/jaxlm.log (its clock starts in train_and_evaluate,
after the imports), plus the command's wall time, and a split of X into phases from the log's
timestamps (opening the corpus, BPE, loader, model, first batch, compile + step). A fresh
workdir trains the run's BPE again each time, on at most data.bpe_sample_mb of the corpus, so
that cost is part of the figure, as in a real first start. The end-of-run evaluation of step 1
comes after the measured point; --config.eval_batches=1 (default --eval_batches) keeps it short,
though the eval split is still tokenized whole for it (the wall time includes that).

Goal: the medians of the three sizes within 1.5x of each other. Extra `--config.FIELD=VALUE`
arguments go to every `jaxlm train`. Prints a table, then one JSON line.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(REPO, "jaxlm", "data", "corpora", "tiny_shakespeare.txt")
FIRST_STEP = re.compile(r"first train step done ([\d.]+) s after the start \(data ready after ([\d.]+) s\)")
PREPARED = re.compile(r"^(\w+): (\d+) of (\d+) documents kept \(\d+ empty, (\d+) duplicates, (\d+) also in train "
                      r"dropped\).*?; (reused|prepared in [\d.]+ s)", re.MULTILINE)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
# Phases before the first step, each ending at the first log line that contains its marker.
PHASES = (("open_corpus", "documents read,"), ("train_bpe", "Trained a byte-level BPE"),
          ("build_loader", "causal-LM data:"), ("model", "model: "))
GOAL_RATIO = 1.5


def paragraphs(path: str) -> list[str]:
    """The file's documents as data.doc_split=blank_line cuts them (runs of blank lines)."""
    out, lines = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                lines.append(line)
            elif lines:
                out.append("\n".join(lines))
                lines = []
    if lines:
        out.append("\n".join(lines))
    return out


def write_corpus(path: str, docs: list[str], copies: int) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(copies):
            header = f"== copy {i} ==\n"
            f.write("".join(header + d + "\n\n" for d in docs))
    return os.path.getsize(path)


def jaxlm(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxlm", *args], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"jaxlm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc, seconds


def prepare(config: str, corpus: str, data_dir: str, timeout: float) -> dict:
    proc, seconds = jaxlm(["prepare", f"--config={config}", f"--config.data.train_file={corpus}",
                           f"--config.data.data_dir={data_dir}"], timeout)
    found = PREPARED.findall(proc.stdout)
    return {"wall_s": seconds, "reused": any(m[5] == "reused" for m in found),
            "splits": {m[0]: {"kept": int(m[1]), "read": int(m[2]), "dropped": int(m[3]) + int(m[4])} for m in found}}


def phases(log: str, first_step_s: float, data_ready_s: float) -> dict:
    """Seconds of each phase before the first step, from jaxlm.log's timestamps (None: no line)."""
    stamps = []
    for line in log.splitlines():
        if m := STAMP.match(line):
            stamps.append((datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    done = next(t for t, line in stamps if FIRST_STEP.search(line))
    previous, out = done - first_step_s, {}
    for name, marker in PHASES:
        t = next((t for t, line in stamps if marker in line), None)
        out[name] = None if t is None else round(t - previous, 2)
        previous = t if t is not None else previous
    start = done - first_step_s
    out["init_first_batch"] = round(start + data_ready_s - previous, 2)  # Params init, first next().
    out["compile_step"] = round(first_step_s - data_ready_s, 2)  # The train step's compile and run.
    return out


def train_once(config: str, corpus: str, data_dir: str, workdir: str, extra: list[str], timeout: float) -> dict:
    _, wall = jaxlm(["train", f"--config={config}", f"--config.data.train_file={corpus}",
                     f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", "--config.steps=1",
                     "--config.eval_every=0", *extra], timeout)
    with open(os.path.join(workdir, "jaxlm.log"), encoding="utf-8") as f:
        log = f.read()
    match = FIRST_STEP.search(log)
    if not match:
        raise SystemExit(f"no 'first train step done' line in {workdir}/jaxlm.log")
    return {"first_step_s": float(match[1]), "data_ready_s": float(match[2]), "wall_s": wall,
            "phases": phases(log, float(match[1]), float(match[2]))}


def median_run(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in ("first_step_s", "data_ready_s", "wall_s")}
    out["phases"] = {k: statistics.median(r["phases"][k] for r in runs) if all(r["phases"][k] is not None for r in runs)
                     else None for k in runs[0]["phases"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,30,300", help="copies of tiny Shakespeare per corpus (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="train runs per size, interleaved (default: %(default)s)")
    parser.add_argument("--config", default="configs/tiny_shakespeare.py", help="recipe (default: %(default)s)")
    parser.add_argument("--eval_batches", type=int, default=1,
                        help="config.eval_batches of the end-of-run evaluation, after the measured point "
                             "(0: the whole eval split; default: %(default)s)")
    parser.add_argument("--scratch", default="",
                        help="folder in which a fresh subfolder holds the corpora, data_dir and workdirs "
                             "(default: '' = the system's temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep that subfolder (default: remove it at the end)")
    parser.add_argument("--reuse", default="",
                        help="a subfolder an earlier --keep run left: its prepared datasets are reused "
                             "(jaxlm prepare finds them), its workdirs replaced (default: '' = a fresh one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per jaxlm command (default: %(default)s)")
    args, extra = parser.parse_known_args()
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; only --config.FIELD=VALUE ones go to jaxlm train")
    extra = [f"--config.eval_batches={args.eval_batches}", *extra]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.scratch:
        os.makedirs(args.scratch, exist_ok=True)
    scratch = args.reuse or tempfile.mkdtemp(prefix="jaxlm_first_step_", dir=args.scratch or None)
    if args.reuse:
        args.keep = True  # Never remove what the user asked to reuse.
        for name in os.listdir(scratch):
            if name.startswith("run_x"):
                shutil.rmtree(os.path.join(scratch, name))
    data_dir = os.path.join(scratch, "data")
    print(f"scratch: {scratch}", flush=True)
    try:
        docs = paragraphs(CORPUS)
        corpora, prepared = {}, {}
        for n in sizes:
            corpora[n] = os.path.join(scratch, f"shakespeare_x{n}.txt")
            mb = write_corpus(corpora[n], docs, n) / 1e6
            prepared[n] = {"MB": mb, **prepare(args.config, corpora[n], data_dir, args.timeout)}
            print(f"x{n}: {mb:.1f} MB, jaxlm prepare {prepared[n]['wall_s']:.1f} s wall, documents kept "
                  + ", ".join(f"{k} {v['kept']}" for k, v in prepared[n]["splits"].items()), flush=True)
        runs = {n: [] for n in sizes}
        for r in range(args.repeats):
            for n in sizes:
                workdir = os.path.join(scratch, f"run_x{n}_{r}")
                run = train_once(args.config, corpora[n], data_dir, workdir, extra, args.timeout)
                runs[n].append(run)
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
                print(f"round {r + 1} x{n} (load {os.getloadavg()[0]:.1f}): first step {run['first_step_s']:.1f} s (data ready {run['data_ready_s']:.1f} s), "
                      f"wall {run['wall_s']:.1f} s; phases {run['phases']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    base = sizes[0]
    med = {n: median_run(runs[n]) for n in sizes}
    ratio = {n: med[n]["first_step_s"] / med[base]["first_step_s"] for n in sizes}
    print(f"\n{'corpus':>7} {'MB':>6} {'train docs':>10} {'prepare s':>9} | {'first step s':>12} {'vs x' + str(base):>7} "
          f"{'data ready s':>12} {'wall s':>7} | per round")
    for n in sizes:
        print(f"{'x' + str(n):>7} {prepared[n]['MB']:6.1f} {prepared[n]['splits'].get('train', {}).get('kept', 0):10d} "
              f"{prepared[n]['wall_s']:9.1f} | {med[n]['first_step_s']:12.1f} {ratio[n]:6.2f}x {med[n]['data_ready_s']:12.1f} "
              f"{med[n]['wall_s']:7.1f} | " + " ".join(f"{run['first_step_s']:.1f}" for run in runs[n]))
    names = list(med[base]["phases"])
    print(f"\nmedian seconds per phase before the first step (from jaxlm.log timestamps)\n{'corpus':>7} "
          + " ".join(f"{k:>13}" for k in names))
    for n in sizes:
        print(f"{'x' + str(n):>7} " + " ".join(f"{'-' if v is None else f'{v:.1f}':>13}" for v in med[n]["phases"].values()))
    spread = max(ratio.values()) / min(ratio.values())
    # Copies differ by their headers, so only a copy's own duplicates go: n times x1's.
    dropped = {n: sum(v["dropped"] for v in prepared[n]["splits"].values()) for n in sizes}
    copies_kept = all(dropped[n] * base == dropped[base] * n for n in sizes)
    print(f"\nmedians within {spread:.2f}x of each other (goal <= {GOAL_RATIO}x: {'met' if spread <= GOAL_RATIO else 'NOT met'}); "
          f"every copy kept by the duplicate removal: {copies_kept} (documents dropped {dropped})")
    print(json.dumps({
        "benchmark": "data_first_step", "config": args.config, "repeats": args.repeats, "train_overrides": extra,
        "sizes": {f"x{n}": {"MB": round(prepared[n]["MB"], 1), "prepare_wall_s": round(prepared[n]["wall_s"], 1),
                            "documents_kept": {k: v["kept"] for k, v in prepared[n]["splits"].items()},
                            "median": med[n], "ratio_to_x" + str(base): round(ratio[n], 3),
                            "runs": runs[n]} for n in sizes},
        "spread": round(spread, 3), "goal": GOAL_RATIO, "goal_met": spread <= GOAL_RATIO, "copies_kept": copies_kept,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
