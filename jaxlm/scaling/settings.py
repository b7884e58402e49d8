"""The scaling settings of a command: the recipe's `scaling` section (the defaults where it sets
none) with the `--config.scaling.*` overrides applied and checked."""

import ml_collections

from jaxlm import config as config_lib
from jaxlm.errors import UserError
from jaxlm.scaling.config import scaling_section, validate


def settings(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """The recipe's scaling section (the defaults where it sets none) with the overrides applied."""
    section = scaling_section()
    if "scaling" in config:
        for key in config.scaling.keys():
            if key not in section:
                raise UserError(f"config field 'scaling.{key}' is unknown; run `jaxlm scaling run --help` "
                                f"for the scaling fields")
            with section.ignore_type():
                section[key] = config.scaling[key]
    holder = ml_collections.ConfigDict({"scaling": section})
    config_lib.apply_overrides(holder, overrides)
    validate(holder.scaling)
    return holder.scaling
