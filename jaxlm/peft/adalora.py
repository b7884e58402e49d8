"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

A kernel W (input axes I, output axes O, plus scan's leading stacked axes) gets the SVD-form
adapter P [*I, r], λ [r], Q [r, *O] and the model uses W + (alpha / init_r) · P·diag(λ)·Q. λ
starts at zero, so a fresh adapter changes nothing; P and Q start Gaussian with variance 1/fan_in
and 1/fan_out, so PᵀP ≈ I and QQᵀ ≈ I and the orthogonality regulariser starts near zero. Array
names are Hugging Face peft's: lora_A = P, lora_E = λ, lora_B = Q.

The loss gets orth_reg_weight · R, R = the mean over all P and Q factors of every adapted matrix
of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (as peft: it divides by the number of factors, two per matrix).

Rank allocation runs inside the compiled step, as an optax wrapper around the run's optimizer
(`wrap_optimizer`): its state (sensitivity EMAs, the triplet mask, its own update count) is part
of the optimizer state, so checkpoints hold it and a resume continues exactly. At the t-th update
(t = 1..total_step, total_step = config.steps), as peft's RankAllocator / update_and_allocate:
    I = |θ ⊙ ∇θ| for P, λ, Q; Ī ← β1·Ī + (1−β1)·I; Ū ← β2·Ū + (1−β2)·|I − Ī|   (t < T − tfinal)
    score = Ī·Ū; triplet i of a matrix: score(λ_i) + mean of P's column i + mean of Q's row i
    budget b(t): `budget_table` (the cubic schedule from b0 = init_r × matrices to
                 b_T = target_r × matrices); on a masking step the top-b triplets over all
                 matrices are kept and the other λ set to 0; from t = T − tfinal the mask is frozen
                 and applied at every step.
"""

import json
import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from jaxlm import io
from jaxlm.errors import UserError
from jaxlm.peft.targets import Target, flatten, path_str, unflatten

# Actions of one update (budget_table's second column).
KEEP, PRUNE, APPLY_FROZEN = 0, 1, 2


def peft_budget(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, delta_t: int,
                total_step: int) -> tuple[int, bool]:
    """peft's RankAllocator.budget_schedule, written out: (budget, whether this step masks)."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % delta_t == 0


def budget_table(init_bgt: int, target_bgt: int, tinit: int, tfinal: int, delta_t: int,
                 total_step: int) -> np.ndarray:
    """[total_step + 1, 2] int32: (budget, action) of update t (row t; row 0 unused). Made on the
    host in Python floats exactly as peft computes it, then indexed inside the step: a float32
    cubic in the step could round differently from peft's float64 at an integer boundary."""
    final = total_step - tfinal
    rows = []
    for t in range(total_step + 1):
        budget, masks = peft_budget(t, init_bgt, target_bgt, tinit, tfinal, delta_t, total_step)
        if t < final:
            action = PRUNE if masks and budget < init_bgt else KEEP
        elif t == final:  # peft's force_mask: the last allocation, frozen from here on
            action = PRUNE
        else:
            action = APPLY_FROZEN
        rows.append((budget, action))
    return np.asarray(rows, np.int32)


def keep_top(scores: jax.Array, budget: jax.Array) -> jax.Array:
    """1.0 for the `budget` highest scores, 0.0 elsewhere (ties: the earlier triplet first)."""
    order = jnp.argsort(-scores, stable=True)
    ranks = jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.size, dtype=jnp.int32))
    return (ranks < budget).astype(jnp.float32)


class AdaLoRAState(NamedTuple):
    count: jax.Array  # updates done
    ipt: Any  # {"adapters": like the adapters}: Ī (same paths and shapes: sharded as the adapters)
    unc: Any  # Ū
    mask: Any  # {"adapters": {<target>: {"lora_E": 0/1 float32}}}: the triplets kept
    inner: Any  # the run's optimizer's state


