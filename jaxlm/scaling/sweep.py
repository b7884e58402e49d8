"""A sweep directory: DIR/sweep.json (the plan), DIR/runs/<name>/ (one ordinary run each).

Each run is trained by a `jaxlm train` subprocess, the very command `jaxlm scaling list` prints:
a run trained here and one trained elsewhere from the listing are the same run; each size's
compiled programs and buffers go with its process; and its console output goes to
DIR/runs/<name>/console.log, leaving the terminal to the sweep's progress bar. (The price, a
few seconds of start-up per run, is small next to a run.) The child dies with the sweep process
(kill -9 included); rerunning the sweep resumes it from its last checkpoint.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional

from jaxlm import io
from jaxlm.errors import UserError
from jaxlm.scaling.progress import SweepProgress
from jaxlm.scaling.sizes import SIZE_FIELDS, PlannedRun

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
CONSOLE_LOG = "console.log"
METRICS_FILE = "metrics.jsonl"


def run_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, RUNS_DIR, name)


def train_args(spec: str, workdir: str, run: PlannedRun, forwarded: dict[str, str]) -> list[str]:
    """The arguments of `jaxlm train` for one planned run."""
    conflicts = sorted(set(forwarded) & set(run.overrides))
    if conflicts:
        raise UserError(f"--config.{conflicts[0]} is set by the sweep for each run (the size rule and the planned "
                        f"tokens); change --sizes/--tokens/--budgets or the scaling.* fields instead")
    overrides = {**forwarded, **run.overrides}
    return (["train", f"--config={spec}", f"--workdir={run_dir(workdir, run.name)}"]
            + [f"--config.{k}={v}" for k, v in overrides.items()])


def command_line(args: list[str]) -> str:
    return shlex.join(["jaxlm", *args])


# == What is on disk =================================================================================

def read_records(path: str) -> list[dict]:
    """metrics.jsonl's records; a line torn by a kill is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def last_step(directory: str) -> int:
    return max((int(r.get("step", 0)) for r in read_records(os.path.join(directory, METRICS_FILE))), default=0)


def is_finished(directory: str, steps: int) -> bool:
    """A run is done when its final evaluation (at its last step) is in metrics.jsonl."""
    return any(int(r.get("step", -1)) == steps and "eval/loss" in r
               for r in read_records(os.path.join(directory, METRICS_FILE)))


