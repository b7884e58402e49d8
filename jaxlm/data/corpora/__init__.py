"""Small text corpora shipped inside the package, so a run works with no download."""

import importlib.resources

from jaxlm.errors import UserError

_CORPORA = ("tiny_shakespeare",)


def names() -> tuple[str, ...]:
    """Names of the embedded corpora."""
    return _CORPORA


def path(name: str) -> str:
    """Filesystem path of the embedded corpus `name` (e.g. 'tiny_shakespeare')."""
    if name not in _CORPORA:
        raise UserError(
            f"data.train_file: unknown embedded corpus {name!r}; choose one of {', '.join(_CORPORA)}"
        )
    # The package is installed as plain files (not zipped), so the resource is a real path.
    return str(importlib.resources.files(__name__).joinpath(f"{name}.txt"))
