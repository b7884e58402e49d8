"""The `scaling` config section: how `jaxlm scaling` sizes a sweep's models and fits the law.

A leaf module (ml_collections and jaxlm.errors only), so that jaxlm.config can take the section's
fields from here; reading a recipe's section with its overrides is `jaxlm.scaling.settings`.

A recipe sets `config.scaling.*` (its size rule and default sweep); `--config.scaling.FIELD=VALUE`
overrides a field on the `jaxlm scaling` command line. The other sections of the recipe describe
every run of the sweep (data, optimizer, batch); the size rule replaces the model's width, depth,
heads and MLP width, and the planned tokens replace `steps`.
"""

import ml_collections

from jaxlm.errors import UserError

# field -> (default, one-line help), in the form of jaxlm.config.FIELDS (merged into it). The
# default rule is GPT-2-like at a constant aspect ratio: Kaplan et al. 2020 found the loss nearly
# flat in d_model / num_layers between about 20 and 200.
SCALING_FIELDS = {
    "scaling.aspect_ratio": (32.0, "size rule: d_model / num_layers, held constant over the sweep's sizes"),
    "scaling.head_dim": (32, "size rule: width of one attention head (num_heads = d_model / head_dim)"),
    "scaling.ffn_ratio": (4.0, "size rule: d_ff / d_model"),
    "scaling.width_multiple": (32, "size rule: d_model and d_ff are rounded to multiples of this (and of head_dim)"),
    "scaling.sizes": ("", "default --sizes: non-embedding parameter counts, comma-separated (e.g. 1e5,3e5,1M)"),
    "scaling.tokens": ("", "default --tokens: training tokens per run, comma-separated; each size trains on each"),
    "scaling.budgets": ("", "default --budgets: training FLOPs per run for an IsoFLOP sweep, comma-separated"),
    "scaling.tokens_per_param": (20.0, "tokens = this x N when neither --tokens nor --budgets is given "
                                       "(Chinchilla: 20)"),
    "scaling.isoflop_sizes": (5, "model sizes per budget when --budgets comes without --sizes"),
    "scaling.isoflop_spread": (8.0, "largest / smallest size per budget, centred on tokens_per_param tokens "
                                    "a parameter"),
    "scaling.warmup_fraction": (0.05, "each run's optim.warmup_steps = this x its steps (0: the recipe's)"),
    "scaling.min_steps": (20, "planned runs shorter than this many steps are left out"),
    "scaling.loss": ("final", "final | best: the eval/loss a run contributes to the fit"),
    "scaling.bootstrap": (200, "bootstrap resamples for the confidence intervals of the fit (0: none)"),
    "scaling.confidence": (0.95, "confidence level of the reported intervals"),
    "scaling.huber_delta": (1e-3, "delta of the Huber loss on log L (Hoffmann et al.: 1e-3)"),
    "scaling.flops_check": ("all", "all | one | none: runs whose analytic FLOPs are checked against the "
                                   "compiled step"),
    "scaling.predict_flops": ("", "compute budgets of the report's prediction table "
                                  "('' = decades from the runs' to 1e24)"),
}


def scaling_section() -> ml_collections.ConfigDict:
    """The section with its defaults."""
    return ml_collections.ConfigDict({key.split(".", 1)[1]: default for key, (default, _) in SCALING_FIELDS.items()})


def split_scaling_overrides(overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(--config.scaling.* overrides, the rest). Only the first kind stays in the sweep process."""
    mine = {k: v for k, v in overrides.items() if k == "scaling" or k.startswith("scaling.")}
    return mine, {k: v for k, v in overrides.items() if k not in mine}


def validate(s: ml_collections.ConfigDict) -> None:
    for field in ("aspect_ratio", "ffn_ratio", "tokens_per_param", "isoflop_spread", "huber_delta"):
        if s[field] <= 0:
            raise UserError(f"scaling.{field}={s[field]}: must be positive")
    for field in ("head_dim", "width_multiple", "isoflop_sizes", "min_steps"):
        if int(s[field]) < 1:
            raise UserError(f"scaling.{field}={s[field]}: must be a positive integer")
    if s.isoflop_spread < 1:
        raise UserError(f"scaling.isoflop_spread={s.isoflop_spread}: must be at least 1 (largest / smallest size)")
    if not 0 <= s.warmup_fraction < 1:
        raise UserError(f"scaling.warmup_fraction={s.warmup_fraction}: must be in [0, 1)")
    if s.loss not in ("final", "best"):
        raise UserError(f"scaling.loss={s.loss!r}: choose final or best")
    if s.flops_check not in ("all", "one", "none"):
        raise UserError(f"scaling.flops_check={s.flops_check!r}: choose all, one or none")
    if int(s.bootstrap) < 0:
        raise UserError(f"scaling.bootstrap={s.bootstrap}: must be 0 (no intervals) or positive")
    if not 0 < s.confidence < 1:
        raise UserError(f"scaling.confidence={s.confidence}: must be in (0, 1), e.g. 0.95")


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_numbers(text: str, flag: str) -> list[float]:
    """'1e5,300k,1.5M' -> [1e5, 3e5, 1.5e6]; suffixes k, M, B (or G), T."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        scale = _SUFFIXES.get(item[-1].lower(), 1.0) if item[-1].isalpha() else 1.0
        body = item[:-1] if scale != 1.0 else item
        try:
            value = float(body) * scale
        except ValueError:
            raise UserError(f"{flag}={text}: {item!r} is not a number; write e.g. 1e5,3e5,1M") from None
        if value <= 0:
            raise UserError(f"{flag}={text}: every value must be positive")
        out.append(value)
    return out
