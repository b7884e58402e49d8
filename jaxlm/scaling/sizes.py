"""The size rule, parameter counts and FLOPs of a sweep's runs, and the sweep's plan.

N is the non-embedding parameter count (Kaplan et al. 2020): every parameter except the token,
position and token-type embeddings and an untied output projection. C is the training FLOPs the
run's steps take: 6 x (matmul parameters, LM head included) per token plus attention (see
jaxlm.metrics.train_flops_per_token), which `flops_check` compares with the compiled step.
"""

import dataclasses
import math
from typing import Optional

import ml_collections

from jaxlm.errors import UserError
from jaxlm.metrics import train_flops_per_token
from jaxlm.models.config import ModelConfig


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the Transformer body as jaxlm.models builds it (norms and biases included)."""
    d, hd, heads, kv, ff = cfg.d_model, cfg.dim_per_head, cfg.num_heads, cfg.kv_heads, cfg.d_ff
    bias = 1 if cfg.use_bias else 0
    norm = d * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
    attention = d * hd * (heads + 2 * kv) + heads * hd * d + bias * (hd * (heads + 2 * kv) + d)
    inner = 2 if cfg.gated else 1  # Input projections of the MLP.
    mlp = (inner + 1) * d * ff + bias * (inner * ff + d)
    layer = attention + mlp + 2 * norm
    extra = (norm if cfg.norm_position == "pre" else 0) + (norm if cfg.embed_norm else 0)
    return cfg.num_layers * layer + extra


def embedding_params(cfg: ModelConfig) -> int:
    positions = cfg.max_len if cfg.positions == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    return cfg.d_model * (cfg.vocab_size + positions + cfg.type_vocab_size) + head


def run_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return float(train_flops_per_token(cfg, seq_len, vocab_projection=True))


# == The size rule ==================================================================================

def _per_layer_coefficient(s, gated: bool, queries_per_kv: int) -> float:
    """Matmul parameters of one layer / d_model^2 under the rule (heads of width head_dim)."""
    return 2 + 2 / queries_per_kv + (3 if gated else 2) * s.ffn_ratio


def queries_per_kv(model: ml_collections.ConfigDict) -> int:
    """The recipe's grouping of query heads per KV head, kept at every size (1: MHA)."""
    if model.num_kv_heads and model.num_heads % model.num_kv_heads == 0:
        return model.num_heads // model.num_kv_heads
    return 1


