"""The fsspec filesystem jaxlm uses for gs:// (gcsfs's JSON-API class), set up once per process.

- gcsfs >= 2026 exports an 'extended' class by default that first asks a gRPC control plane for
  each bucket's layout (zonal / hierarchical); that is skipped: every operation jaxlm needs is in
  the JSON API, which tensorstore (orbax's arrays) uses too, and which the test server serves.
- Its listing cache is off: other processes (tensorstore's checkpoint writes, other hosts)
  change the bucket behind its back.
- A request that stalls fails: gcsfs gives aiohttp no timeout by default, so one half-dead
  connection would hang its host, and with it every host of a pod, forever. A connection not
  made in CONNECT_SECONDS, or a response with no byte for STALL_SECONDS, raises an aiohttp
  timeout, which gcsfs retries (6 tries, with back-off). A long transfer that keeps moving is
  never cut.
"""

import functools

CONNECT_SECONDS = 30.0
STALL_SECONDS = 120.0


@functools.cache
def gcsfs_class() -> type:
    """Registers gcsfs's JSON-API class with fsspec for gs:// and gcs:// (imported at the first
    bucket path: it takes ~2 s) with jaxlm's defaults, and returns it."""
    import aiohttp  # pylint: disable=import-outside-toplevel  (gcsfs's HTTP client)
    import fsspec  # pylint: disable=import-outside-toplevel
    from gcsfs import core as gcsfs_core  # pylint: disable=import-outside-toplevel
    cls = gcsfs_core.GCSFileSystem
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, cls, clobber=True)
        fsspec.config.conf.setdefault(protocol, {}).update(
            use_listings_cache=False,
            requests_timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_SECONDS,
                                                   sock_read=STALL_SECONDS))
    from etils.epath import backend  # pylint: disable=import-outside-toplevel
    cached = getattr(type(backend.fsspec_backend), "_get_filesystem", None)
    if hasattr(cached, "cache_clear"):  # A filesystem epath made before the registration.
        cached.cache_clear()
    return cls


def filesystem():
    """The gs:// filesystem (for what epath does not offer: put, server-side copy, glob)."""
    return gcsfs_class()()
