"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A kernel W with input axes I and output axes O gets A [*I, r] and B [r, *O] (plus W's leading
stacked axes, for scanned layers); the model uses W + (alpha / r) · A·B. A starts Gaussian with
variance 1/fan_in, B at zero, so a fresh adapter changes nothing. The adapters' logical axes are
their base's (A: the base's input axes and None for the rank; B: None and the output axes), so
they shard as their base does on every mesh.

The interface an adapter method implements (AdaLoRA adds its own next to this one):
    arrays(target)         {name: (shape, logical axes)} of one kernel's adapter
    init(rng, targets, dtypes) -> [{name: array}] for all targets at once
    delta(adapter, target) -> the update of W, shaped as W
    factors(adapter, target) -> (left [*lead, *I, r], right [*lead, r, *O]): delta = left·right,
                           for the unmerged branch of adapter dropout (jaxlm/models/adapter_branch.py)
    describe()             one phrase for the log
Array names follow Hugging Face peft's (lora_A, lora_B) so that its files map one to one.
"""

import math
import string

import jax
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.peft.targets import Target


class LoRA:
    name = "lora"

    def __init__(self, rank: int, alpha: float):
        if rank < 1:
            raise UserError(f"peft.rank={rank}: must be at least 1")
        if alpha <= 0:
            raise UserError(f"peft.alpha={alpha}: must be positive")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank

    def arrays(self, t: Target) -> dict[str, tuple[tuple[int, ...], tuple]]:
        r = self.rank
        return {"lora_A": (t.lead_shape + t.in_shape + (r,), t.lead_names + t.in_names + (None,)),
                "lora_B": (t.lead_shape + (r,) + t.out_shape, t.lead_names + (None,) + t.out_names)}

    def init(self, rng: jax.Array, targets: list[Target], dtypes: list) -> list[dict[str, jax.Array]]:
        """Every target's fresh adapter. One Gaussian draw is cut into all the A's: each random
        call costs a second or more of XLA compile time on a CPU, and unscanned layers have many."""
        shapes = [self.arrays(t) for t in targets]
        sizes = [math.prod(s["lora_A"][0]) for s in shapes]
        draw = jax.random.normal(rng, (sum(sizes),), jnp.float32)
        out, start = [], 0
        for t, s, size, dtype in zip(targets, shapes, sizes, dtypes):
            a = draw[start:start + size].reshape(s["lora_A"][0]) / math.sqrt(t.fan_in)
            out.append({"lora_A": a.astype(dtype), "lora_B": jnp.zeros(s["lora_B"][0], dtype)})
            start += size
        return out

    def delta(self, adapter: dict, t: Target) -> jax.Array:
        """(alpha/r) · A·B over the rank, shaped as the base kernel; at full float32 precision
        (TPUs default to bf16 passes), so merged exports equal what training used."""
        letters = iter(string.ascii_letters.replace("r", ""))
        lead = "".join(next(letters) for _ in t.lead_shape)
        ins = "".join(next(letters) for _ in t.in_shape)
        outs = "".join(next(letters) for _ in t.out_shape)
        equation = f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}"
        product = jnp.einsum(equation, adapter["lora_A"].astype(jnp.float32), adapter["lora_B"].astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
        return product * self.scale

    def factors(self, adapter: dict, t: Target) -> tuple[jax.Array, jax.Array]:
        """(A, (alpha/r)·B): the scale folded into the right factor."""
        del t
        return adapter["lora_A"], adapter["lora_B"].astype(jnp.float32) * self.scale

    def describe(self) -> str:
        return f"lora (rank {self.rank}, alpha {self.alpha:g}, scale {self.scale:g})"
