"""`jaxlm scaling run|list|fit|predict`: fit a scaling law on small runs and size the next one."""

import argparse
import os
import sys

from jaxlm.commands import common
from jaxlm.errors import UserError

EXAMPLE = "configs/scaling_tiny_shakespeare.py"


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=False, help=f"recipe of every run, e.g. {EXAMPLE}")
    parser.add_argument("--workdir", required=False, help="sweep directory: DIR/sweep.json, DIR/runs/<name>/, the report")
    parser.add_argument("--sizes", default="", help="non-embedding parameter counts, comma-separated, e.g. 1e5,3e5,1M "
                                                   "(default: the recipe's scaling.sizes)")
    parser.add_argument("--tokens", default="", help="training tokens per run, comma-separated; every size trains on "
                                                    "each (default: the recipe's scaling.tokens, else "
                                                    "scaling.tokens_per_param x N)")
    parser.add_argument("--budgets", default="", help="training FLOPs per run for an IsoFLOP sweep, comma-separated, "
                                                     "e.g. 1e13,3e13 (default: the recipe's scaling.budgets)")


NAME = "scaling"
HELP = "scaling laws: sweep small runs, fit L(N, D), predict the compute-optimal size"
DESCRIPTION = ("Fit the Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta on small runs of your own data "
               "and tokenizer, then ask it for the compute-optimal N* and D* of a budget. `run` trains a "
               "sweep (each run an ordinary `jaxlm train` run under DIR/runs/), `list` prints its "
               "commands for running elsewhere, `fit` writes DIR/scaling_report.json and plots, `predict` "
               "answers 'for C FLOPs, train N* parameters on D* tokens, expect loss L'. "
               "--config.scaling.FIELD=VALUE sets the size rule and fit fields (jaxlm train --config=RECIPE "
               "--help_config lists them).")
NEEDS = ()  # Each subcommand names its own.


def add_flags(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND")

    run_parser = common.add_parser(
        sub, "run", help="train the sweep's unfinished runs (one progress bar), then fit",
        description="Plan the sweep (each size from the recipe's size rule, steps from its tokens), train every "
                    "unfinished run in turn as `jaxlm train` under DIR/runs/<name>/ (finished runs are skipped, "
                    "an interrupted one resumes from its checkpoint), then fit. Other --config.FIELD=VALUE "
                    "overrides go to every run.")
    _add_plan_flags(run_parser)
    run_parser.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                            help="fit and write the report once every run has finished (default: on)")
    run_parser.set_defaults(handler=run, needs=("config", "workdir"))

    list_parser = common.add_parser(
        sub, "list", help="print one `jaxlm train` command per run, to run elsewhere",
        description="Plan the sweep as `run` would and print one `jaxlm train` command per run (finished ones "
                    "commented out). Run them anywhere that sees DIR, then `jaxlm scaling fit --workdir=DIR`.")
    _add_plan_flags(list_parser)
    list_parser.set_defaults(handler=run, needs=("config", "workdir"))

    for name, (help_text, description, flags) in _REPORT_SUBCOMMANDS.items():
        report_parser = common.add_parser(sub, name, help=help_text, description=description)
        for flag, default, flag_help in flags:
            report_parser.add_argument(flag, default=default, required=False, help=flag_help)
        report_parser.set_defaults(handler=run, needs=("workdir",))


# The subcommands that read a sweep directory: name -> (help, description, [(flag, default, help)]).
_REPORT_SUBCOMMANDS = {
    "fit": (
        "fit the law to the finished runs (or a CSV), write the report and plots",
        "Count each finished run's non-embedding parameters N, tokens D and FLOPs C (checked against its "
        "compiled train step), take its final (or best) eval loss, fit approach 3 (and approach 2 for "
        "IsoFLOP budgets) and write DIR/scaling_report.json with PNG plots.",
        [("--workdir", None, "sweep directory (where the report and plots go)"),
         ("--points", "", "CSV with columns N, D, loss (optionally C, name) to fit instead of the runs "
                          "(default: DIR/runs/)"),
         ("--config", "", "recipe whose scaling.* fit fields to use (default: those saved in DIR/sweep.json)")]),
    "predict": (
        "N*, D* and the expected loss for a compute budget, from the fitted law",
        "Read DIR/scaling_report.json and print the compute-optimal N* and D* for each --flops budget "
        "(C = 6ND) with the expected loss and bootstrap intervals; with --params and --tokens also the "
        "loss the law expects of that model.",
        [("--workdir", None, "sweep directory holding scaling_report.json"),
         ("--flops", "", "compute budgets, comma-separated, e.g. 1e21"),
         ("--params", "", "a model's non-embedding parameters, to predict its loss"),
         ("--tokens", "", "its training tokens (with --params)")]),
}


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    command = getattr(args, "scaling_command", None)
    if command is None:
        raise UserError("jaxlm scaling needs a subcommand: run, list, fit or predict (see jaxlm scaling --help)")
    for flag in {"run": ("config", "workdir"), "list": ("config", "workdir")}.get(command, ("workdir",)):
        if not getattr(args, flag, None):
            raise UserError(f"--{flag} is required: jaxlm scaling {command} --help shows an example")
    return {"run": _run, "list": _list, "fit": _fit, "predict": _predict}[command](args, overrides)


# == run and list ===================================================================================

