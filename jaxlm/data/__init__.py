"""Data for jaxlm: text sources, tokenizers, token caches and grain loaders.

The training loop calls `build_lm_data(config.data, ...)`. It is imported lazily so that light
users (e.g. `jaxlm.data.corpora` from a config file) do not pay for tfds/transformers/grain.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxlm.data.lm_data import LMData, build_lm_data

_LAZY = {"build_lm_data", "LMData"}


def __getattr__(name):
    if name in _LAZY:
        from jaxlm.data import lm_data

        return getattr(lm_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
