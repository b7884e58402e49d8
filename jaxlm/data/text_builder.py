"""A tfds builder that prepares local text files as an ArrayRecord dataset (train + validation).

The config name carries a hash of the files' content and of the options, so changed inputs get a
new dataset directory (a stale preparation is never reused) and unchanged inputs reuse the
existing one. Read it back with `builder.as_data_source(split)`: random access, no tf.data.
"""

import dataclasses
import hashlib
import json
import re

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from jaxlm.data import documents
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


def _file_sha256(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _content_hash(
    train_files: tuple[str, ...], eval_files: tuple[str, ...], eval_fraction: float, doc_split: str
) -> str:
    """Hash of everything that determines the prepared data (not of the file paths)."""
    options = {
        "rules": _PREP_RULES_VERSION,
        "doc_split": doc_split,
        "eval_fraction": None if eval_files else eval_fraction,
        "num_train_files": len(train_files),
        "num_eval_files": len(eval_files),
    }
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in train_files + eval_files:
        digest.update(_file_sha256(path))
    return digest.hexdigest()


def make_text_files_config(
    train_file: str, eval_file: str = "", eval_fraction: float = 0.1, doc_split: str = "blank_line"
) -> TextFilesConfig:
    """Validates the options, resolves the files and names the config by their content hash."""
    documents.check_doc_split(doc_split)
    train_files = documents.resolve_files(train_file, "data.train_file")
    eval_files = documents.resolve_files(eval_file, "data.eval_file") if eval_file.strip() else ()
    if not eval_files and not 0.0 < eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction={eval_fraction} must be in (0, 1), or set data.eval_file")
    stem = epath.Path(train_files[0]).stem.lower()
    readable = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")[:40] or "text"
    content_hash = _content_hash(train_files, eval_files, eval_fraction, doc_split)
    return TextFilesConfig(
        name=f"{readable}_{content_hash[:16]}",
        description=f"{len(train_files)} train, {len(eval_files)} eval text file(s); {doc_split} split",
        train_files=train_files,
        eval_files=eval_files,
        eval_fraction=eval_fraction,
        doc_split=doc_split,
    )


def split_plans(config: TextFilesConfig) -> dict[str, documents.SplitPlan]:
    """Which documents go to train and validation (held out contiguously at the end)."""
    if config.eval_files:
        return {
            TRAIN_SPLIT: documents.SplitPlan(config.train_files, "data.train_file"),
            EVAL_SPLIT: documents.SplitPlan(config.eval_files, "data.eval_file"),
        }
    total = documents.count_raw_documents(config.train_files, config.doc_split, "data.train_file")
    num_eval = max(1, round(total * config.eval_fraction))
    if num_eval >= total:
        raise UserError(
            f"data.train_file has {total} document(s) with data.doc_split={config.doc_split}: too few"
            " to hold some out for validation; add text, use data.doc_split=line, or set data.eval_file"
        )
    return {
        TRAIN_SPLIT: documents.SplitPlan(config.train_files, "data.train_file", 0, total - num_eval),
        EVAL_SPLIT: documents.SplitPlan(config.train_files, "data.train_file", total - num_eval),
    }


def _check_not_empty(split: str, counts: documents.SplitCounts, config: TextFilesConfig) -> None:
    if counts.kept:
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


def scan_documents(
    config: TextFilesConfig, plans: dict[str, documents.SplitPlan]
) -> tuple[dict, set[bytes]]:
    """Reads and cleans every split once, before anything is written: counts and errors.

    Returns the report and the digests of the kept train documents (to keep them out of
    validation).
    """
    counts = {split: documents.SplitCounts() for split in plans}
    train_digests: set[bytes] = set()
    for _ in documents.clean_documents(
        plans[TRAIN_SPLIT], config.doc_split, counts[TRAIN_SPLIT], seen=train_digests
    ):
        pass
    for _ in documents.clean_documents(
        plans[EVAL_SPLIT], config.doc_split, counts[EVAL_SPLIT], excluded=train_digests
    ):
        pass
    for split, split_counts in counts.items():
        _check_not_empty(split, split_counts, config)
    report = {
        "dataset": f"{JaxlmTextFiles.name}/{config.name}",
        "doc_split": config.doc_split,
        "train_files": list(config.train_files),
        "eval_files": list(config.eval_files),
        "eval_fraction": None if config.eval_files else config.eval_fraction,
        "splits": {split: split_counts.as_dict() for split, split_counts in counts.items()},
    }
    return report, train_digests


class JaxlmTextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files as a tfds dataset with one string feature, `text`."""

    VERSION = tfds.core.Version("1.0.0")

    # tfds finds a builder's source through the `importlib_resources` backport, which is not
    # installed on Python >= 3.9; name the file directly (there are no checksums beside it).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents from local text files, cleaned and deduplicated by jaxlm.",
            features=tfds.features.FeaturesDict({TEXT_FEATURE: tfds.features.Text()}),
            # Keep the files' document order: the held-out split is the end of the text.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the inputs are local files.
        plans = split_plans(self.builder_config)
        self._report, train_digests = scan_documents(self.builder_config, plans)
        return {
            TRAIN_SPLIT: self._generate_examples(plans[TRAIN_SPLIT], frozenset()),
            EVAL_SPLIT: self._generate_examples(plans[EVAL_SPLIT], train_digests),
        }

    def _generate_examples(self, plan: documents.SplitPlan, excluded: frozenset[bytes] | set[bytes]):
        # The counts were taken by the scan; this pass re-applies the same rules to write.
        texts = documents.clean_documents(
            plan, self.builder_config.doc_split, documents.SplitCounts(), excluded=excluded
        )
        for index, text in enumerate(texts):
            yield index, {TEXT_FEATURE: text}

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        # data_dir is still tfds's temporary directory here, so the report is renamed into place
        # together with the data: a prepared dataset always has its report.
        report_path = epath.Path(self.data_dir) / REPORT_FILENAME
        report_path.write_text(json.dumps(self._report, indent=2, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class PreparedText:
    builder: JaxlmTextFiles
    report: dict  # Cleaning counts per split, as saved next to the data.
    reused: bool  # True when an existing preparation was found and nothing was rebuilt.


def _log_report(report: dict) -> None:
    for split, counts in report["splits"].items():
        logging.info(
            "%s %s: %d documents read, %d empty dropped, %d duplicates dropped, %d in train dropped,"
            " %d kept, %d bytes",
            report["dataset"], split, counts["documents_read"], counts["empty_dropped"],
            counts["duplicates_dropped"], counts["in_train_dropped"], counts["kept"], counts["bytes"],
        )


def prepare_text_dataset(config: TextFilesConfig, data_dir: str) -> PreparedText:
    """Prepares the dataset under data_dir unless an identical preparation exists already."""
    builder = JaxlmTextFiles(config=config, data_dir=data_dir, file_format="array_record")
    reused = builder.is_prepared()
    if not reused:
        tfds.disable_progress_bar()  # Progress goes to the log, not to tqdm bars.
        download_config = tfds.download.DownloadConfig(try_download_gcs=False)
        try:
            builder.download_and_prepare(download_config=download_config)
        except OSError:
            # Hosts sharing data_dir race to rename their finished copy into place; losing the
            # race is fine as long as a complete copy is there.
            if not builder.is_prepared():
                raise
        builder = JaxlmTextFiles(config=config, data_dir=data_dir, file_format="array_record")
    report = json.loads((epath.Path(builder.data_path) / REPORT_FILENAME).read_text())
    action = "Reusing" if reused else "Prepared"
    logging.info("%s dataset %s in %s", action, report["dataset"], builder.data_path)
    _log_report(report)
    return PreparedText(builder=builder, report=report, reused=reused)
