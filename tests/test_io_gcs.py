"""jaxlm.io on a bucket: every function against a real GCS JSON-API server on localhost
(fake-gcs-server, tests/gcs_server.py). What the bucket holds is checked through the server's
own API, not through the client under test."""

import json
import os
import subprocess
import sys

import pytest
from gcs_server import gcs  # noqa: F401  (the module-scoped fixture)

from jaxlm import io
from jaxlm.errors import UserError


@pytest.fixture
def bucket(gcs):  # noqa: F811
    """A fresh gs:// prefix, with the endpoint variables set in this process for the test."""
    with gcs.environ():
        yield gcs.fresh_prefix()


def _names(gcs, prefix):  # noqa: F811
    """Object names under `prefix`, relative to it."""
    start = len(prefix[len("gs://bkt/"):]) + 1
    return [name[start:] for name in gcs.object_names(prefix + "/")]


def test_buckets_go_through_gcsfs_even_after_epath_chose_tensorflow(gcs):  # noqa: F811
    """EPATH_USE_TF=true and a gs:// path used before jaxlm.io is imported: epath had picked
    TensorFlow's gfile; importing jaxlm.io switches it to fsspec + gcsfs's JSON-API class."""
    code = ("from etils import epath; from etils.epath import backend\n"
            "p = epath.Path('gs://bkt/x')\n"
            "assert p._backend is backend.tf_backend, p._backend\n"
            "from jaxlm import io\n"
            "p = io.path('gs://bkt/x')\n"
            "import gcsfs.core, os\n"
            "print(p._backend is backend.fsspec_backend, type(p._backend.fs(os.fspath(p))) is gcsfs.core.GCSFileSystem,"
            " os.environ['EPATH_USE_TF'])\n")
    env = {**os.environ, **gcs.env, "EPATH_USE_TF": "true"}
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "false"]


def test_text_bytes_and_json_round_trip_exactly(gcs, bucket):  # noqa: F811
    io.write_text_atomic(f"{bucket}/a.txt", "line 1\r\nünï\n")
    io.write_bytes_atomic(f"{bucket}/b.bin", bytes(range(256)))
    io.write_json_atomic(f"{bucket}/c.json", {"value": 0.25, "step": 2})
    assert io.read_text(f"{bucket}/a.txt") == "line 1\nünï\n"  # Universal newlines, as a local read_text.
    assert io.read_bytes(f"{bucket}/a.txt") == "line 1\r\nünï\n".encode()  # '\r\n' kept as is.
    assert io.read_bytes(f"{bucket}/b.bin") == bytes(range(256))
    assert io.read_bytes(f"{bucket}/c.json") == b'{\n  "step": 2,\n  "value": 0.25\n}\n'
    assert io.read_json(f"{bucket}/c.json") == {"step": 2, "value": 0.25}
    assert _names(gcs, bucket) == ["a.txt", "b.bin", "c.json"]  # No temp object left behind.
    assert int(gcs.objects(f"{bucket}/b.bin")[f"{bucket[len('gs://bkt/'):]}/b.bin"]["size"]) == 256


def test_a_failed_atomic_write_keeps_the_old_object(gcs, bucket):  # noqa: F811
    io.write_json_atomic(f"{bucket}/best.json", {"step": 1})
    with pytest.raises(TypeError):
        io.write_json_atomic(f"{bucket}/best.json", {"step": 2, "params": object()})
    with pytest.raises(RuntimeError), io.open_atomic(f"{bucket}/best.json") as f:
        f.write('{"step": 3}')
        raise RuntimeError("stopped mid-write")
    with pytest.raises(RuntimeError), io.open_atomic(f"{bucket}/new.json") as f:
        f.write("{}")
        raise RuntimeError("stopped mid-write")
    assert io.read_json(f"{bucket}/best.json") == {"step": 1}
    assert _names(gcs, bucket) == ["best.json"]


def test_read_json_missing_default_and_invalid(bucket):
    assert io.read_json(f"{bucket}/none.json", default=None) is None
    with pytest.raises(UserError, match=r"none\.json: no such file"):
        io.read_json(f"{bucket}/none.json")
    io.write_text_atomic(f"{bucket}/bad.json", '{"step": ')
    with pytest.raises(UserError, match=r"gs://.*/bad\.json: not readable as JSON"):
        io.read_json(f"{bucket}/bad.json", default=None)


