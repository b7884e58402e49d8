"""Data for jaxlm: text sources, tokenizers, token caches and grain loaders.

The tasks call `build_lm_data` (causal LM), `build_mlm_data` (masked LM) or
`build_classification_data`. They are imported lazily so that light users (e.g.
`jaxlm.data.corpora` from a config file) do not pay for tfds/transformers/grain.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxlm.data.classification_data import ClassificationData, build_classification_data
    from jaxlm.data.lm_data import LMData, build_lm_data
    from jaxlm.data.mlm_data import MLMData, build_mlm_data

_LAZY = {"build_lm_data": "lm_data", "LMData": "lm_data", "build_mlm_data": "mlm_data", "MLMData": "mlm_data",
         "build_classification_data": "classification_data", "ClassificationData": "classification_data"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"jaxlm.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