def check_matches(directory: str, run: PlannedRun) -> None:
    """A run directory written with other sizes or steps (the rule changed) is not this run."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for key, value in run.overrides.items():
        section, _, field = key.rpartition(".")
        got = saved.get(section, {}).get(field) if section else saved.get(field)
        if (section == "model" and field in SIZE_FIELDS) or key == "steps":
            if got is not None and str(got) != value:
                raise UserError(f"{directory} holds a run with {key}={got} but the sweep plans {value}: the size "
                                f"rule or batch changed; use a fresh --workdir or remove that run directory")


def load_sweep(workdir: str) -> dict:
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return {"runs": {}}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); remove it and run `jaxlm scaling run` or `list` again") from e


def save_sweep(workdir: str, spec: str, forwarded: dict[str, str], runs: list[PlannedRun],
               settings: dict) -> None:
    """Adds the plan's runs to DIR/sweep.json (runs planned before by other invocations stay);
    `settings` (the scaling section) is what a later `jaxlm scaling fit` starts from."""
    sweep = load_sweep(workdir)
    sweep.setdefault("runs", {})
    sweep["scaling"] = dict(settings)
    for run in runs:
        sweep["runs"][run.name] = {**run.as_dict(), "config": spec, "forwarded_overrides": dict(forwarded),
                                   "command": command_line(train_args(spec, workdir, run, forwarded))}
    io.make_dirs(workdir)
    io.write_json_atomic(os.path.join(workdir, SWEEP_FILE), sweep)


# == Running =========================================================================================

def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the kernel sends the child SIGKILL when the sweep process dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes  # pylint: disable=import-outside-toplevel
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class SweepFailed(Exception):
    """A run exited with an error the next runs would repeat (a user error: exit code 2)."""


def execute(workdir: str, spec: str, forwarded: dict[str, str], runs: list[PlannedRun],
            stream=None, poll_seconds: float = 0.5) -> dict[str, int]:
    """Trains the unfinished runs one after the other; returns name -> exit code of those started."""
    for run in runs:
        check_matches(run_dir(workdir, run.name), run)
    finished = {r.name for r in runs if is_finished(run_dir(workdir, r.name), r.steps)}
    partial = {r.name: last_step(run_dir(workdir, r.name)) for r in runs if r.name not in finished}

    def done_flops() -> float:
        return sum(r.flops if r.name in finished else r.flops * min(partial.get(r.name, 0), r.steps) / r.steps
                   for r in runs)

    progress = SweepProgress(sum(r.flops for r in runs), done_flops(), stream=stream)
    if finished:
        progress.message(f"{len(finished)} of {len(runs)} runs already finished: skipped")
    stop = {"signal": None}
    child: dict[str, Optional[subprocess.Popen]] = {"proc": None}

    def on_sigterm(signum, frame):  # pylint: disable=unused-argument
        stop["signal"] = signum
        if child["proc"] is not None and child["proc"].poll() is None:
            child["proc"].send_signal(signal.SIGTERM)  # The run saves a checkpoint and exits.

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    codes: dict[str, int] = {}
    try:
        for index, run in enumerate(runs, 1):
            if run.name in finished:
                continue
            if stop["signal"] is not None:
                break
            directory = run_dir(workdir, run.name)
            os.makedirs(directory, exist_ok=True)
            label = f"run {index}/{len(runs)} {run.name}"
            progress.message(f"{label}: N={run.params:,} D={run.tokens:,} tokens, {run.steps} steps"
                             + (f", resuming after step {partial[run.name]}" if partial.get(run.name) else ""))
            with open(os.path.join(directory, CONSOLE_LOG), "a", encoding="utf-8") as log:
                log.write(f"$ {command_line(train_args(spec, workdir, run, forwarded))}\n")
                log.flush()
                child["proc"] = proc = subprocess.Popen(
                    [sys.executable, "-m", "jaxlm", *train_args(spec, workdir, run, forwarded)],
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # pylint: disable=subprocess-popen-preexec-fn
                while proc.poll() is None:
                    partial[run.name] = last_step(directory)
                    progress.update(done_flops(), f"{label} step {partial[run.name]}/{run.steps}")
                    time.sleep(poll_seconds)
            codes[run.name] = proc.returncode
            child["proc"] = None
            if is_finished(directory, run.steps):
                finished.add(run.name)
                progress.message(f"{label}: finished ({final_loss_text(directory, run.steps)})")
            elif stop["signal"] is not None:
                progress.message(f"{label}: stopped by SIGTERM after step {last_step(directory)}; "
                                 f"rerun the same command to resume")
            else:
                progress.message(f"{label}: exited with code {proc.returncode}; see {os.path.join(directory, CONSOLE_LOG)}")
                if proc.returncode == 2:  # A user error: every later run would hit it too.
                    raise SweepFailed(f"{run.name}: {last_error_line(directory)}")
            progress.update(done_flops(), label, force=True)
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous)
        proc = child["proc"]
        if proc is not None and proc.poll() is None:  # Ctrl-C: the run got SIGINT too; let it save.
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return codes


def final_loss_text(directory: str, steps: int) -> str:
    for record in read_records(os.path.join(directory, METRICS_FILE)):
        if int(record.get("step", -1)) == steps and "eval/loss" in record:
            return f"eval/loss {record['eval/loss']:.4f}"
    return "no final eval/loss"


def last_error_line(directory: str) -> str:
    path = os.path.join(directory, CONSOLE_LOG)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1]
