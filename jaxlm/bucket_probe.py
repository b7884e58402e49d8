"""One quick look at a bucket before a command relies on it: `check_reachable("gs://b/run")`.

gcsfs retries a failed request 6 times with exponential back-off: an endpoint that refuses
connections (a wrong STORAGE_EMULATOR_HOST, no network) costs 33 s and a traceback per call,
and a bucket that does not exist surfaces later as some unrelated missing file. This probe
lists at most one object under the URL's prefix, once (one retry after a refused connection,
none after a timeout), each attempt bounded by ATTEMPT_SECONDS, and turns any failure into one
UserError line naming the URL and the cause. Listing (not bucket metadata) needs only
storage.objects.list, which a run needs anyway. Measured: a refused port ~1-2 s, a port that
accepts and never answers 11 s, a missing bucket (404) at once.
"""

import time

from jaxlm import io
from jaxlm.errors import UserError

ATTEMPT_SECONDS = 10.0  # Per attempt: a silent endpoint is reported after ~11 s, a refused one after ~1 s.


def check_reachable(url: str) -> None:
    """Raises UserError unless bucket URL `url` (gs://bucket/prefix) can be listed. Other
    schemes and local paths pass unchecked."""
    if not str(url).startswith("gs://"):
        return
    bucket, _, prefix = str(url)[len("gs://"):].partition("/")
    if not bucket:
        raise UserError(f"{url}: no bucket name; write gs://BUCKET/PATH")
    io.path(url)  # Registers jaxlm's choice of gcsfs class for gs:// with fsspec.
    for attempt in (1, 2):
        try:
            _list_one(bucket, prefix.rstrip("/"))
            return
        except FileNotFoundError:
            raise UserError(f"{url}: bucket gs://{bucket} does not exist (or these credentials cannot "
                            f"see it); create it or fix the bucket name") from None
        except PermissionError as e:
            raise UserError(f"{url}: access denied ({_first_line(e)}); give this machine's credentials "
                            f"storage access to gs://{bucket}") from None
        except Exception as e:  # pylint: disable=broad-except  # Connection, DNS, timeout, auth.
            if _http_status(e) in (401, 403):
                raise UserError(f"{url}: access denied ({_first_line(e)}); give this machine's credentials "
                                f"storage access to gs://{bucket}") from None
            if attempt == 2 or isinstance(e, TimeoutError):  # A silent endpoint: no second wait.
                raise UserError(f"{url}: the storage service cannot be reached ({_first_line(e)}); check the "
                                f"network, and STORAGE_EMULATOR_HOST if it is set") from None
            time.sleep(1.0)


def _list_one(bucket: str, prefix: str) -> None:
    """GET b/BUCKET/o?prefix=…&maxResults=1 through gcsfs's own session and credentials, one try:
    the undecorated request (gcsfs's retry decorator keeps the plain coroutine as __wrapped__)."""
    import aiohttp  # pylint: disable=import-outside-toplevel  (gcsfs's HTTP client)
    import fsspec  # pylint: disable=import-outside-toplevel
    from fsspec import asyn  # pylint: disable=import-outside-toplevel
    cls = fsspec.get_filesystem_class("gs")
    fs = cls(skip_instance_cache=True, requests_timeout=aiohttp.ClientTimeout(total=ATTEMPT_SECONDS))
    request = getattr(cls._request, "__wrapped__", None)  # pylint: disable=protected-access
    if request is None:  # A gcsfs without it: no probe (the run's own calls still report errors).
        return
    try:
        asyn.sync(fs.loop, request, fs, "GET", "b/{}/o", bucket, prefix=prefix, maxResults=1,
                  timeout=ATTEMPT_SECONDS + 1)
    except OSError as e:
        if str(e).startswith("Forbidden"):  # gcsfs's 403
            raise PermissionError(str(e)) from None
        raise


def _http_status(e: Exception):
    return getattr(e, "code", None) or getattr(e, "status", None)


def _first_line(e: Exception) -> str:
    if isinstance(e, TimeoutError):  # fsspec's FSTimeoutError, aiohttp's timeouts: no message.
        return f"no answer within {ATTEMPT_SECONDS:g} s"
    text = (str(e).strip().splitlines() or [""])[0].strip()
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
