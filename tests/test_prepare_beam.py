"""`jaxlm prepare`: the Beam preparation gives the single-process dataset (same examples, order,
counts and record bytes), on >= 2 worker processes; errors, the command line and progress lines."""

import collections
import os
import unicodedata

import pytest

from jaxlm import cli
from jaxlm.data import beam_prepare, builders, text_builder
from jaxlm.errors import UserError

CAFE_NFD = unicodedata.normalize("NFD", "Café")
# doc_split=line: one document per line. 21 documents; eval_fraction=0.3 holds out the last 6,
# so the boundary falls inside d.txt (its first line is train).
FILES = {
    "a.txt": ["alpha", "beta  ", "", CAFE_NFD, "alpha", "   "],
    "b.txt": ["Café", "gamma", "beta", "delta", "\t"],  # Café (NFC) and beta repeat a.txt.
    "c.txt": ["epsilon", "zeta", "gamma"],
    "d.txt": ["eta", "alpha", "theta", "theta", "", "alpha", "iota"],
}
TRAIN = ["alpha", "beta", "Café", "gamma", "delta", "epsilon", "zeta", "eta"]
VALIDATION = ["theta", "iota"]  # alpha is in train (twice), the second theta a duplicate.
COUNTS = {
    "train": {"documents_read": 15, "empty_dropped": 3, "duplicates_dropped": 4, "in_train_dropped": 0,
              "kept": 8, "bytes": sum(len(t.encode()) for t in TRAIN)},
    "validation": {"documents_read": 6, "empty_dropped": 1, "duplicates_dropped": 1, "in_train_dropped": 2,
                   "kept": 2, "bytes": 9},
}
TWO_WORKERS = "--direct_running_mode=multi_processing --direct_num_workers=2"
IN_PROCESS = "--direct_running_mode=in_memory --direct_num_workers=1"  # Quick: for error paths.


def _write(directory, files):
    os.makedirs(directory, exist_ok=True)
    for name, lines in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return ",".join(os.path.join(directory, name) for name in files)