def _plan(args, overrides):
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling import config as scaling_config  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling import settings as scaling_settings  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling import sizes  # pylint: disable=import-outside-toplevel
    mine, forwarded = scaling_config.split_scaling_overrides(overrides)
    recipe = config_lib.load_recipe(args.config, forwarded)  # Checks the runs' overrides here, once.
    s = scaling_settings.settings(recipe, mine)
    numbers = {flag: scaling_config.parse_numbers(getattr(args, flag) or s[flag], f"--{flag}")
               for flag in ("sizes", "tokens", "budgets")}
    runs, notes = sizes.plan(recipe, s, numbers["sizes"], numbers["tokens"], numbers["budgets"])
    return runs, notes, forwarded, s


def _run(args, overrides) -> int:
    from jaxlm.scaling import sweep  # pylint: disable=import-outside-toplevel
    runs, notes, forwarded, s = _plan(args, overrides)
    for note in notes:
        print(f"jaxlm scaling: {note}", file=sys.stderr, flush=True)
    sweep.save_sweep(args.workdir, args.config, forwarded, runs, s.to_dict())
    try:
        codes = sweep.execute(args.workdir, args.config, forwarded, runs)
    except sweep.SweepFailed as e:
        raise UserError(f"the sweep stopped: {e}") from None
    unfinished = [r.name for r in runs
                  if not sweep.is_finished(sweep.run_dir(args.workdir, r.name), r.steps)]
    if unfinished:
        failed = [name for name in unfinished if codes.get(name, 0) not in (0,)]
        print(f"jaxlm scaling: {len(unfinished)} of {len(runs)} runs unfinished"
              + (f" ({len(failed)} failed: see their console.log)" if failed else "")
              + "; rerun the same command to resume", file=sys.stderr, flush=True)
        return 1
    if args.fit:
        return _fit_and_print(args.workdir, s, "")
    return 0


def _list(args, overrides) -> int:
    from jaxlm.scaling import sweep  # pylint: disable=import-outside-toplevel
    runs, notes, forwarded, s = _plan(args, overrides)
    for note in notes:
        print(f"# {note}")
    sweep.save_sweep(args.workdir, args.config, forwarded, runs, s.to_dict())
    for run_ in runs:
        line = sweep.command_line(sweep.train_args(args.config, args.workdir, run_, forwarded))
        done = sweep.is_finished(sweep.run_dir(args.workdir, run_.name), run_.steps)
        print(f"# finished: {line}" if done else line)
    total = sum(r.flops for r in runs)
    print(f"# {len(runs)} runs, {total:.3g} training FLOPs in all; afterwards: "
          f"jaxlm scaling fit --workdir={args.workdir}")
    return 0


# == fit and predict ================================================================================

def _fit_settings(args, overrides):
    import ml_collections  # pylint: disable=import-outside-toplevel

    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling import config as scaling_config  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling import settings as scaling_settings  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling import sweep  # pylint: disable=import-outside-toplevel
    mine, others = scaling_config.split_scaling_overrides(overrides)
    if others:
        raise UserError(f"--config.{next(iter(others))}: jaxlm scaling {args.scaling_command} takes only "
                        f"--config.scaling.* overrides (the runs' fields belong to `jaxlm scaling run`)")
    if getattr(args, "config", ""):
        source = config_lib.load_config(args.config)
    else:
        saved = sweep.load_sweep(args.workdir).get("scaling", {}) if os.path.isdir(args.workdir) else {}
        defaults = scaling_config.scaling_section()
        source = ml_collections.ConfigDict({"scaling": {k: v for k, v in saved.items() if k in defaults}})
    return scaling_settings.settings(source, mine)


def _fit_and_print(workdir: str, s, points: str) -> int:
    from jaxlm.scaling import report  # pylint: disable=import-outside-toplevel
    result = report.build(workdir, s, points or None,
                          say=lambda line: print(f"jaxlm scaling: {line}", file=sys.stderr, flush=True))
    print(report.summary(result))
    law, samples, confidence = report.law_of(result)
    print(report.prediction_text(law, samples, confidence, 1e21, report.largest_run_flops(result)))
    files = [report.REPORT_FILE] + result["plots"]
    print(f"wrote {', '.join(os.path.join(workdir, f) for f in files)}", flush=True)
    return 0


def _fit(args, overrides) -> int:
    return _fit_and_print(args.workdir, _fit_settings(args, overrides), args.points)


def _predict(args, overrides) -> int:
    from jaxlm.scaling import report  # pylint: disable=import-outside-toplevel
    from jaxlm.scaling.config import parse_numbers  # pylint: disable=import-outside-toplevel
    if overrides:
        raise UserError(f"--config.{next(iter(overrides))}: jaxlm scaling predict takes no config overrides")
    flops = parse_numbers(args.flops, "--flops")
    params, tokens = parse_numbers(args.params, "--params"), parse_numbers(args.tokens, "--tokens")
    if bool(params) != bool(tokens):
        raise UserError("--params and --tokens go together: give both to predict a model's loss")
    if not flops and not params:
        raise UserError("--flops is required (e.g. --flops=1e21), or --params with --tokens")
    result = report.load(args.workdir)
    law, samples, confidence = report.law_of(result)
    for c in flops:
        print(report.prediction_text(law, samples, confidence, c, report.largest_run_flops(result)))
    iso = result.get("isoflop") or {}
    if iso.get("N_opt"):
        for c in flops:
            n = iso["N_opt"]["k"] * c ** iso["N_opt"]["exponent"]
            d = iso["D_opt"]["k"] * c ** iso["D_opt"]["exponent"]
            print(f"C = {c:.3g} FLOPs, IsoFLOP fit (approach 2): N* = {n:.3g}, D* = {d:.3g}")
    for n, d in zip(params, tokens):
        print(f"N = {n:.3g}, D = {d:.3g}: expected loss {float(law.loss(n, d)):.4f} (C = 6ND = {6 * n * d:.3g})")
    return 0
