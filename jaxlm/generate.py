"""KV-cache decoding for causal LMs: one prefill, then one compiled step per token.

    gen = Generator(model_cfg, params, valid_vocab=len(tokenizer))
    rows = gen.generate([[0, 17, 4], [0, 9]], max_new_tokens=64)              # greedy
    rows = gen.generate(prompts, 64, Sampling(temperature=0.8, top_p=0.95), seed=1, eos_id=0)

Prompts of different lengths are left-padded into one batch: padded slots are marked invalid in
the cache and every row's positions start at 0 at its first real token, so a row decodes exactly
as it would alone. The cache starts at the prompt (rounded up to PROMPT_BUCKET) plus
CACHE_GROWTH slots and grows by CACHE_GROWTH when full, up to prompt + max_new_tokens: prefill
compiles once per (batch, prompt bucket, sampling), the step once per cache size on top.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import io
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.models import Model, ModelConfig
from jaxlm.run import RunCheckpoint, find_run

PROMPT_BUCKET = 16  # Prompt lengths are padded up to a multiple of this: fewer compiles.
SYNC_EVERY = 8  # Without a streaming callback, the host checks for EOS every this many tokens.
# The cache starts this many slots past the prompt and grows by as many when full: each step's
# attention reads only the slots in use (at small batch a decode step is bound by memory
# traffic, the cache's as much as the weights'), at the price of one step compile per size.
CACHE_GROWTH = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature={self.temperature}: must be 0 (greedy) or positive")
        if self.top_k < 0:
            raise UserError(f"--top_k={self.top_k}: must be 0 (off) or positive")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p={self.top_p}: must be in (0, 1]")


def next_token(logits: jax.Array, key: jax.Array, sampling: Sampling, valid_vocab: int) -> jax.Array:
    """[B, V] logits -> [B] token ids. Ids from valid_vocab on (vocab padding) are never chosen."""
    logits = logits.astype(jnp.float32)
    if valid_vocab < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
    if sampling.temperature == 0:
        return greedy(logits)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, -1)[..., ::-1]
        probs = jax.nn.softmax(ordered, -1)
        # Keep the smallest prefix whose probability reaches top_p (the first token always stays).
        keep = (jnp.cumsum(probs, -1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


def greedy(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; a NaN counts as the maximum), as a max and
    then a min over the positions that hold it: XLA:CPU runs these two plain reductions in under
    half the time of argmax's variadic one ([16, 8192]: 0.17 vs 0.39 ms a call;
    benchmarks/decode_variants.py)."""
    top = jnp.max(logits, -1, keepdims=True)
    positions = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, positions, logits.shape[-1]), -1)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """(tokens, padding_mask, positions) [B, length], each prompt right-aligned."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.bool_)
    for i, prompt in enumerate(prompts):
        if prompt:
            tokens[i, length - len(prompt):] = prompt
            mask[i, length - len(prompt):] = True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def unstack_layers(params: Any, num_layers: int) -> Any:
    """Scanned params (body/layers with a leading layer axis) -> body/layers_0, layers_1, …"""
    body = dict(params["body"])
    stacked = body.pop("layers")
    for i in range(num_layers):
        body[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "body": body}


class Generator:
    """Decodes from a causal-LM `Model(cfg)`'s params with a KV cache."""

    def __init__(self, cfg: ModelConfig, params: Any, *, valid_vocab: Optional[int] = None):
        if not cfg.causal:
            raise UserError("generate needs a causal (decoder) model; this one is bidirectional")
        self.cfg = cfg
        self.valid_vocab = min(valid_vocab or cfg.vocab_size, cfg.vocab_size)
        # Decoding runs the layers unrolled: under nn.scan each step rewrites the whole stacked
        # cache (3x slower per token on CPU for a 6-layer model).
        self.params = unstack_layers(params, cfg.num_layers) if cfg.scan_layers else params
        self.model = Model(dataclasses.replace(cfg, scan_layers=False), decode=True)
        self._fns: dict = {}
        self._cache_shapes: dict = {}

    def cache_length(self, longest_prompt: int, max_new_tokens: int) -> int:
        return PROMPT_BUCKET * math.ceil(max(longest_prompt, 1) / PROMPT_BUCKET) + max_new_tokens

    def _empty_cache(self, batch: int, length: int) -> Any:
        # The init call sizes the cache from a [batch, length] input; only its shapes are used.
        # Tracing it costs ~0.25 s for a 6-layer model, so the shapes are kept per size.
        if (batch, length) not in self._cache_shapes:
            shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((batch, length), jnp.int32))
            self._cache_shapes[(batch, length)] = nn.unbox(shapes["cache"])
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self._cache_shapes[(batch, length)])

    @staticmethod
    @functools.partial(jax.jit, static_argnums=1)
    def _grow_cache(cache: Any, slots: int) -> Any:
        """The cache with `slots` more (empty, invalid) slots at the end.

        Not donated: the grown cache has another shape, so XLA can never write it into the old
        buffers (jax warns that the donation was unusable). The old cache is freed when the
        caller drops it, right after.
        """
        def pad(path, a):
            axis = {"cached_key": 2, "cached_value": 2, "cached_valid": 1}.get(getattr(path[-1], "key", None))
            if axis is None:
                return a
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, slots)
            return jnp.pad(a, widths)
        return jax.tree_util.tree_map_with_path(pad, cache)

    def _compiled(self, sampling: Sampling):
        if sampling in self._fns:
            return self._fns[sampling]
        model, valid = self.model, self.valid_vocab

        def last_logits(params, cache, tokens, positions, mask):
            def body_then_head(m, t, **kw):  # The head only on the last position.
                return m.lm_head(m.body(t, **kw)[:, -1:], m.body.attend)
            logits, mutated = model.apply({"params": params, "cache": cache}, tokens, positions=positions,
                                          padding_mask=mask, mutable=["cache"], method=body_then_head)
            return logits[:, -1], mutated["cache"]

        def prefill(params, cache, tokens, positions, mask, key):
            logits, cache = last_logits(params, cache, tokens, positions, mask)
            return next_token(logits, jax.random.fold_in(key, 0), sampling, valid), cache

        def step(params, cache, token, position, index, key):
            """Feeds `token` at `position`; returns the next token and the state for the step after."""
            logits, cache = last_logits(params, cache, token[:, None], position[:, None],
                                        jnp.ones((token.shape[0], 1), jnp.bool_))
            new = next_token(logits, jax.random.fold_in(key, index), sampling, valid)
            return new, cache, position + 1, index + 1

        fns = (jax.jit(prefill, donate_argnums=1), jax.jit(step, donate_argnums=1))
        self._fns[sampling] = fns
        return fns

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 seed: int = 0, eos_id: Optional[int] = None,
                 on_tokens: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> list[list[int]]:
        """The new tokens of each prompt (up to, not including, its first EOS).

        on_tokens(tokens [B], finished [B]) is called after every step with that step's tokens
        (for streaming); rows already finished before the step have finished=True.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_len:
            raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is longer than "
                            f"the model's context (model.max_len={self.cfg.max_len}); shorten it")
        sampling.check()
        prefill, step = self._compiled(sampling)
        batch = len(prompts)
        cache_len = self.cache_length(longest, max_new_tokens)
        prompt_slots = cache_len - max_new_tokens
        tokens, mask, positions = left_pad(prompts, prompt_slots)
        key = jax.random.key(seed)

        slots = min(prompt_slots + CACHE_GROWTH, cache_len)
        token, cache = prefill(self.params, self._empty_cache(batch, slots), tokens, positions, mask, key)
        position = jnp.asarray(positions[:, -1] + 1)
        index = jnp.ones((), jnp.int32)
        produced: list[jax.Array] = []
        finished = np.zeros(batch, np.bool_)
        for i in range(max_new_tokens):
            produced.append(token)
            if i + 1 < max_new_tokens:  # Dispatched before this token is read: the device keeps busy.
                if prompt_slots + i >= slots:  # This step writes slot prompt_slots + i.
                    grown = min(slots + CACHE_GROWTH, cache_len)
                    cache, slots = self._grow_cache(cache, grown - slots), grown
                following, cache, position, index = step(self.params, cache, token, position, index, key)
            if on_tokens is not None:
                host = np.asarray(token)
                on_tokens(host, finished.copy())
                if eos_id is not None:
                    finished |= host == eos_id
            elif eos_id is not None and (i + 1) % SYNC_EVERY == 0:
                recent = np.stack([np.asarray(t) for t in produced[-SYNC_EVERY:]], 1)
                finished |= (recent == eos_id).any(1)
            if finished.all():
                break
            if i + 1 < max_new_tokens:
                token = following
        out = np.stack([np.asarray(t) for t in produced], 1)
        rows = []
        for row in out.tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id)]
            rows.append(row)
        return rows


# -- a run's checkpoint + tokenizer -> text --------------------------------------------------------
PROMPT_FORMATS = (".txt", ".jsonl", ".json")


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> list[str]:
    """--prompt and/or --prompts_file (.txt: one prompt per line; .jsonl: {"prompt": …} or {"text": …}
    per line; .json: a list of strings)."""
    prompts = [] if prompt is None else [prompt]
    if prompts_file:
        ext = os.path.splitext(prompts_file)[1].lower()
        if ext not in PROMPT_FORMATS:
            raise UserError(f"--prompts_file={prompts_file}: unknown format {ext or '(no extension)'!r}; "
                            f"use {', '.join(PROMPT_FORMATS)}")
        if not io.is_file(prompts_file):
            raise UserError(f"--prompts_file={prompts_file}: no such file")
        try:
            text = io.read_bytes(prompts_file).decode("utf-8")  # Local or on a bucket.
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts_file={prompts_file}: {getattr(e, 'strerror', None) or e}") from None
        try:
            if ext == ".txt":
                prompts += [line for line in text.splitlines() if line.strip()]
            elif ext == ".json":
                value = json.loads(text)
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("expected a JSON list of strings")
                prompts += value
            else:
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        record = json.loads(line)
                        value = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
                        if not isinstance(value, str):
                            raise ValueError(f"line {n} has no string 'prompt' or 'text' field")
                        prompts.append(value)
        except ValueError as e:
            raise UserError(f"--prompts_file={prompts_file}: {str(e).splitlines()[0]}") from None
    if not prompts:
        raise UserError("give --prompt=TEXT or --prompts_file=PATH")
    return prompts


def generator_of(found: RunCheckpoint):
    """(Generator, tokenizer, step) for a causal-LM run's checkpoint, found and not yet opened."""
    run = found.open(require="generate")
    return Generator(run.model.model_config, run.params, valid_vocab=len(run.tokenizer)), run.tokenizer, run.step


