"""Preparing a text-file dataset on Apache Beam (the `jaxlm[beam]` extra): `jaxlm prepare --beam_runner`.

The same dataset as the single-process builder (text_builder), example for example and in the
same order: same features, same cleaning (documents.clean_document, documents.outcome), same
counts report. One pipeline serves both splits:

    files ─Reshuffle─► read (a worker per file: its documents, cleaned, and their count)
      ─► place (global index from the per-file counts: the held-out split is the end of the text)
      ─► group by content digest ─► decide (documents.outcome over the copies, in file order)
      ├► kept, per split: (global index, {"text": …}) ─► tfds's BeamWriter (ArrayRecord; with
      │   shuffling disabled it writes in key order, so the order is the files' order)
      └► outcomes ─► counts per split ─► a counts file in the data directory ─► the report

Duplicates are removed globally (all files, all workers): the copy with the smallest (file,
document) position is kept, which is the single-process rule "the first occurrence wins".
A file is read by one worker (its documents then spread over all of them): a big corpus should
come as many files.
"""

import contextlib
import io
import json
import os
import re
import shlex
import socket

import apache_beam as beam
from etils import epath

from jaxlm.data import builders, documents, text_builder
from jaxlm.errors import UserError

COUNTS_FILENAME = "jaxlm_beam_counts.json"  # Written by the pipeline, read into the report.
_FIELD = {text_builder.TRAIN_SPLIT: "data.train_file", text_builder.EVAL_SPLIT: "data.eval_file"}
_SPLIT_RANK = {text_builder.TRAIN_SPLIT: 0, text_builder.EVAL_SPLIT: 1}  # Train's copies come first.
# A UserError raised on a worker reaches the driver as the runner's own exception, whose text
# holds the worker's; the markers let the driver find the one-line message in it.
_USER_ERROR = re.compile(r"<jaxlm-user-error>(.*?)</jaxlm-user-error>", re.DOTALL)


def _as_worker_error(error: UserError) -> RuntimeError:
    return RuntimeError(f"<jaxlm-user-error>{error}</jaxlm-user-error>")


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError a worker raised, from the text of the runner's exception (None if none)."""
    found = _USER_ERROR.search(str(error))
    return UserError(found.group(1).replace("\\'", "'")) if found else None


class _ReadFile(beam.DoFn):
    """(group, file index, path) -> (group, file index, document index, cleaned text) per raw
    document; the file's document count and this worker's id go to side outputs."""

    def __init__(self, doc_split: str):
        self._doc_split = doc_split

    def process(self, element):
        group, file_index, path = element
        worker = f"{socket.gethostname()}:{os.getpid()}"
        progress = builders.Progress(f"worker {worker}: {os.path.basename(path)}", builders.file_size(path))
        count = 0
        try:
            for count, raw in enumerate(documents.raw_documents(path, self._doc_split, _FIELD[group]), 1):
                progress.advance(1, documents.progress_bytes(path, raw))
                yield group, file_index, count - 1, documents.clean_document(raw)
        except UserError as e:
            raise _as_worker_error(e) from None
        progress.file_done(path)
        progress.finish()
        yield beam.pvalue.TaggedOutput("counts", ((group, file_index), count))
        yield beam.pvalue.TaggedOutput("workers", worker)


def _layout(counts: dict, config) -> dict:
    """Offsets of each file in its group's document stream, and where validation starts."""
    offsets, total = {}, 0
    for file_index in range(len(config.train_files)):
        offsets[(text_builder.TRAIN_SPLIT, file_index)] = total
        total += counts[(text_builder.TRAIN_SPLIT, file_index)]
    eval_offset = 0
    for (group, file_index), count in sorted(counts.items()):
        if group == text_builder.EVAL_SPLIT:
            offsets[(group, file_index)] = eval_offset
            eval_offset += count
    boundary = None  # With eval files, every train document is train.
    if not config.eval_files:
        try:
            boundary = total - text_builder.num_held_out(config, total)
        except UserError as e:
            raise _as_worker_error(e) from None
    return {"offsets": offsets, "boundary": boundary}