class AdaLoRA:
    name = "adalora"

    def __init__(self, peft):
        self.init_r, self.target_r = int(peft.init_r), int(peft.target_r)
        self.alpha = float(peft.alpha)
        self.tinit, self.tfinal, self.delta_t = int(peft.tinit), int(peft.tfinal), int(peft.delta_t)
        self.beta1, self.beta2 = float(peft.beta1), float(peft.beta2)
        self.orth_reg_weight = float(peft.orth_reg_weight)
        if self.init_r < 1:
            raise UserError(f"peft.init_r={self.init_r}: must be at least 1")
        if not 1 <= self.target_r <= self.init_r:
            raise UserError(f"peft.target_r={self.target_r}: must be in [1, peft.init_r={self.init_r}]")
        if self.alpha <= 0:
            raise UserError(f"peft.alpha={self.alpha}: must be positive")
        for field, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 < value < 1:
                raise UserError(f"peft.{field}={value}: must be in (0, 1)")
        if self.orth_reg_weight < 0:
            raise UserError(f"peft.orth_reg_weight={self.orth_reg_weight}: must be >= 0")
        if self.delta_t < 1 or self.tinit < 0 or self.tfinal < 0:
            raise UserError(f"peft.delta_t={self.delta_t}, peft.tinit={self.tinit}, peft.tfinal={self.tfinal}: "
                            "delta_t must be >= 1, tinit and tfinal >= 0")
        self.scale = self.alpha / self.init_r

    def arrays(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple]]:
        r = self.init_r
        return {"lora_A": (t.lead_shape + t.in_shape + (r,), t.lead_names + t.in_names + (None,)),
                "lora_E": (t.lead_shape + (r,), t.lead_names + (None,)),
                "lora_B": (t.lead_shape + (r,) + t.out_shape, t.lead_names + (None,) + t.out_names)}

    def init(self, rng: jax.Array, targets: list[Target], dtypes: list) -> list[dict[str, jax.Array]]:
        """One Gaussian draw cut into every P and Q (each random call costs compile time on a CPU)."""
        shapes = [self.arrays(t) for t in targets]
        sizes = [(math.prod(s["lora_A"][0]), math.prod(s["lora_B"][0])) for s in shapes]
        draw = jax.random.normal(rng, (sum(a + b for a, b in sizes),), jnp.float32)
        out, start = [], 0
        for t, s, (size_a, size_b), dtype in zip(targets, shapes, sizes, dtypes):
            a = draw[start:start + size_a].reshape(s["lora_A"][0]) / math.sqrt(t.fan_in)
            b = draw[start + size_a:start + size_a + size_b].reshape(s["lora_B"][0]) / math.sqrt(
                math.prod(t.out_shape))
            out.append({"lora_A": a.astype(dtype), "lora_E": jnp.zeros(s["lora_E"][0], dtype),
                        "lora_B": b.astype(dtype)})
            start += size_a + size_b
        return out

    def delta(self, adapter: dict, t: Target) -> jax.Array:
        """(alpha/init_r) · P·diag(λ)·Q, shaped as the base kernel, at full float32 precision."""
        letters = iter(string.ascii_letters.replace("r", ""))
        lead = "".join(next(letters) for _ in t.lead_shape)
        ins = "".join(next(letters) for _ in t.in_shape)
        outs = "".join(next(letters) for _ in t.out_shape)
        scaled = adapter["lora_A"].astype(jnp.float32) * adapter["lora_E"].astype(jnp.float32).reshape(
            t.lead_shape + (1,) * len(t.in_shape) + (self.init_r,))
        product = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", scaled,
                             adapter["lora_B"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return product * self.scale

    def factors(self, adapter: dict, t: Target) -> tuple[jax.Array, jax.Array]:
        """(P, (alpha/init_r)·diag(λ)·Q): λ and the scale folded into the right factor (a pruned
        λ is exactly 0, as in `delta`), so gradients reach P, λ and Q."""
        lam = adapter["lora_E"].astype(jnp.float32).reshape(t.lead_shape + (self.init_r,) + (1,) * len(t.out_shape))
        return adapter["lora_A"], adapter["lora_B"].astype(jnp.float32) * lam * self.scale

    def describe(self) -> str:
        return (f"adalora (init_r {self.init_r} -> target_r {self.target_r}, alpha {self.alpha:g}, tinit {self.tinit}, "
                f"tfinal {self.tfinal}, delta_t {self.delta_t}, orth_reg_weight {self.orth_reg_weight:g})")

    # --- the orthogonality regulariser ---------------------------------------------------------

    def orthogonality(self, adapters: dict, targets: list[Target]) -> jax.Array:
        """R: the mean over every adapted matrix's P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
        flat, total, factors = flatten(adapters), jnp.zeros((), jnp.float32), 0
        eye = jnp.eye(self.init_r, dtype=jnp.float32)
        for t in targets:
            p = flat[t.path + ("lora_A",)].astype(jnp.float32).reshape(t.matrices, t.fan_in, self.init_r)
            q = flat[t.path + ("lora_B",)].astype(jnp.float32).reshape(t.matrices, self.init_r, -1)
            hp = jax.lax.Precision.HIGHEST
            ptp = jnp.einsum("mir,mis->mrs", p, p, precision=hp)
            qqt = jnp.einsum("mro,mso->mrs", q, q, precision=hp)
            total = total + jnp.sum(jnp.sqrt(jnp.sum((ptp - eye) ** 2, axis=(1, 2))))
            total = total + jnp.sum(jnp.sqrt(jnp.sum((qqt - eye) ** 2, axis=(1, 2))))
            factors += 2 * t.matrices
        return total / factors

    def penalty(self, adapters: dict, targets: list[Target]) -> jax.Array:
        return self.orth_reg_weight * self.orthogonality(adapters, targets)

    # --- rank allocation ---------------------------------------------------------------------

    def budgets(self, targets: list[Target]) -> tuple[int, int]:
        matrices = sum(t.matrices for t in targets)
        return self.init_r * matrices, self.target_r * matrices

    def triplet_scores(self, scores: dict, targets: list[Target]) -> jax.Array:
        """All triplets' scores, concatenated in target order (each target's [*lead, r] flattened)."""
        flat, out = flatten(scores), []
        for t in targets:
            lead = len(t.lead_shape)
            p_score = jnp.mean(flat[t.path + ("lora_A",)], axis=tuple(range(lead, lead + len(t.in_shape))))
            q_score = jnp.mean(flat[t.path + ("lora_B",)], axis=tuple(range(lead + 1, lead + 1 + len(t.out_shape))))
            out.append((flat[t.path + ("lora_E",)] + p_score + q_score).reshape(-1))
        return jnp.concatenate(out)

    def wrap_optimizer(self, inner: optax.GradientTransformation, targets: list[Target],
                       total_step: int) -> optax.GradientTransformation:
        """The run's optimizer plus rank allocation on the adapters of the trainable tree."""
        if total_step - self.tfinal <= self.tinit:
            raise UserError(f"peft.tinit={self.tinit} and peft.tfinal={self.tfinal} leave no budget phase in "
                            f"steps={total_step}: need tinit < steps - tfinal")
        init_bgt, target_bgt = self.budgets(targets)
        table = budget_table(init_bgt, target_bgt, self.tinit, self.tfinal, self.delta_t, total_step)
        final = total_step - self.tfinal
        b1, b2 = self.beta1, self.beta2

        def init_fn(params):
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params["adapters"])
            mask = unflatten({t.path + ("lora_E",): jnp.ones(t.lead_shape + (self.init_r,), jnp.float32)
                              for t in targets})
            return AdaLoRAState(jnp.zeros((), jnp.int32), {"adapters": zeros}, {"adapters": zeros},
                                {"adapters": mask}, inner.init(params))

        def update_fn(grads, state, params):
            updates, inner_state = inner.update(grads, state.inner, params)
            t = state.count + 1
            row = jnp.asarray(table)[jnp.clip(t, 0, total_step)]
            budget, action = row[0], jnp.where(t > total_step, APPLY_FROZEN, row[1])
            sens = jax.tree.map(lambda p, g: jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32)),
                                params["adapters"], grads["adapters"])
            ipt_new = jax.tree.map(lambda e, i: b1 * e + (1 - b1) * i, state.ipt["adapters"], sens)
            unc_new = jax.tree.map(lambda u, i, e: b2 * u + (1 - b2) * jnp.abs(i - e), state.unc["adapters"],
                                   sens, ipt_new)
            smooth = t < final  # peft stops the EMAs at the final allocation
            ipt = jax.tree.map(lambda n, o: jnp.where(smooth, n, o), ipt_new, state.ipt["adapters"])
            unc = jax.tree.map(lambda n, o: jnp.where(smooth, n, o), unc_new, state.unc["adapters"])
            scores = jax.tree.map(jnp.multiply, ipt, unc)
            kept = keep_top(self.triplet_scores(scores, targets), budget)
            mask_flat, new_mask, start = flatten(state.mask["adapters"]), {}, 0
            upd_flat, par_flat = flatten(updates["adapters"]), flatten(params["adapters"])
            for tg in targets:
                key = tg.path + ("lora_E",)
                size = tg.matrices * self.init_r
                fresh = kept[start:start + size].reshape(mask_flat[key].shape)
                start += size
                new_mask[key] = jnp.where(action == PRUNE, fresh, mask_flat[key])
                # λ + (−λ) is exactly 0: the pruned singular values are zero after this update.
                drop = (action != KEEP) & (new_mask[key] == 0)
                upd_flat[key] = jnp.where(drop, -par_flat[key], upd_flat[key])
            updates = dict(updates, adapters=unflatten(upd_flat))
            return updates, AdaLoRAState(state.count + 1, {"adapters": ipt}, {"adapters": unc},
                                         {"adapters": unflatten(new_mask)}, inner_state)

        return optax.GradientTransformation(init_fn, update_fn)


