"""Everything a masked-LM run needs from the data config, in one call.

The text comes from the same sources and token caches as causal LM (documents joined by EOS,
or [SEP] for BERT tokenizers). Example i is the window tokens[i*W : (i+1)*W], wrapped as
[CLS] window [SEP] when the tokenizer has both (W = seq_len - 2; else W = seq_len), and masked
by `masking` with a generator fixed by (seed, global batch, row): the same on any number of
hosts and after a resume. Eval masks are fixed by (seed, example), so eval losses compare
across steps.

A batch: inputs [B, L] (masked), padding_mask [B, L] bool, targets [B, L] (the original
tokens), weights [B, L] (1 where a token is predicted).
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxlm.data import example_loader, masking, sources, token_cache
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

_EVAL_STREAM = 2**32 - 1  # Masks of eval rows come from their own stream, fixed across evaluations.


@dataclasses.dataclass(frozen=True)
class MLMData:
    tokenizer: Any
    vocab_size: int
    pad_id: int
    train_iter: example_loader.TrainIterator
    eval_batches: Callable[[], Iterator[example_loader.Batch]]
    num_eval_batches: int
    num_train_examples: int
    host_batch_size: int
    prep_report: dict


@dataclasses.dataclass(frozen=True)
class _Windows:
    """Fixed-size rows cut from a token stream."""

    tokens: np.ndarray
    seq_len: int
    cls_id: int  # -1: no wrapping.
    sep_id: int
    pad_id: int

    @property
    def body(self) -> int:
        return self.seq_len - 2 if self.cls_id >= 0 else self.seq_len

    def count(self, partial: bool) -> int:
        n = len(self.tokens)
        return -(-n // self.body) if partial else n // self.body

    def row(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [seq_len], real-token mask [seq_len]); all padding past the stream's end."""
        ids = np.full(self.seq_len, self.pad_id, np.int32)
        span = np.asarray(self.tokens[window * self.body:(window + 1) * self.body], np.int32)
        if not len(span):
            return ids, np.zeros(self.seq_len, bool)
        if self.cls_id >= 0:
            span = np.concatenate([[self.cls_id], span, [self.sep_id]]).astype(np.int32)
        ids[:len(span)] = span
        return ids, np.arange(self.seq_len) < len(span)


def build_mlm_data(config, workdir: str, process_index: int = 0, process_count: int = 1) -> MLMData:
    data_config, seq_len = config.data, config.seq_len
    data_dir = sources.data_dir_of(data_config)
    corpus = sources.load_corpus(data_config, data_dir)
    tokenizer = tokenizer_lib.run_tokenizer(data_config, [(corpus.train, 1.0)], workdir, mask_token=True)
    if tokenizer.mask_token_id is None:
        raise UserError(f"data.tokenizer={data_config.tokenizer}: has no mask token, which masked_lm needs; use "
                        "'bpe' (a run's own BPE reserves one) or a BERT-style tokenizer")
    cache = functools.partial(token_cache.cached_token_split, tokenizer=tokenizer, data_dir=data_dir,
                              dataset_id=corpus.dataset_id)
    train_split, eval_split = cache(corpus.train), cache(corpus.eval)
    wrap = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    if wrap and seq_len < 3:
        raise UserError(f"seq_len={seq_len}: too short for [CLS] text [SEP]; use at least 3")
    pad = tokenizer_lib.pad_id(tokenizer)
    windows = functools.partial(_Windows, seq_len=seq_len, cls_id=tokenizer.cls_token_id if wrap else -1,
                                sep_id=tokenizer.sep_token_id if wrap else -1, pad_id=pad)
    train, evaluation = windows(train_split.tokens), windows(eval_split.tokens)
    specials = np.asarray(sorted(set(tokenizer.all_special_ids) | {pad}), np.int64)
    random_ids = np.setdiff1d(np.arange(len(tokenizer)), specials)
    mlm = config.mlm
    mask = functools.partial(masking.mask_row, mask_id=int(tokenizer.mask_token_id), random_ids=random_ids,
                             mask_rate=mlm.mask_rate, mask_token_rate=mlm.mask_token_rate,
                             random_token_rate=mlm.random_token_rate)

    def rows(source: _Windows, windows_ids: np.ndarray, streams: list[tuple[int, ...]], valid: np.ndarray):
        columns = {"inputs": [], "targets": [], "weights": [], "padding_mask": []}
        for window, stream, ok in zip(windows_ids.tolist(), streams, valid.tolist()):
            ids, real = source.row(window) if ok else (np.full(seq_len, pad, np.int32), np.zeros(seq_len, bool))
            inputs, targets, weights = mask(ids, real & ~np.isin(ids, specials), masking.row_rng(config.seed, *stream))
            for key, value in (("inputs", inputs), ("targets", targets), ("weights", weights), ("padding_mask", real)):
                columns[key].append(value)
        return {k: np.stack(v) for k, v in columns.items()}

    num_train = train.count(partial=False)
    plan = example_loader.GlobalBatchPlan(num_train, config.global_batch_size, config.seed)
    fingerprint = tokenizer_lib.fingerprint(tokenizer)[:16]
    train_iter = example_loader.make_train_iterator(
        plan,
        lambda ids, _length, batch, first_row: rows(
            train, ids, [(batch, first_row + r) for r in range(len(ids))], np.ones(len(ids), bool)),
        global_batch_size=config.global_batch_size, process_index=process_index, process_count=process_count,
        prefetch=int(data_config.get("prefetch", 2)),
        layout={"seq_len": seq_len, "seed": config.seed, "num_examples": num_train,
                "masking": [mlm.mask_rate, mlm.mask_token_rate, mlm.random_token_rate],
                "data_id": f"{corpus.dataset_id}/{corpus.train.name}/{fingerprint}"})
    num_eval = evaluation.count(partial=True)
    eval_batches = functools.partial(
        example_loader.eval_batches, num_eval,
        lambda ids: rows(evaluation, ids, [(_EVAL_STREAM, i) for i in ids.tolist()], ids < num_eval),
        global_batch_size=config.global_batch_size, process_index=process_index, process_count=process_count)
    _, host_batch = example_loader.host_rows(config.global_batch_size, process_index, process_count)
    return MLMData(tokenizer=tokenizer, vocab_size=len(tokenizer), pad_id=pad, train_iter=train_iter,
                   eval_batches=eval_batches,
                   num_eval_batches=example_loader.num_eval_batches(num_eval, config.global_batch_size),
                   num_train_examples=num_train, host_batch_size=host_batch, prep_report=corpus.prep_report)