def load_run_generator(workdir: str, overrides: dict[str, str], step: Optional[int] = None, best: bool = False):
    """(Generator, tokenizer, step) for a causal-LM run's checkpoint, on one device unless
    --config.mesh.* overrides ask for more (params restored straight into that mesh)."""
    return generator_of(find_run(workdir, step=step, best=best, overrides=overrides))


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as a new document: after the EOS every document follows in training
    (`document_prefix`), without the tokenizer's own special tokens (training never saw them)."""
    prefix = tokenizer_lib.document_prefix(tokenizer)
    return [prefix + ids for ids in tokenizer_lib.BatchEncoder(tokenizer)(list(texts))]


class TextStream:
    """Prints generated text in prompt order, each sequence as one block ("[i] prompt…" when there
    are several): the first unfinished sequence streams token by token, the ones after it are held
    until it ends (EOS or the token limit), so blocks never interleave whatever order rows finish in.
    """

    def __init__(self, tokenizer, prompts: Sequence[str], eos_id: Optional[int], write: Callable[[str], None]):
        self.tokenizer, self.prompts, self.eos_id, self.write = tokenizer, list(prompts), eos_id, write
        self.ids: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.front = 0  # the sequence being printed; every one before it is printed whole
        self.shown = 0  # characters of the front sequence's text already printed
        self._start_front()

    def _start_front(self) -> None:
        if self.front < len(self.prompts):
            label = f"[{self.front}] " if len(self.prompts) > 1 else ""
            self.write(label + self.prompts[self.front])

    def __call__(self, tokens: np.ndarray, finished: np.ndarray) -> None:
        for i, token in enumerate(tokens.tolist()):
            if self.done[i]:
                continue
            if token == self.eos_id:
                self.done[i] = True
            else:
                self.ids[i].append(token)
        self._flush()

    def _flush(self) -> None:
        while self.front < len(self.prompts):
            text = self.tokenizer.decode(self.ids[self.front])
            if self.done[self.front]:
                self.write(text[self.shown:] + "\n")
                self.front, self.shown = self.front + 1, 0
                self._start_front()
                continue
            if len(text) > self.shown and not text.endswith("\ufffd"):  # Wait for a multi-byte character's rest.
                self.write(text[self.shown:])
                self.shown = len(text)
            return

    def close(self) -> None:
        """Ends every sequence still open (they reached the token limit)."""
        self.done = [True] * len(self.prompts)
        self._flush()