def _place(document, layout: dict):
    """-> (split, global index, text): without eval files, the last documents are validation."""
    group, file_index, local_index, text = document
    index = layout["offsets"][(group, file_index)] + local_index
    boundary = layout["boundary"]
    split = group if boundary is None else (
        text_builder.TRAIN_SPLIT if index < boundary else text_builder.EVAL_SPLIT)
    return split, index, text


def _decide(digest_copies):
    """The copies of one text, in (split, index) order -> (split, index, text, outcome)."""
    _, copies = digest_copies
    copies = sorted(copies, key=lambda copy: (_SPLIT_RANK[copy[0]], copy[1]))
    kept_in = set()
    in_train = False
    for split, index, text in copies:
        result = documents.outcome(text, split in kept_in, split == text_builder.EVAL_SPLIT and in_train)
        if result == documents.KEPT:
            kept_in.add(split)
            in_train = in_train or split == text_builder.TRAIN_SPLIT
        yield split, index, text, result


def _count_items(decided):
    split, _, text, result = decided
    yield (split, "documents_read"), 1
    yield (split, result), 1
    if result == documents.KEPT:
        yield (split, "bytes"), len(text.encode("utf-8"))


def _write_counts(counts: list, workers: list, path: str) -> None:
    splits = {split: documents.SplitCounts().as_dict() for split in _SPLIT_RANK}
    for (split, field), value in counts:
        splits[split][field] = value
    epath.Path(path).write_text(json.dumps({"splits": splits, "workers": sorted(workers)}, sort_keys=True))


def build_pipeline(pipeline, config: text_builder.TextFilesConfig, counts_path: str) -> dict:
    """Adds the preparation to `pipeline`; returns {split: PCollection of (key, example)}."""
    train, evaluation = text_builder.TRAIN_SPLIT, text_builder.EVAL_SPLIT
    inputs = [(train, i, path) for i, path in enumerate(config.train_files)]
    inputs += [(evaluation, i, path) for i, path in enumerate(config.eval_files)]
    read = (pipeline
            | "Files" >> beam.Create(inputs)
            | "SpreadFiles" >> beam.Reshuffle()  # Else one worker would read every file.
            | "Read" >> beam.ParDo(_ReadFile(config.doc_split)).with_outputs("counts", "workers", main="docs"))
    layout = (read.counts
              | "CountsByFile" >> beam.combiners.ToDict()
              | "Layout" >> beam.Map(_layout, config))
    placed = read.docs | "Place" >> beam.Map(_place, layout=beam.pvalue.AsSingleton(layout))
    texts, empties = placed | "Empty" >> beam.Partition(lambda doc, _: 0 if doc[2] else 1, 2)
    decided = (texts
               | "ByDigest" >> beam.Map(lambda doc: (documents.document_digest(doc[2]), doc))
               | "Copies" >> beam.GroupByKey()
               | "Decide" >> beam.FlatMap(_decide))
    dropped_empty = empties | "EmptyOutcome" >> beam.Map(lambda doc: (*doc, documents.EMPTY))
    workers = read.workers | "Workers" >> beam.Distinct() | "WorkerList" >> beam.combiners.ToList()
    _ = ((decided, dropped_empty)
         | "Outcomes" >> beam.Flatten()
         | "CountItems" >> beam.FlatMap(_count_items)
         | "Sum" >> beam.CombinePerKey(sum)
         | "CountList" >> beam.combiners.ToList()
         | "WriteCounts" >> beam.Map(_write_counts, beam.pvalue.AsSingleton(workers), counts_path))
    return {split: (decided
                    | f"Kept_{split}" >> beam.Filter(lambda d, s=split: d[0] == s and d[3] == documents.KEPT)
                    | f"Example_{split}" >> beam.Map(lambda d: (d[1], {text_builder.TEXT_FEATURE: d[2]})))
            for split in (train, evaluation)}