def _texts(prepared, split):
    return [record["text"].decode("utf-8") for record in prepared.builder.as_data_source(split)]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The corpus prepared once in one process and once on Beam with 2 worker processes."""
    root = tmp_path_factory.mktemp("corpus")
    train_file = _write(root / "in", FILES)
    config = text_builder.make_text_files_config(train_file, eval_fraction=0.3, doc_split="line")
    single = text_builder.prepare_text_dataset(config, str(root / "single"))
    beam = beam_prepare.prepare_on_beam(config, str(root / "beam"), "DirectRunner", TWO_WORKERS)
    return root, train_file, single, beam


def test_beam_and_single_process_give_the_same_examples_counts_and_bytes(both):
    _, _, single, beam = both
    assert not single.reused and not beam.reused
    assert _texts(single, "train") == TRAIN and _texts(single, "validation") == VALIDATION
    for split in ("train", "validation"):
        assert collections.Counter(_texts(beam, split)) == collections.Counter(_texts(single, split))
        assert _texts(beam, split) == _texts(single, split)  # The order too: keys are file positions.
        name = f"jaxlm_text_files-{split}.array_record-00000-of-00001"
        assert (beam.builder.data_path / name).read_bytes() == (single.builder.data_path / name).read_bytes()
    assert single.report["splits"] == COUNTS and beam.report["splits"] == COUNTS
    saved = builders.read_record(beam.builder, text_builder.REPORT_FILENAME)
    assert saved == beam.report and not (beam.builder.data_path / beam_prepare.COUNTS_FILENAME).exists()
    assert beam.builder.data_path.name == single.builder.data_path.name
    assert beam.builder.data_path.parent.name == single.builder.data_path.parent.name  # Same config name.


def test_beam_ran_on_two_worker_processes(both):
    _, _, single, beam = both
    assert single.report["preparation"] == {"runner": "single_process"}
    preparation = beam.report["preparation"]
    assert preparation["runner"] == "DirectRunner" and preparation["worker_processes"] >= 2
    pids = {int(worker.rsplit(":", 1)[1]) for worker in preparation["workers"]}
    assert len(pids) >= 2 and os.getpid() not in pids


def test_single_process_preparation_reuses_the_beam_one(both):
    root, _, _, beam = both
    again = text_builder.prepare_text_dataset(beam.builder.builder_config, str(root / "beam"))
    assert again.reused and again.report == beam.report
    assert _texts(again, "validation") == VALIDATION


def test_eval_files_on_beam_match_single_process(tmp_path):
    train_file = _write(tmp_path / "train", {"t1.txt": ["one", "two", "one"], "t2.txt": ["three", ""]})
    eval_file = _write(tmp_path / "eval", {"e1.txt": ["two", "four"], "e2.txt": ["four", "five", " "]})
    config = text_builder.make_text_files_config(train_file, eval_file, doc_split="line")
    single = text_builder.prepare_text_dataset(config, str(tmp_path / "single"))
    beam = beam_prepare.prepare_on_beam(config, str(tmp_path / "beam"), "DirectRunner", IN_PROCESS)
    for split, expected in (("train", ["one", "two", "three"]), ("validation", ["four", "five"])):
        assert _texts(single, split) == _texts(beam, split) == expected
    assert beam.report["splits"] == single.report["splits"]
    assert beam.report["splits"]["validation"] == {"documents_read": 5, "empty_dropped": 1, "duplicates_dropped": 1,
                                                   "in_train_dropped": 1, "kept": 2, "bytes": 8}


def test_user_errors_on_beam_are_one_line(tmp_path):
    good = _write(tmp_path / "ok", {"a.txt": ["a", "b", "c"]})
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff broken\n")
    config = text_builder.make_text_files_config(f"{good},{bad}", doc_split="line", eval_fraction=0.3)
    with pytest.raises(UserError, match=r"^data.train_file: .*bad.txt line 2: invalid UTF-8") as error:
        beam_prepare.prepare_on_beam(config, str(tmp_path / "out"), "DirectRunner", IN_PROCESS)
    assert "\n" not in str(error.value)

    in_train = _write(tmp_path / "ev", {"e.txt": ["a", "b"]})  # Every eval document is in train.
    config = text_builder.make_text_files_config(good, in_train, doc_split="line")
    with pytest.raises(UserError, match=r"^data.eval_file: no documents left after cleaning"):
        beam_prepare.prepare_on_beam(config, str(tmp_path / "out"), "DirectRunner", IN_PROCESS)
    with pytest.raises(UserError, match=r"^--beam_runner=NoSuchRunner: Unexpected pipeline runner"):
        beam_prepare.prepare_on_beam(config, str(tmp_path / "out"), "NoSuchRunner")
    with pytest.raises(UserError, match=r"^--beam_pipeline_options=.*invalid int value: 'x'"):
        beam_prepare.prepare_on_beam(config, str(tmp_path / "out"), "DirectRunner", "--direct_num_workers=x")


def test_prepare_command_prints_a_line_per_split(both, capsys):
    root, train_file, single, _ = both
    argv = ["prepare", "--config=configs/tiny_shakespeare.py", f"--config.data.train_file={train_file}",
            "--config.data.doc_split=line", "--config.data.eval_fraction=0.3",
            f"--config.data.data_dir={root / 'single'}"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"train: 8 of 15 documents kept (3 empty, 4 duplicates, 0 also in train dropped), 38 B; reused; "
        f"{single.builder.data_path}",
        f"validation: 2 of 6 documents kept (1 empty, 1 duplicates, 2 also in train dropped), 9 B; reused; "
        f"{single.builder.data_path}",
    ]
    assert cli.main(argv + ["--beam_runner=Flonk"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("jaxlm: error: --beam_runner=Flonk: ")
    assert cli.main(argv[:2] + ["--config.data.train_file=", "--config.data.tfds_name=lm1b"]) == 2
    assert "tfds build lm1b" in capsys.readouterr().err


def test_progress_lines_give_rates_and_eta():
    now = [100.0]
    lines = []
    progress = builders.Progress("cleaning train", total_bytes=4_000_000, interval_s=10.0,
                                 clock=lambda: now[0], log=lambda fmt, line: lines.append(line))
    now[0] += 5.0
    progress.advance(500, 1_000_000)  # 5 s in: quiet (the interval is 10 s).
    assert lines == []
    now[0] += 5.0
    progress.advance(500, 1_000_000)
    assert lines == ["cleaning train: 1000 documents, 2.0 MB of 4.0 MB (50%) in 0:10; 100 documents/s, "
                     "200.0 KB/s, ETA 0:10"]
    now[0] += 10.0
    progress.advance(1000, 2_000_000)
    progress.finish()
    assert lines[-1] == ("cleaning train: 2000 documents, 4.0 MB of 4.0 MB (100%) in 0:20; 100 documents/s, "
                         "200.0 KB/s, ETA 0:00")
    assert builders.format_duration(3725) == "1:02:05"
    # Tokenizing a split: the byte total is unknown, the document count gives the ETA.
    by_documents = builders.Progress("tokenizing validation", 0, total_documents=4000, interval_s=10.0,
                                     clock=lambda: now[0], log=lambda fmt, line: lines.append(line))
    now[0] += 10.0
    by_documents.advance(1000, 500_000)
    assert lines[-1] == ("tokenizing validation: 1000 documents, 500.0 KB (25%) in 0:10; 100 documents/s, "
                         "50.0 KB/s, ETA 0:30")


def test_prepare_command_for_classification_files(tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n", encoding="utf-8")
    held_out = tmp_path / "eval.csv"
    held_out.write_text("text,label\nawful,neg\n", encoding="utf-8")
    argv = ["prepare", "--config=configs/csv_classification.py", f"--config.data.train_file={train}",
            f"--config.data.eval_file={held_out}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    assert cli.main(argv) == 0
    train_line, eval_line = capsys.readouterr().out.splitlines()
    assert train_line.startswith("train: 3 examples, 2 classes; prepared in ")
    assert eval_line.startswith("validation: 1 examples, 2 classes; prepared in ")
    assert cli.main(argv + ["--beam_runner=DirectRunner"]) == 2
    assert "classification files are prepared in one process" in capsys.readouterr().err


def test_prepare_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: '' = one process, no Beam)" in text and "(default: '' = none)" in text


class _RacedTextFiles(text_builder.JaxlmTextFiles, skip_registration=True):
    """Another host finishes the same preparation while this one is still writing: its copy
    is renamed into place first, so this host's rename fails."""

    name = text_builder.JaxlmTextFiles.name

    def _record(self) -> dict:
        winner = text_builder.prepare_text_dataset(self.builder_config, self._winner_data_dir)
        assert not winner.reused
        return super()._record()


def test_a_host_that_loses_the_rename_race_uses_the_winners_copy(tmp_path):
    train_file = _write(tmp_path / "in", {"a.txt": ["one", "two", "three", "four"]})
    config = text_builder.make_text_files_config(train_file, eval_fraction=0.25, doc_split="line")
    data_dir = str(tmp_path / "shared")
    _RacedTextFiles._winner_data_dir = data_dir
    loser = text_builder.prepare_text_dataset(config, data_dir, builder_cls=_RacedTextFiles)
    assert not loser.reused
    assert _texts(loser, "train") == ["one", "two", "three"] and _texts(loser, "validation") == ["four"]
    leftovers = [p.name for p in loser.builder.data_path.parent.iterdir() if p.name != "1.0.0"]
    assert leftovers == []  # The loser's temporary copy is gone.
