"""A tfds builder that prepares local text files as an ArrayRecord dataset (train + validation).

The config name carries a hash of the files' content and of the options, so changed inputs get a
new dataset directory (a stale preparation is never reused) and unchanged inputs reuse the
existing one. Read it back with `builder.as_data_source(split)`: random access, no tf.data.
What both jaxlm builders share (hash, naming, the multi-host guard, the saved record, progress)
is in builders.py; beam_prepare.py builds this same dataset with an Apache Beam pipeline.
"""

import dataclasses

import tensorflow_datasets as tfds
from absl import logging

from jaxlm import io
from jaxlm.data import builders, documents
from jaxlm.errors import UserError

TEXT_FEATURE = "text"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
REPORT_FILENAME = "jaxlm_prep_report.json"
# Bump when the cleaning rules change, so older preparations are not reused.
_PREP_RULES_VERSION = 1


# repr=False keeps BuilderConfig's short repr: tfds logs it, and file lists can be long.
@dataclasses.dataclass(repr=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Inputs of a text-file dataset. Build it with `make_text_files_config`."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()  # Empty: hold out the last eval_fraction of the documents.
    eval_fraction: float = 0.1
    doc_split: str = "blank_line"


def _content_hash(
    train_files: tuple[str, ...], eval_files: tuple[str, ...], eval_fraction: float, doc_split: str
) -> str:
    options = {
        "rules": _PREP_RULES_VERSION,
        "doc_split": doc_split,
        "eval_fraction": None if eval_files else eval_fraction,
        "num_train_files": len(train_files),
        "num_eval_files": len(eval_files),
    }
    return builders.content_hash(options, train_files + eval_files)


def make_text_files_config(
    train_file: str, eval_file: str = "", eval_fraction: float = 0.1, doc_split: str = "blank_line"
) -> TextFilesConfig:
    """Validates the options, resolves the files and names the config by their content hash."""
    documents.check_doc_split(doc_split)
    train_files = builders.resolve_files(train_file, "data.train_file")
    eval_files = builders.resolve_files(eval_file, "data.eval_file") if eval_file.strip() else ()
    if not eval_files and not 0.0 < eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction={eval_fraction} must be in (0, 1), or set data.eval_file")
    content_hash = _content_hash(train_files, eval_files, eval_fraction, doc_split)
    return TextFilesConfig(
        name=builders.config_name(train_files[0], content_hash, "text"),
        description=f"{len(train_files)} train, {len(eval_files)} eval text file(s); {doc_split} split",
        train_files=train_files,
        eval_files=eval_files,
        eval_fraction=eval_fraction,
        doc_split=doc_split,
    )


def config_from_data(data_config) -> TextFilesConfig:
    """The config of `data.train_file` (+ eval_file, eval_fraction, doc_split)."""
    return make_text_files_config(
        train_file=data_config.train_file,
        eval_file=data_config.get("eval_file", "") or "",
        eval_fraction=float(data_config.get("eval_fraction", 0.1)),
        doc_split=data_config.get("doc_split", "blank_line"),
    )


def num_held_out(config: TextFilesConfig, total: int) -> int:
    """How many documents at the end of the train files are held out for validation."""
    num_eval = max(1, round(total * config.eval_fraction))
    if num_eval >= total:
        raise UserError(
            f"data.train_file has {total} document(s) with data.doc_split={config.doc_split}: too few"
            " to hold some out for validation; add text, use data.doc_split=line, or set data.eval_file"
        )
    return num_eval


def split_plans(config: TextFilesConfig) -> dict[str, documents.SplitPlan]:
    """Which documents go to train and validation (held out contiguously at the end)."""
    if config.eval_files:
        return {
            TRAIN_SPLIT: documents.SplitPlan(config.train_files, "data.train_file"),
            EVAL_SPLIT: documents.SplitPlan(config.eval_files, "data.eval_file"),
        }
    total = documents.count_raw_documents(config.train_files, config.doc_split, "data.train_file")
    boundary = total - num_held_out(config, total)
    return {
        TRAIN_SPLIT: documents.SplitPlan(config.train_files, "data.train_file", 0, boundary),
        EVAL_SPLIT: documents.SplitPlan(config.train_files, "data.train_file", boundary),
    }


def check_not_empty(split: str, kept: int, config: TextFilesConfig) -> None:
    if kept:
        return
    if split == TRAIN_SPLIT:
        raise UserError("data.train_file: no documents left after cleaning (all empty or duplicates)")
    if config.eval_files:
        raise UserError(
            "data.eval_file: no documents left after cleaning (all empty, duplicates, or also in"
            " train); give other evaluation text"
        )
    raise UserError(
        "data.train_file: the held-out validation documents are all empty or also in train;"
        " raise data.eval_fraction or set data.eval_file"
    )


def counts_report(config: TextFilesConfig, splits: dict[str, dict[str, int]], preparation: dict) -> dict:
    """What is saved next to the data: the inputs and, per split, the cleaning counts."""
    return {
        "dataset": f"{JaxlmTextFiles.name}/{config.name}",
        "doc_split": config.doc_split,
        "train_files": list(config.train_files),
        "eval_files": list(config.eval_files),
        "eval_fraction": None if config.eval_files else config.eval_fraction,
        "splits": splits,
        "preparation": preparation,  # How it was prepared: {"runner": "single_process"} or Beam's.
    }


def scan_documents(
    config: TextFilesConfig, plans: dict[str, documents.SplitPlan]
) -> tuple[dict, set[bytes]]:
    """Reads and cleans every split once, before anything is written: counts and errors.

    Returns the report and the digests of the kept train documents (to keep them out of
    validation).
    """
    counts = {split: documents.SplitCounts() for split in plans}
    seen = {TRAIN_SPLIT: set(), EVAL_SPLIT: None}
    for split in (TRAIN_SPLIT, EVAL_SPLIT):
        progress = builders.plan_progress(plans[split], f"cleaning {split}")
        for _ in documents.clean_documents(
                plans[split], config.doc_split, counts[split], seen=seen[split],
                excluded=seen[TRAIN_SPLIT] if split == EVAL_SPLIT else frozenset(), progress=progress):
            pass
        progress.finish()
    for split, split_counts in counts.items():
        check_not_empty(split, split_counts.kept, config)
    splits = {split: split_counts.as_dict() for split, split_counts in counts.items()}
    return counts_report(config, splits, {"runner": "single_process"}), seen[TRAIN_SPLIT]


class JaxlmTextFiles(builders.LocalFilesBuilder):
    """Local text files as a tfds dataset with one string feature, `text`."""

    DESCRIPTION = "Documents from local text files, cleaned and deduplicated by jaxlm."
    RECORD_FILENAME = REPORT_FILENAME

    def _features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict({TEXT_FEATURE: tfds.features.Text()})

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the inputs are local files.
        plans = split_plans(self.builder_config)
        self._report, train_digests = scan_documents(self.builder_config, plans)
        return {
            TRAIN_SPLIT: self._generate_examples(plans[TRAIN_SPLIT], frozenset(), TRAIN_SPLIT),
            EVAL_SPLIT: self._generate_examples(plans[EVAL_SPLIT], train_digests, EVAL_SPLIT),
        }

    def _generate_examples(self, plan: documents.SplitPlan, excluded, split: str):
        # The counts were taken by the scan; this pass re-applies the same rules to write.
        progress = builders.plan_progress(plan, f"writing {split}")
        texts = documents.clean_documents(
            plan, self.builder_config.doc_split, documents.SplitCounts(), excluded=excluded,
            progress=progress)
        for index, text in enumerate(texts):
            yield index, {TEXT_FEATURE: text}
        progress.finish()

    def _record(self) -> dict:
        return self._report


@dataclasses.dataclass(frozen=True)
class PreparedText:
    builder: JaxlmTextFiles
    report: dict  # Cleaning counts per split, as saved next to the data.
    reused: bool  # True when an existing preparation was found and nothing was rebuilt.


def prepare_text_dataset(config: TextFilesConfig, data_dir: str, builder_cls=None,
                         download_config=None) -> PreparedText:
    """Prepares the dataset under data_dir unless an identical preparation exists already.

    builder_cls / download_config: the Beam preparation's (beam_prepare.prepare_on_beam);
    by default the single-process one. Both give the same dataset, so either reuses the other's.
    """
    builder, reused = builders.prepare(builder_cls or JaxlmTextFiles, config, data_dir, download_config)
    report = builders.read_record(builder, REPORT_FILENAME)
    action = "Reusing" if reused else "Prepared"
    where = builder.data_path
    if io.is_remote(data_dir):
        where = f"{data_dir} (this host reads its copy in {builder.data_path})"
    logging.info("%s dataset %s in %s", action, report["dataset"], where)
    builders.log_split_counts(report)
    return PreparedText(builder=builder, report=report, reused=reused)


def prepare_from_data(data_config, data_dir: str) -> PreparedText:
    """`data.train_file` (+ eval_file, eval_fraction, doc_split) prepared under data_dir, or the
    identical preparation found there."""
    return prepare_text_dataset(config_from_data(data_config), data_dir)
