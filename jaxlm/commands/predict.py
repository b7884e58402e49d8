"""`jaxlm predict`: label a file of texts with a classification checkpoint."""

import argparse

from jaxlm import console
from jaxlm.commands import common

NAME = "predict"
HELP = "label a file of texts with a classification checkpoint"
DESCRIPTION = ("Classify every row of --input (CSV/TSV/JSONL/Parquet with a text column, or .txt with one text "
               "per line) with a classification run's checkpoint. --output (.csv/.tsv/.jsonl) gets the "
               "input's columns plus label (the predicted class name), score (its probability) and "
               "prob_<class> per class. Texts are tokenized and truncated as in training.")
NEEDS = ("workdir", "input", "output")


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_flags(parser)
    parser.add_argument("--input", required=False, help="file to label: .csv, .tsv, .jsonl, .parquet or .txt")
    parser.add_argument("--output", required=False, help="new file for the predictions: .csv, .tsv or .jsonl")
    parser.add_argument("--text_column", default="", help="column/key of the text (default: the run's "
                                                          "data.text_column)")
    parser.add_argument("--text_pair_column", default="", help="second text column of a pair classifier "
                                                               "(default: the run's data.text_pair_column)")
    parser.add_argument("--header", default="", choices=("", "true", "false"), metavar="true|false",
                        help="false: a CSV/TSV --input without a header line, its columns numbered from 1 "
                             "(default: as the run's data.header)")
    parser.add_argument("--batch_size", type=int, default=64, help="rows per forward pass")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jaxlm import predict  # pylint: disable=import-outside-toplevel
    common.check_bucket_exists("--output", args.output)
    from jaxlm import bucket_probe  # pylint: disable=import-outside-toplevel
    bucket_probe.check_reachable(args.workdir)  # One line, not gcsfs's 33 s of retries.
    console.log_to_workdir(args.workdir)
    classifier, predictions = predict.run_predict(
        args.workdir, args.input, args.output, overrides, step=args.step, best=args.best,
        text_column=args.text_column, text_pair_column=args.text_pair_column, batch_size=args.batch_size,
        overwrite=args.overwrite, header={"": None, "true": True, "false": False}[args.header])
    counts = np.bincount(predictions.labels, minlength=len(classifier.label_names))
    summary = ", ".join(f"{name} {count}" for name, count in zip(classifier.label_names, counts))
    print(f"labelled {len(predictions.labels)} rows with step {classifier.step} ({summary}); wrote {args.output}",
          flush=True)
    return 0
