"""jaxlm.io on real files: atomic writes (content, no temp file left, umask mode), JSONL append and
truncate (torn lines), read_json errors, listing."""

import json
import re
import os
import stat

import pytest

from jaxlm import io
from jaxlm.errors import UserError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Sets the process umask for one test and puts the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_write_json_atomic_replaces_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "best.json"
    io.write_json_atomic(target, {"step": 1, "value": 0.5})
    io.write_json_atomic(str(target), {"value": 0.25, "step": 2})
    assert target.read_text() == '{\n  "step": 2,\n  "value": 0.25\n}\n'  # Sorted keys, final newline.
    assert os.listdir(tmp_path) == ["best.json"]


def test_unserialisable_value_keeps_the_old_file(tmp_path):
    target = tmp_path / "best.json"
    io.write_json_atomic(target, {"step": 1})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        io.write_json_atomic(target, {"step": 2, "params": object()})  # json.dumps fails mid-way.
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["best.json"]


def test_failure_inside_open_atomic_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.csv"
    io.write_text_atomic(target, "a,b\n1,2\n")
    with pytest.raises(RuntimeError):
        with io.open_atomic(target) as f:
            f.write("a,b\n3,")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "a,b\n1,2\n"
    assert os.listdir(tmp_path) == ["out.csv"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_file_mode_is_what_open_gives_under_the_umask(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "reference", "w") as f:
        f.write("x")
    io.write_text_atomic(tmp_path / "text", "x")
    io.write_bytes_atomic(tmp_path / "bytes", b"x")
    io.write_json_atomic(tmp_path / "json", {})
    io.copy_file(tmp_path / "reference", tmp_path / "copy")
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "reference") == expected
    assert {name: _mode(tmp_path / name) for name in ("text", "bytes", "json", "copy")} == dict.fromkeys(
        ("text", "bytes", "json", "copy"), expected)


def test_text_is_written_as_is(tmp_path):
    io.write_text_atomic(tmp_path / "t.tsv", "é\tb\r\nc\n")  # No newline translation, UTF-8.
    assert (tmp_path / "t.tsv").read_bytes() == "é\tb\r\nc\n".encode("utf-8")


def test_truncate_jsonl_keeps_accepted_records_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    torn = '{"step": 6, "train/lo'
    path.write_text("".join(lines) + torn)
    io.truncate_jsonl(path, lambda r: r["step"] <= 3)
    assert path.read_text() == "".join(lines[:3])  # Byte-identical lines, in order.
    io.truncate_jsonl(path, lambda r: True)
    assert path.read_text() == "".join(lines[:3])
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_truncate_jsonl_drops_a_line_cut_inside_a_utf8_character(tmp_path):
    path = tmp_path / "m.jsonl"
    whole = json.dumps({"step": 1, "note": "é"}, ensure_ascii=False).encode("utf-8") + b"\n"
    cut = json.dumps({"step": 2, "note": "é"}, ensure_ascii=False).encode("utf-8")[:-3]  # Inside 'é'.
    path.write_bytes(whole + cut)
    io.truncate_jsonl(path, lambda r: True)
    assert path.read_bytes() == whole
    assert io.read_jsonl(path) == [{"step": 1, "note": "é"}]


def test_truncate_jsonl_on_a_missing_file_creates_nothing(tmp_path):
    io.truncate_jsonl(tmp_path / "none.jsonl", lambda r: True)
    assert os.listdir(tmp_path) == []


def test_jsonl_appender_appends_and_survives_reopen(tmp_path):
    path = tmp_path / "metrics.jsonl"
    appender = io.JsonlAppender(path)
    appender.append({"step": 1, "loss": 2.5})
    assert io.read_jsonl(path) == [{"step": 1, "loss": 2.5}]  # On disk before close: a kill keeps it.
    appender.append({"step": 2, "loss": 2.0})
    appender.close()
    appender = io.JsonlAppender(path)
    appender.append({"step": 3, "loss": 1.5})
    appender.close()
    io.append_jsonl(path, {"step": 4, "loss": 1.0})
    assert io.read_jsonl(path) == [{"step": s, "loss": v} for s, v in [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]]


def test_jsonl_appender_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    io.append_jsonl(path, {"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'
    assert io.read_jsonl(path) == [{"step": 1}, {"step": 3}]


def test_read_json(tmp_path):
    good, bad = tmp_path / "config.json", tmp_path / "best.json"
    good.write_text('{"task": "lm"}')
    bad.write_text('{"step": 3, "val')
    assert io.read_json(good) == {"task": "lm"}
    assert io.read_json(tmp_path / "absent.json", default=None) is None
    assert io.read_json(good, default=None) == {"task": "lm"}
    with pytest.raises(UserError, match="^" + re.escape(f"{bad}: not readable as JSON")):
        io.read_json(bad)
    with pytest.raises(UserError, match="^" + re.escape(f"{bad}: not readable as JSON")):
        io.read_json(bad, default={})  # A default is for a missing file, not a broken one.
    with pytest.raises(UserError, match="^" + re.escape(f"{tmp_path / 'absent.json'}: no such file")):
        io.read_json(tmp_path / "absent.json")


def test_listing_and_existence(tmp_path):
    for name in ("b", "a", "10", "2"):
        (tmp_path / name).write_text("")
    io.make_dirs(tmp_path / "sub" / "deeper")
    io.make_dirs(tmp_path / "sub" / "deeper")  # Already there: fine.
    assert io.list_dir(tmp_path) == ["10", "2", "a", "b", "sub"]
    assert io.list_dir(tmp_path / "missing") == []
    assert io.list_dir(tmp_path / "a") == []
    kinds = {name: (io.exists(tmp_path / name), io.is_file(tmp_path / name), io.is_dir(tmp_path / name))
             for name in ("a", "sub", "missing")}
    assert kinds == {"a": (True, True, False), "sub": (True, False, True), "missing": (False, False, False)}
    io.remove(tmp_path / "a")
    io.remove(tmp_path / "a", missing_ok=True)
    io.remove_tree(tmp_path / "sub")
    assert io.list_dir(tmp_path) == ["10", "2", "b"]


def test_copy_file_and_reads(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "src.bin").write_bytes(data)
    io.copy_file(str(tmp_path / "src.bin"), tmp_path / "dst.bin")
    assert io.read_bytes(tmp_path / "dst.bin") == data
    io.write_text_atomic(tmp_path / "t.txt", "héllo\n")
    assert io.read_text(tmp_path / "t.txt") == "héllo\n"
    assert sorted(os.listdir(tmp_path)) == ["dst.bin", "src.bin", "t.txt"]


def test_path_expands_home_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert os.fspath(io.path("~/runs/x")) == os.path.join(str(tmp_path), "runs", "x")
    assert os.fspath(io.path("runs/y")) == os.path.join(str(tmp_path), "runs", "y")
    assert os.fspath(io.path("gs://bucket/runs/z")) == "gs://bucket/runs/z"
    assert os.fspath(io.path("gs://bucket/runs") / "metrics.jsonl") == "gs://bucket/runs/metrics.jsonl"
    assert io.is_remote("gs://bucket/runs") and not io.is_remote(tmp_path)