def ranks(opt_state: Any, targets: list[Target]) -> dict[str, int]:
    """The kept rank of every adapted matrix ({path: rank}, scanned layers as path[layer])."""
    if not isinstance(opt_state, AdaLoRAState):
        raise TypeError("not an AdaLoRA optimizer state")
    mask = flatten(jax.device_get(opt_state.mask["adapters"]))
    out = {}
    for t in targets:
        kept = np.asarray(mask[t.path + ("lora_E",)]).sum(axis=-1).astype(int)
        if t.lead_shape:
            for index in np.ndindex(*t.lead_shape):
                out[f"{path_str(t.path)}[{','.join(map(str, index))}]"] = int(kept[index])
        else:
            out[path_str(t.path)] = int(kept)
    return out


RANKS_FILE = "adalora_ranks.json"


def write_ranks(workdir: str, adapted: Any, opt_state: Any, is_primary: bool) -> dict:
    """At the end of an AdaLoRA run: the kept rank per matrix in DIR/adalora_ranks.json, and logged.
    Called on every host (the mask is gathered from all of them); {} for any other run."""
    if not isinstance(opt_state, AdaLoRAState):
        return {}
    gathered = opt_state._replace(mask=multihost_utils.process_allgather(opt_state.mask, tiled=True))
    per_matrix = ranks(gathered, adapted.targets)
    report = {"total_rank": sum(per_matrix.values()), "target_total_rank": adapted.method.budgets(adapted.targets)[1],
              "init_r": adapted.method.init_r, "target_r": adapted.method.target_r, "ranks": per_matrix}
    if is_primary:
        io.write_text_atomic(io.path(workdir) / RANKS_FILE, json.dumps(report, indent=1) + "\n")
    logging.info("adalora: total rank %d (target %d) over %d matrices, written to %s: %s", report["total_rank"],
                 report["target_total_rank"], len(per_matrix), RANKS_FILE,
                 ", ".join(f"{k}={v}" for k, v in per_matrix.items()))
    return report
