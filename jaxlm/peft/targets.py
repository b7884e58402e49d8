"""Which parameters get adapters and which train in full: regexes over '/'-joined param paths.

A param path is the nested-dict path of the model's params joined with '/', e.g.
`body/layers/attn/query/kernel` (layers scanned: one stacked array with a leading `layers` axis)
or `body/layers_0/attn/query/kernel` (unscanned). `peft.targets` picks kernels to adapt
(`re.search`), `peft.trainable` the params that train in full (the classification head by
default); everything else is frozen.

A kernel's axes split into leading stacked axes (scan's `layers`), input axes and output axes,
read from its logical names: the axes up to `head_dim` are inputs when `head_dim` is not the last
axis (attention's out projection, [heads, head_dim, embed]), else only the first axis is
(q/k/v [embed, heads, head_dim], MLP and head kernels [in, out]).
"""

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn

from jaxlm.convert.hf_import import nest_paths
from jaxlm.errors import UserError

Path = tuple[str, ...]
STACKED_AXIS = "layers"  # scan's parameter axis (jaxlm.models.transformer's metadata_params)


def path_str(path: Path) -> str:
    return "/".join(path)


def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    """{path: leaf} of a nested dict."""
    if isinstance(tree, dict):
        out: dict[Path, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, prefix + (str(key),)))
        return out
    return {prefix: tree}


def unflatten(flat: dict[Path, Any]) -> dict:
    return nest_paths(flat)


def subtree(tree: Any, paths: list[Path]) -> dict:
    """The nested dict of `tree`'s leaves at `paths`."""
    flat = flatten(tree)
    return unflatten({p: flat[p] for p in paths})


def without(tree: Any, paths: list[Path]) -> dict:
    """`tree` less the leaves at `paths` (empty sections dropped)."""
    drop = set(paths)
    return unflatten({p: v for p, v in flatten(tree).items() if p not in drop})


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: where it is, its shape and logical axes, and how its axes split."""

    path: Path
    shape: tuple[int, ...]
    names: tuple[Optional[str], ...]
    lead: int  # leading stacked axes (1 for a scanned layer kernel)
    n_in: int  # input axes after the leading ones

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.shape[:self.lead]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead:self.lead + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead + self.n_in:]

    @property
    def lead_names(self) -> tuple[Optional[str], ...]:
        return self.names[:self.lead]

    @property
    def in_names(self) -> tuple[Optional[str], ...]:
        return self.names[self.lead:self.lead + self.n_in]

    @property
    def out_names(self) -> tuple[Optional[str], ...]:
        return self.names[self.lead + self.n_in:]

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def matrices(self) -> int:
        """How many weight matrices this array holds (one per stacked layer)."""
        return math.prod(self.lead_shape)


def axis_split(names: tuple[Optional[str], ...]) -> tuple[int, int]:
    """(leading stacked axes, input axes) of a kernel from its logical axis names."""
    lead = 1 if names and names[0] == STACKED_AXIS else 0
    rest = names[lead:]
    n_in = rest.index("head_dim") + 1 if "head_dim" in rest[:-1] else 1
    return lead, n_in


def compile_regex(field: str, pattern: str) -> Optional[re.Pattern]:
    if not (pattern or "").strip():
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{field}={pattern!r}: not a regular expression ({e})") from None


def _boxes(boxed: Any) -> dict[Path, Any]:
    flat = flatten(nn.unbox(boxed))
    names = flatten(_names_tree(boxed))
    return {p: (tuple(flat[p].shape), names[p]) for p in flat}


def _names_tree(boxed: Any) -> Any:
    if isinstance(boxed, dict):
        return {k: _names_tree(v) for k, v in boxed.items()}
    if isinstance(boxed, nn.Partitioned):
        names = tuple(boxed.names)
        return names if len(names) == boxed.value.ndim else (None,) * boxed.value.ndim
    return (None,) * len(getattr(boxed, "shape", ()))


def select(boxed: Any, targets: str, trainable: str) -> tuple[list[Target], list[Path]]:
    """(the kernels `targets` picks, the params `trainable` picks) in the boxed abstract params.

    Only kernels (leaf `kernel`, at least an input and an output axis) can be adapted; a pattern
    that picks no kernel, or a param that is both adapted and trained in full, is a UserError.
    """
    target_re = compile_regex("peft.targets", targets)
    trainable_re = compile_regex("peft.trainable", trainable)
    params = _boxes(boxed)
    kernels = [p for p, (shape, names) in params.items()
               if p[-1] == "kernel" and len(shape) - axis_split(names)[0] >= 2]
    picked = [p for p in kernels if target_re is not None and target_re.search(path_str(p))]
    if not picked:
        examples = ", ".join(path_str(p) for p in kernels[:6])
        raise UserError(f"peft.targets={targets!r} matches no kernel of this model; its kernels are {examples}, ...")
    full = [p for p in params if trainable_re is not None and trainable_re.search(path_str(p))]
    both = sorted(set(picked) & set(full))
    if both:
        raise UserError(f"{path_str(both[0])} is matched by both peft.targets and peft.trainable: a kernel either "
                        "gets an adapter or trains in full; narrow one of the patterns")
    out = []
    for p in picked:
        shape, names = params[p]
        lead, n_in = axis_split(names)
        out.append(Target(p, shape, names, lead, n_in))
    return out, full