def test_exists_is_dir_is_file_list_dir_and_make_dirs(gcs, bucket):  # noqa: F811
    io.make_dirs(f"{bucket}/run/checkpoints")
    assert _names(gcs, bucket) == []  # A prefix needs no object; nothing was created.
    assert not io.exists(f"{bucket}/run") and io.list_dir(f"{bucket}/run") == []
    io.write_text_atomic(f"{bucket}/run/checkpoints/10/state", "x")
    io.write_text_atomic(f"{bucket}/run/config.json", "{}")
    io.write_text_atomic(f"{bucket}/run/b.txt", "")
    assert io.exists(f"{bucket}/run") and io.is_dir(f"{bucket}/run") and not io.is_file(f"{bucket}/run")
    assert io.exists(f"{bucket}/run/b.txt") and io.is_file(f"{bucket}/run/b.txt")  # An empty object too.
    assert not io.is_dir(f"{bucket}/run/b.txt")
    assert io.list_dir(f"{bucket}/run") == ["b.txt", "checkpoints", "config.json"]
    assert io.list_dir(f"{bucket}/run/checkpoints") == ["10"]
    assert io.files_under(f"{bucket}/run") == ["b.txt", "checkpoints/10/state", "config.json"]
    assert not io.exists(f"{bucket}/run/c.txt") and not io.exists(f"{bucket}/ru")  # Not a name prefix match.


def test_jsonl_appender_rewrites_the_object_at_each_flush(gcs, bucket):  # noqa: F811
    target = f"{bucket}/metrics.jsonl"
    appender = io.JsonlAppender(target)
    appender.flush()
    assert io.read_bytes(target) == b""  # Created at the first flush, as the local file is at open.
    appender.append({"step": 1, "train/loss": 2.5})
    appender.append({"step": 2, "train/loss": 2.25})
    assert io.read_bytes(target) == b""  # Nothing uploaded before flush().
    appender.flush()
    assert io.read_bytes(target) == b'{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/loss": 2.25}\n'
    generation = gcs.objects(target)[target[len("gs://bkt/"):]]["generation"]
    appender.flush()  # Nothing new: no upload.
    assert gcs.objects(target)[target[len("gs://bkt/"):]]["generation"] == generation
    appender.append({"step": 3})
    appender.close()
    assert [r["step"] for r in io.read_jsonl(target)] == [1, 2, 3]


def test_jsonl_torn_line_append_and_truncate(bucket):
    target = f"{bucket}/metrics.jsonl"
    io.write_bytes_atomic(target, b'{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo')  # Torn by a kill.
    assert io.read_jsonl(target) == [{"step": 1}, {"step": 2}]
    io.append_jsonl(target, {"step": 4})  # A newline first: the new record is whole.
    assert io.read_bytes(target) == b'{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo\n{"step": 4}\n'
    assert [r["step"] for r in io.read_jsonl(target)] == [1, 2, 4]
    io.truncate_jsonl(target, lambda r: r["step"] <= 2)
    assert io.read_bytes(target) == b'{"step": 1}\n{"step": 2}\n'
    io.truncate_jsonl(f"{bucket}/missing.jsonl", lambda r: True)
    assert not io.exists(f"{bucket}/missing.jsonl") and io.read_jsonl(f"{bucket}/missing.jsonl") == []


def test_remove_and_remove_tree(gcs, bucket):  # noqa: F811
    for name in ("a.txt", "d/x", "d/e/y"):
        io.write_text_atomic(f"{bucket}/{name}", name)
    io.remove(f"{bucket}/a.txt")
    with pytest.raises(FileNotFoundError):
        io.remove(f"{bucket}/a.txt")
    io.remove(f"{bucket}/a.txt", missing_ok=True)
    assert _names(gcs, bucket) == ["d/e/y", "d/x"]
    io.remove_tree(f"{bucket}/d")
    assert _names(gcs, bucket) == []
    io.remove_tree(f"{bucket}/d", missing_ok=True)
    with pytest.raises(FileNotFoundError):
        io.remove_tree(f"{bucket}/d")


