"""`jaxlm prepare`: prepare a recipe's data files as a tfds dataset, alone or on Apache Beam."""

import argparse
import time

from jaxlm import console
from jaxlm.commands import common
from jaxlm.errors import UserError

NAME = "prepare"
HELP = "prepare a recipe's data files as a tfds dataset (single process or Apache Beam)"
DESCRIPTION = ("Clean (NFC, empty documents dropped, exact duplicates removed) and write data.train_file "
               "(+ data.eval_file) as the ArrayRecord tfds dataset that training reads, in data.data_dir. "
               "Training prepares it at its first start the same way; run this first for large corpora: "
               "--beam_runner=DirectRunner uses every core, DataflowRunner/FlinkRunner/SparkRunner a cluster "
               "(pip install 'jaxlm[beam]'). Both paths give the same dataset, so either reuses the other's.")
NEEDS = ("config",)


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_recipe_flags(parser, "configs/tiny_shakespeare.py")
    parser.add_argument("--beam_runner", default="",
                        help="Apache Beam runner, e.g. DirectRunner (local, one worker process per core), "
                             "DataflowRunner, FlinkRunner, SparkRunner (default: '' = one process, no Beam)")
    parser.add_argument("--beam_pipeline_options", default="",
                        help="Beam pipeline options as one shell-quoted string, e.g. \"--direct_num_workers=4\" "
                             "or \"--project=P --region=R --temp_location=gs://B/tmp\" (default: '' = none)")


def _size(count: int) -> str:
    from jaxlm.data import builders  # pylint: disable=import-outside-toplevel
    return builders.format_bytes(count)


def _text_lines(prepared, seconds: float) -> list[str]:
    how = "reused" if prepared.reused else f"prepared in {seconds:.1f} s"
    preparation = prepared.report.get("preparation", {})
    if not prepared.reused and preparation.get("worker_processes"):
        how += f" on {preparation['runner']} by {preparation['worker_processes']} worker processes"
    lines = []
    for split, c in prepared.report["splits"].items():
        lines.append(f"{split}: {c['kept']} of {c['documents_read']} documents kept ({c['empty_dropped']} empty, "
                     f"{c['duplicates_dropped']} duplicates, {c['in_train_dropped']} also in train dropped), "
                     f"{_size(c['bytes'])}; {how}; {prepared.builder.data_path}")
    return lines


def _prepare_text(data_config, data_dir: str, args: argparse.Namespace):
    from jaxlm.data import text_builder  # pylint: disable=import-outside-toplevel
    config = text_builder.config_from_data(data_config)
    if not args.beam_runner:
        return text_builder.prepare_text_dataset(config, data_dir)
    try:
        from jaxlm.data import beam_prepare  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise UserError("--beam_runner needs Apache Beam: pip install 'jaxlm[beam]'") from None
    # The workers' and the runner's chatter goes to the log, not the console.
    with console.native_output_to_log("apache_beam"):
        return beam_prepare.prepare_on_beam(config, data_dir, args.beam_runner, args.beam_pipeline_options)


def _prepare_labeled(data_config, data_dir: str, args: argparse.Namespace) -> list[str]:
    from jaxlm.data import labeled_builder  # pylint: disable=import-outside-toplevel
    if args.beam_runner:
        raise UserError("--beam_runner: Beam preparation is for text corpora (task causal_lm or masked_lm); "
                        "classification files are prepared in one process: drop --beam_runner")
    start = time.monotonic()
    prepared = labeled_builder.prepare_labeled_dataset(labeled_builder.make_labeled_files_config(data_config),
                                                       data_dir)
    how = "reused" if prepared.reused else f"prepared in {time.monotonic() - start:.1f} s"
    splits = prepared.builder.info.splits
    return [f"{split}: {splits[split].num_examples} examples, {len(prepared.vocab.names)} classes; {how}; "
            f"{prepared.builder.data_path}" for split in (labeled_builder.TRAIN_SPLIT, labeled_builder.EVAL_SPLIT)]


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    from jaxlm.data import sources  # pylint: disable=import-outside-toplevel
    config = config_lib.load_recipe(args.config, overrides)
    data_config = config.data
    if not (data_config.get("train_file", "") or "").strip():
        name = (data_config.get("tfds_name", "") or "").strip()
        if name:
            raise UserError(f"data.tfds_name={name}: a tfds dataset, nothing to prepare from files; prepare it "
                            f"with: tfds build {name} --file_format=array_record")
        raise UserError("data.train_file is empty; set it to the text files to prepare")
    data_dir = sources.data_dir_of(data_config)
    console.tfds_prints_to_log()
    if config.get("task", "causal_lm") == "classification":
        lines = _prepare_labeled(data_config, data_dir, args)
    else:
        start = time.monotonic()
        prepared = _prepare_text(data_config, data_dir, args)
        lines = _text_lines(prepared, time.monotonic() - start)
    for line in lines:
        print(line, flush=True)
    return 0
