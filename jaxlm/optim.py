"""The optax chain from config: optimizer, warmup + decay schedule, clipping, decay mask."""

from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxlm.errors import UserError

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def validate_optim(cfg: ml_collections.ConfigDict) -> None:
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"optim.name={cfg.name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"optim.schedule={cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg.learning_rate <= 0:
        raise UserError(f"optim.learning_rate={cfg.learning_rate}: must be positive")
    if cfg.warmup_steps < 0 or cfg.clip_norm < 0 or cfg.weight_decay < 0:
        raise UserError("optim.warmup_steps, optim.clip_norm and optim.weight_decay must be >= 0")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine / linear decay to end_lr_ratio, or flat."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = peak * cfg.end_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any, cfg: ml_collections.ConfigDict) -> Any:
    """True where weight decay applies: matrices, not norms, biases or embeddings (by default).

    Decided by parameter name, not rank, since scanned layers give norm scales a rank of 2.
    """

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        leaf = names[-1]
        if leaf in ("scale", "bias") and not cfg.decay_norms_and_biases:
            return False
        if leaf == "embedding" and not cfg.decay_embeddings:  # token, position, token-type tables
            return False
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    validate_optim(cfg)
    schedule = make_schedule(cfg, total_steps)
    mask: Callable[[Any], Any] = lambda params: decay_mask(params, cfg)  # noqa: E731
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        # optax.adafactor adds its decay after the learning rate; decoupled decay (as in adamw)
        # must be scaled by the schedule, so the chain is spelled out.
        opt = optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                          optax.scale_by_param_block_rms(),
                          optax.add_decayed_weights(cfg.weight_decay, mask),
                          optax.scale_by_learning_rate(schedule))
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                          optax.sgd(schedule, momentum=cfg.momentum or None))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*parts, opt), schedule