def test_copy_file_in_every_direction(gcs, bucket, tmp_path):  # noqa: F811
    data = os.urandom(3 << 20)  # Several read chunks.
    (tmp_path / "src.bin").write_bytes(data)
    io.copy_file(tmp_path / "src.bin", f"{bucket}/up.bin")  # local -> bucket
    io.copy_file(f"{bucket}/up.bin", f"{bucket}/same.bin")  # bucket -> bucket
    io.copy_file(f"{bucket}/same.bin", tmp_path / "down.bin")  # bucket -> local
    io.write_text_atomic(f"{bucket}/small.txt", "new")
    (tmp_path / "old.txt").write_text("old")
    io.copy_file(f"{bucket}/small.txt", tmp_path / "old.txt")  # Replaces a local file.
    assert io.read_bytes(f"{bucket}/up.bin") == data and io.read_bytes(f"{bucket}/same.bin") == data
    assert (tmp_path / "down.bin").read_bytes() == data and (tmp_path / "old.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["down.bin", "old.txt", "src.bin"]  # No temp file left.
    assert _names(gcs, bucket) == ["same.bin", "small.txt", "up.bin"]
    with pytest.raises(FileNotFoundError):
        io.copy_file(f"{bucket}/none.bin", tmp_path / "none.bin")
    assert not (tmp_path / "none.bin").exists()


def test_copy_tree_uploads_the_marker_last(gcs, bucket, tmp_path):  # noqa: F811
    local = tmp_path / "tok"
    (local / "sub").mkdir(parents=True)
    for name, text in {"a.json": "a", "tokenizer.json": "t", "z.json": "z", "sub/b.txt": "b"}.items():
        (local / name).write_text(text)
    assert io.copy_tree(local, f"{bucket}/tok", last="tokenizer.json") == ["a.json", "sub/b.txt", "tokenizer.json",
                                                                         "z.json"]
    meta = {name.rsplit("/tok/", 1)[1]: int(m["generation"]) for name, m in gcs.objects(f"{bucket}/tok/").items()}
    assert sorted(meta) == ["a.json", "sub/b.txt", "tokenizer.json", "z.json"]
    assert max(meta, key=meta.get) == "tokenizer.json"  # Written after every other file.
    assert io.read_text(f"{bucket}/tok/sub/b.txt") == "b"
    with pytest.raises(FileNotFoundError, match="never be seen complete"):
        io.copy_tree(local, f"{bucket}/tok2", last="missing.json")
    assert _names(gcs, f"{bucket}/tok2") == []  # Refused before copying anything.


def test_local_copy_is_fresh_at_each_call(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    io.write_text_atomic(f"{bucket}/tok/tokenizer.json", "v1")
    io.write_text_atomic(f"{bucket}/tok/extra.txt", "e")
    first = io.local_copy(f"{bucket}/tok")
    assert first.startswith(str(tmp_path / "cache" / "bucket_copies"))
    assert sorted(os.listdir(first)) == ["extra.txt", "tokenizer.json"]
    io.write_text_atomic(f"{bucket}/tok/tokenizer.json", "v2")
    io.remove(f"{bucket}/tok/extra.txt")
    second = io.local_copy(f"{bucket}/tok")
    assert second == first and os.listdir(second) == ["tokenizer.json"]
    assert open(os.path.join(second, "tokenizer.json")).read() == "v2"
    assert os.listdir(tmp_path / "cache" / "bucket_copies") == [os.path.basename(first)]  # No staging left.
    assert io.local_copy(tmp_path) == str(tmp_path)  # A local directory is itself.


def test_metrics_written_by_another_process_are_seen_at_once(gcs, bucket):  # noqa: F811
    """gcsfs's listing cache is off: a file another process adds is listed and read right away."""
    io.write_json_atomic(f"{bucket}/early.json", {})
    assert io.list_dir(bucket) == ["early.json"] and not io.exists(f"{bucket}/late.json")  # Listed once here.
    code = f"from jaxlm import io; io.write_json_atomic('{bucket}/late.json', {{'step': 7}})"
    out = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, **gcs.env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert io.list_dir(bucket) == ["early.json", "late.json"] and io.exists(f"{bucket}/late.json")
    assert json.loads(io.read_text(f"{bucket}/late.json")) == {"step": 7}