class BeamTextFiles(text_builder.JaxlmTextFiles, skip_registration=True):
    """JaxlmTextFiles prepared by a Beam pipeline: the same name, config, features and files."""

    name = text_builder.JaxlmTextFiles.name

    def _split_generators(self, dl_manager, pipeline):  # `pipeline`: tfds hands us its pipeline.
        del dl_manager
        self._counts_path = epath.Path(self.data_dir) / COUNTS_FILENAME
        return build_pipeline(pipeline, self.builder_config, os.fspath(self._counts_path))

    def _download_and_prepare(self, dl_manager, download_config=None):
        self._runner = str(download_config.beam_runner)
        super()._download_and_prepare(dl_manager, download_config)

    def _record(self) -> dict:
        counts = json.loads(self._counts_path.read_text())
        self._counts_path.unlink()
        for split, split_counts in counts["splits"].items():
            text_builder.check_not_empty(split, split_counts["kept"], self.builder_config)
        preparation = {"runner": self._runner, "worker_processes": len(counts["workers"]),
                       "workers": counts["workers"]}  # host:pid of each worker process that read files
        return text_builder.counts_report(self.builder_config, counts["splits"], preparation)


def pipeline_options(runner: str, options: str):
    """--beam_pipeline_options as PipelineOptions; DirectRunner runs in several processes (one
    per core) unless the options say otherwise."""
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    try:
        flags = shlex.split(options or "")
    except ValueError as e:
        raise UserError(f"--beam_pipeline_options={options!r}: {e}; quote it as a shell would") from None
    if runner == "DirectRunner":
        if not any(f.startswith("--direct_running_mode") for f in flags):
            flags.append("--direct_running_mode=multi_processing")
        if not any(f.startswith("--direct_num_workers") for f in flags):
            flags.append(f"--direct_num_workers={max(2, os.cpu_count() or 2)}")
    parsed = PipelineOptions(flags)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed.get_all_options()  # Parses now: a bad value is a user error, not argparse's exit.
    except SystemExit:
        reason = (said.getvalue().strip().splitlines() or ["an invalid value"])[-1].split("error: ")[-1]
        raise UserError(f"--beam_pipeline_options={options!r}: {reason}; fix that option") from None
    return parsed


def check_runner(runner: str) -> None:
    from apache_beam.runners import runner as runner_lib  # pylint: disable=import-outside-toplevel
    try:
        runner_lib.create_runner(runner)
    except (ValueError, ImportError) as e:
        reason = str(e).splitlines()[0].split(". Valid values")[0]
        raise UserError(f"--beam_runner={runner}: {reason}; use DirectRunner, DataflowRunner, FlinkRunner, "
                        "SparkRunner, PortableRunner or a PipelineRunner class's full name") from None


def prepare_on_beam(config: text_builder.TextFilesConfig, data_dir: str, runner: str,
                    options: str = "") -> text_builder.PreparedText:
    """Prepares (or reuses) the dataset of `config` under data_dir with a Beam pipeline."""
    check_runner(runner)
    download_config = builders.local_download_config(
        beam_runner=runner, beam_options=pipeline_options(runner, options))
    try:
        return text_builder.prepare_text_dataset(config, data_dir, BeamTextFiles, download_config)
    except UserError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        found = user_error_in(e) or _empty_split_error(e, config)
        if found is None:
            raise
        raise found from None


def _empty_split_error(error: Exception, config) -> UserError | None:
    """tfds's writer stops a pipeline whose split has no example: the same error as without Beam."""
    found = re.search(r"generated examples is 0 for split (\w+)", str(error))
    if not found or found.group(1) not in _SPLIT_RANK:
        return None
    try:
        text_builder.check_not_empty(found.group(1), 0, config)
    except UserError as e:
        return e
    return None
