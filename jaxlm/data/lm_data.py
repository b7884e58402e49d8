"""Everything the causal-LM training loop needs from the data config, in one call.

Train batches come from one of two loaders (data.loader, fixed at a run's first start):
- `stream` (default): each host tokenizes only its own rows' documents while training runs, in
  grain worker processes (`streams`); sources may be a weighted mixture;
- `token_cache`: the whole train split tokenized into one array on disk first, windows shuffled
  globally (`lm_loader`); the loader of runs started before the stream loader existed.
Eval batches are exact and deterministic either way: the eval split (of every source, in order)
tokenized once into a token cache when the first evaluation asks for it.
"""

import functools
from collections.abc import Iterator
from typing import Optional

import numpy as np
from absl import logging

from jaxlm.data import lm_loader, sources, streams, token_cache
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

LOADERS = ("stream", "token_cache")


class _EvalTokens:
    """The eval token stream, built on first use (so it costs nothing before the first step)."""

    def __init__(self, corpora: list[sources.WeightedCorpus], tokenizer, data_dir: str):
        self._corpora, self._tokenizer, self._data_dir = corpora, tokenizer, data_dir

    @functools.cached_property
    def splits(self) -> list[token_cache.TokenSplit]:
        return [token_cache.cached_token_split(c.corpus.eval, self._tokenizer, data_dir=self._data_dir,
                                               dataset_id=c.corpus.dataset_id) for c in self._corpora]

    @functools.cached_property
    def tokens(self) -> np.ndarray:
        parts = [s.tokens for s in self.splits]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # Eval splits are small.

    @property
    def tokens_per_byte(self) -> float:
        targets = max(len(self.tokens) - 1, 0)  # Every token but the first is predicted once.
        return targets / max(sum(s.num_bytes for s in self.splits), 1)


class LMData:
    """Tokenizer, this host's train iterator and the exact eval batches of a causal-LM run."""

    def __init__(self, tokenizer, train_iter, eval_tokens: _EvalTokens, *, seq_len: int, global_batch_size: int,
                 process_index: int, process_count: int, segment_eos: Optional[int], prep_report: dict):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # Special tokens included.
        self.eos_id = tokenizer_lib.eos_id(tokenizer)
        self.pad_id = tokenizer_lib.pad_id(tokenizer)
        self.train_iter = train_iter  # next() -> this host's batch; get_state()/set_state().
        self.prep_report = prep_report  # Cleaning counts per source and split ({} for tfds datasets).
        self._eval = eval_tokens
        self._eval_args = dict(seq_len=seq_len, global_batch_size=global_batch_size, pad_id=self.pad_id,
                               process_index=process_index, process_count=process_count, eos_id=segment_eos)
        _, self.host_batch_size = lm_loader.host_rows(global_batch_size, process_index, process_count)

    def eval_batches(self) -> Iterator[lm_loader.Batch]:
        """A fresh pass over the eval split (tokenized on the first call)."""
        return lm_loader.eval_batches(self._eval.tokens, **self._eval_args)

    @property
    def eval_tokens_per_byte(self) -> float:
        """Eval targets per UTF-8 byte: bits per byte = mean loss * this / ln 2."""
        return self._eval.tokens_per_byte

    @property
    def num_eval_batches(self) -> int:
        return lm_loader.num_eval_batches(len(self._eval.tokens), self._eval_args["seq_len"],
                                          self._eval_args["global_batch_size"])


def _stream_iterator(corpora, tokenizer, data_config, *, seq_len, global_batch_size, seed, process_index,
                     process_count, segment_eos, fingerprint) -> streams.StreamTrainIterator:
    for c in corpora:
        if not len(c.corpus.train):
            raise UserError(f"{c.name}: its train split has no documents; give it text or drop it")
    spec = streams.StreamSpec(
        sources=tuple(streams.StreamSource(c.name, c.corpus.train, c.weight) for c in corpora),
        tokenizer=tokenizer, row_tokens=seq_len + 1, row_stride=seq_len, global_batch_size=global_batch_size,
        seed=seed, eos_id=tokenizer_lib.eos_id(tokenizer))
    layout = {
        "loader": "stream", "seq_len": seq_len, "global_batch_size": global_batch_size, "seed": seed,
        "packing": data_config.get("packing", "concat"), "tokenizer": fingerprint[:16],
        "sources": [[c.corpus.dataset_id, c.corpus.train.name, len(c.corpus.train), c.weight] for c in corpora],
    }
    return streams.make_train_iterator(
        spec, functools.partial(streams.causal_lm_batch, segment_eos=segment_eos), process_index=process_index,
        process_count=process_count, num_workers=int(data_config.get("num_workers", 0) or 0),
        prefetch=int(data_config.get("prefetch", 2)), layout=layout)


def _cached_iterator(corpora, tokenizer, data_config, data_dir, *, seq_len, global_batch_size, seed,
                     process_index, process_count, segment_eos, fingerprint) -> lm_loader.TrainIterator:
    if len(corpora) > 1:
        raise UserError("data.loader=token_cache reads one source; use data.loader=stream for data.mixture")
    corpus = corpora[0].corpus
    train = token_cache.cached_token_split(corpus.train, tokenizer, data_dir=data_dir, dataset_id=corpus.dataset_id)
    return lm_loader.make_train_iterator(
        train.tokens, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
        process_index=process_index, process_count=process_count, prefetch=int(data_config.get("prefetch", 2)),
        data_id=f"{corpus.dataset_id}/{corpus.train.name}/{fingerprint[:16]}", eos_id=segment_eos)


def build_lm_data(data_config, *, seq_len: int, global_batch_size: int, seed: int, workdir: str,
                  process_index: int = 0, process_count: int = 1) -> LMData:
    """Prepares (or reuses) the datasets and the tokenizer, and returns the loaders.

    `data_config` is the `data` ConfigDict. Every host runs this; shared files are written
    atomically, so data_dir and workdir may be shared or local.
    """
    if seq_len <= 0:
        raise UserError(f"seq_len={seq_len} must be positive")
    loader = data_config.get("loader", "stream")
    if loader not in LOADERS:
        raise UserError(f"data.loader={loader!r} is invalid; use one of {', '.join(LOADERS)}")
    data_dir = sources.data_dir_of(data_config)
    corpora = sources.load_sources(data_config, data_dir)
    tokenizer = tokenizer_lib.run_tokenizer(data_config, [(c.corpus.train, c.weight) for c in corpora], workdir)
    # Segmented packing: batches carry segment ids (a new one at each EOS); concat: none.
    segment_eos = tokenizer_lib.eos_id(tokenizer) if data_config.get("packing", "concat") == "segmented" else None
    make = _stream_iterator if loader == "stream" else functools.partial(_cached_iterator, data_dir=data_dir)
    train_iter = make(corpora, tokenizer, data_config, seq_len=seq_len, global_batch_size=global_batch_size,
                      seed=seed, process_index=process_index, process_count=process_count,
                      segment_eos=segment_eos, fingerprint=tokenizer_lib.fingerprint(tokenizer))
    logging.info("causal-LM data: %s loader, sources %s", loader,
                 ", ".join(f"{c.name} ({len(c.corpus.train)} train documents, weight {c.weight:g})" for c in corpora))
    report = corpora[0].corpus.prep_report if len(corpora) == 1 else {c.name: c.corpus.prep_report for c in corpora}
    return LMData(tokenizer, train_iter, _EvalTokens(corpora, tokenizer, data_dir), seq_len=seq_len,
                  global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
                  segment_eos=segment_eos, prep_report=report)