def model_for_size(target: float, s, model: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The recipe's model with num_layers, d_model, num_heads, d_ff from the rule for N ~ target.

    Depth from the aspect ratio, d = aspect_ratio x L, so N ~ c x aspect^2 x L^3; then the width
    whose exact N is nearest to the target (in log) among multiples of width_multiple and of a
    whole number of head groups.
    """
    group = queries_per_kv(model)
    gated = model.activation in ("swiglu", "geglu")
    c = _per_layer_coefficient(s, gated, group)
    layers = max(1, round((target / (c * s.aspect_ratio ** 2)) ** (1 / 3)))
    step = math.lcm(int(s.width_multiple), int(s.head_dim) * group)
    guess = math.sqrt(target / (c * layers))
    widths = {max(step, step * math.floor(guess / step)), max(step, step * math.ceil(guess / step))}
    best = None
    for width in sorted(widths):
        heads = width // int(s.head_dim)
        d_ff = max(int(s.width_multiple), int(s.width_multiple) * round(s.ffn_ratio * width / s.width_multiple))
        fields = {**model.to_dict(), "vocab_size": vocab_size, "num_layers": layers, "d_model": width,
                  "num_heads": heads, "num_kv_heads": heads // group if model.num_kv_heads else 0,
                  "head_dim": int(s.head_dim) if model.head_dim else 0, "d_ff": d_ff}
        cfg = ModelConfig.from_dict(fields)
        miss = abs(math.log(non_embedding_params(cfg) / target))
        if best is None or miss < best[0]:
            best = (miss, cfg)
    return best[1]


SIZE_FIELDS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff")


def model_overrides(cfg: ModelConfig, recipe_model: ml_collections.ConfigDict) -> dict[str, str]:
    """--config.model.* values that turn the recipe's model into `cfg` (only the fields that differ
    from the recipe, plus the four the rule always sets)."""
    out = {}
    for field in SIZE_FIELDS:
        value = getattr(cfg, field)
        if field in ("num_layers", "d_model", "num_heads", "d_ff") or value != recipe_model[field]:
            out[f"model.{field}"] = str(value)
    return out


# == The plan ======================================================================================

@dataclasses.dataclass
class PlannedRun:
    name: str
    target_params: float
    params: int  # N, non-embedding.
    total_params: int
    tokens: int  # D = steps x tokens per step.
    steps: int
    flops: float  # C, counted.
    budget: Optional[float]  # The IsoFLOP budget it was planned for (None: a sizes x tokens grid).
    overrides: dict  # --config.FIELD -> value: the model size, steps, warmup.

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def short_count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def planning_vocab_size(config: ml_collections.ConfigDict) -> int:
    """The vocabulary a run will have (its own BPE is trained when it starts: its requested size)."""
    model, data = config.model, config.data
    if model.vocab_size:
        return int(model.vocab_size)
    multiple = max(int(model.get("vocab_multiple", 1)), 1)
    if data.tokenizer == "bpe":
        size = int(data.bpe_vocab_size)
    else:
        from jaxlm.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
        size = len(load_tokenizer(data.tokenizer, ""))
    return int(math.ceil(size / multiple) * multiple)


def _planned(config, s, target: float, cfg: ModelConfig, steps: int, budget: Optional[float]) -> PlannedRun:
    per_step = config.global_batch_size * config.seq_len
    overrides = {**model_overrides(cfg, config.model), "steps": str(steps)}
    if s.warmup_fraction > 0:
        overrides["optim.warmup_steps"] = str(max(1, round(s.warmup_fraction * steps)))
    prefix = f"C{budget:.3g}-" if budget else ""
    n = non_embedding_params(cfg)
    return PlannedRun(
        name=f"{prefix}L{cfg.num_layers}-d{cfg.d_model}-s{steps}", target_params=float(target), params=n,
        total_params=n + embedding_params(cfg), tokens=steps * per_step, steps=steps,
        flops=steps * per_step * run_flops_per_token(cfg, config.seq_len), budget=budget, overrides=overrides)


def _isoflop_centre(budget: float, config, s, vocab: int) -> float:
    """The N trained on tokens_per_param x N tokens by `budget` FLOPs, counting the FLOPs as the
    runs do (the LM head and attention too, which dominate a small model's cost)."""
    n = math.sqrt(budget / (6 * s.tokens_per_param))  # The 6ND answer, then corrected.
    for _ in range(20):
        per_token = run_flops_per_token(model_for_size(n, s, config.model, vocab), config.seq_len)
        # C = D x per_token(N) with D = tpp x N; per_token grows with N about linearly.
        n = n * math.sqrt(budget / (s.tokens_per_param * n * per_token))
    return n


def plan(config: ml_collections.ConfigDict, s, sizes: list[float], tokens: list[float],
         budgets: list[float]) -> tuple[list[PlannedRun], list[str]]:
    """The sweep's runs and notes on the ones left out. With budgets: each budget x each size
    (or isoflop_sizes sizes around the budget's tokens_per_param optimum), tokens = C / FLOPs a token.
    Else each size x each token count (or tokens_per_param x N)."""
    if tokens and budgets:
        raise UserError("--tokens and --budgets: give one (a sizes x tokens grid, or an IsoFLOP sweep)")
    if not budgets and not sizes:
        raise UserError("--sizes is required (or --budgets for an IsoFLOP sweep), e.g. --sizes=1e5,3e5,1e6; "
                        "or set scaling.sizes in the recipe")
    vocab = planning_vocab_size(config)
    per_step = config.global_batch_size * config.seq_len
    runs, notes = [], []
    if budgets:
        for budget in budgets:
            targets = sizes
            if not targets:
                centre = _isoflop_centre(budget, config, s, vocab)
                k = int(s.isoflop_sizes)
                targets = [centre * s.isoflop_spread ** ((i / (k - 1) - 0.5) if k > 1 else 0) for i in range(k)]
            for target in targets:
                cfg = model_for_size(target, s, config.model, vocab)
                steps = round(budget / (per_step * run_flops_per_token(cfg, config.seq_len)))
                runs.append((target, cfg, steps, budget))
    else:
        for target in sizes:
            cfg = model_for_size(target, s, config.model, vocab)
            for count in tokens or [s.tokens_per_param * non_embedding_params(cfg)]:
                runs.append((target, cfg, max(1, round(count / per_step)), None))
    planned, seen = [], set()
    for target, cfg, steps, budget in runs:
        run = _planned(config, s, target, cfg, steps, budget)
        if steps < s.min_steps:
            notes.append(f"left out {run.name}: {steps} steps < scaling.min_steps={s.min_steps} "
                         f"(N={short_count(run.params)}, {short_count(run.tokens)} tokens)")
        elif run.name in seen:
            notes.append(f"left out a second {run.name}: two sizes round to the same model")
        else:
            seen.add(run.name)
            planned.append(run)
    if not planned:
        raise UserError("every planned run was left out (see the notes above): raise --tokens / --budgets "
                        "or lower scaling.min_steps")
    return planned, notes
