"""Everything a masked-LM run needs from the data config, in one call.

Rows are windows of W = seq_len - 2 tokens of the documents (joined by EOS, or [SEP] for BERT
tokenizers), wrapped as [CLS] window [SEP] when the tokenizer has both (else W = seq_len), and
masked by `masking` with a generator fixed by (seed, global batch, row): the same on any number
of hosts and after a resume. Train windows come from the same per-host document streams as causal
LM (`streams`, data.loader=stream: stream r gives row r of each batch, W tokens apart, nothing
tokenized before the first batch) or, for runs started before streaming, from a token cache of
the whole split (data.loader=token_cache). Eval windows cut the eval split's token cache in
order, built at the first evaluation, with masks fixed by (seed, example) so eval losses compare
across steps.

A batch: inputs [B, L] (masked), padding_mask [B, L] bool, targets [B, L] (the original
tokens), weights [B, L] (1 where a token is predicted).
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator

import numpy as np

from jaxlm.data import example_loader, masking, sources, streams, token_cache
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

_EVAL_STREAM = 2**32 - 1  # Masks of eval rows come from their own stream, fixed across evaluations.


@dataclasses.dataclass(frozen=True)
class _Windows:
    """Rows of seq_len from windows of a token stream ([CLS] window [SEP] when cls_id >= 0)."""

    seq_len: int
    cls_id: int  # -1: no wrapping.
    sep_id: int
    pad_id: int

    @property
    def body(self) -> int:
        return self.seq_len - 2 if self.cls_id >= 0 else self.seq_len

    def count(self, tokens: np.ndarray, partial: bool) -> int:
        n = len(tokens)
        return -(-n // self.body) if partial else n // self.body

    def wrap(self, span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [seq_len], real-token mask [seq_len]); all padding for an empty span."""
        ids = np.full(self.seq_len, self.pad_id, np.int32)
        if not len(span):
            return ids, np.zeros(self.seq_len, bool)
        if self.cls_id >= 0:
            span = np.concatenate([[self.cls_id], span, [self.sep_id]])
        ids[:len(span)] = span
        return ids, np.arange(self.seq_len) < len(span)

    def window(self, tokens: np.ndarray, index: int) -> np.ndarray:
        return np.asarray(tokens[index * self.body:(index + 1) * self.body], np.int32)


class MLMData:
    """Tokenizer, this host's train iterator and the exact eval batches of a masked-LM run."""

    def __init__(self, tokenizer, train_iter, eval_rows: Callable[[], tuple[int, Callable]], *, global_batch_size: int,
                 process_index: int, process_count: int, prep_report: dict):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer_lib.pad_id(tokenizer)
        self.train_iter = train_iter
        self.prep_report = prep_report
        self._eval_rows = functools.cache(eval_rows)  # (windows, read_rows): tokenizes at first use.
        self._batching = dict(global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count)
        _, self.host_batch_size = example_loader.host_rows(global_batch_size, process_index, process_count)

    def eval_batches(self) -> Iterator[example_loader.Batch]:
        count, read_rows = self._eval_rows()
        return example_loader.eval_batches(count, read_rows, **self._batching)

    @property
    def num_eval_batches(self) -> int:
        return example_loader.num_eval_batches(self._eval_rows()[0], self._batching["global_batch_size"])


def _row_masker(config, tokenizer, windows: _Windows):
    """masked(ids, real, *stream) -> (inputs, targets, weights, real) for one wrapped row."""
    specials = np.asarray(sorted(set(tokenizer.all_special_ids) | {windows.pad_id}), np.int64)
    random_ids = np.setdiff1d(np.arange(len(tokenizer)), specials)
    mlm = config.mlm
    mask = functools.partial(masking.mask_row, mask_id=int(tokenizer.mask_token_id), random_ids=random_ids,
                             mask_rate=mlm.mask_rate, mask_token_rate=mlm.mask_token_rate,
                             random_token_rate=mlm.random_token_rate)

    def masked(ids, real, *stream):
        return (*mask(ids, real & ~np.isin(ids, specials), masking.row_rng(config.seed, *stream)), real)

    return masked


def _stack(rows: list[tuple[np.ndarray, ...]]) -> example_loader.Batch:
    inputs, targets, weights, real = (np.stack(column) for column in zip(*rows))
    return {"inputs": inputs, "targets": targets, "weights": weights, "padding_mask": real}


def _train_iterator(config, corpus, tokenizer, windows: _Windows, masked, data_dir: str, process_index: int,
                    process_count: int, layout: dict) -> example_loader.TrainIterator:
    data_config, g = config.data, config.global_batch_size
    prefetch = int(data_config.get("prefetch", 2))
    if data_config.get("loader", "stream") == "stream":
        spec = streams.StreamSpec(sources=(streams.StreamSource(corpus.dataset_id, corpus.train),), tokenizer=tokenizer,
                                  row_tokens=windows.body, row_stride=windows.body, global_batch_size=g,
                                  seed=config.seed, eos_id=tokenizer_lib.eos_id(tokenizer))

        def to_batch(rows):  # Each row's mask is fixed by (seed, global batch, global row).
            return _stack([masked(*windows.wrap(tokens), batch, row) for tokens, batch, row in
                           zip(rows["tokens"], rows["batch"].tolist(), rows["row"].tolist())])

        return streams.make_train_iterator(
            spec, to_batch, process_index=process_index, process_count=process_count,
            num_workers=int(data_config.get("num_workers", 0) or 0), prefetch=prefetch,
            layout={**layout, "loader": "stream", "documents": len(corpus.train)})
    train = token_cache.cached_token_split(corpus.train, tokenizer, data_dir=data_dir, dataset_id=corpus.dataset_id)
    num_train = windows.count(train.tokens, partial=False)
    plan = example_loader.GlobalBatchPlan(num_train, g, config.seed)

    def read_rows(ids, _length, batch, first_row):
        return _stack([masked(*windows.wrap(windows.window(train.tokens, w)), batch, first_row + r)
                       for r, w in enumerate(ids.tolist())])

    return example_loader.make_train_iterator(
        plan, read_rows, global_batch_size=g, process_index=process_index, process_count=process_count,
        prefetch=prefetch, layout={**layout, "num_examples": num_train})


def build_mlm_data(config, workdir: str, process_index: int = 0, process_count: int = 1) -> MLMData:
    data_config, seq_len = config.data, config.seq_len
    data_dir = sources.data_dir_of(data_config)
    corpus = sources.load_corpus(data_config, data_dir)
    tokenizer = tokenizer_lib.run_tokenizer(data_config, [(corpus.train, 1.0)], workdir, mask_token=True)
    if tokenizer.mask_token_id is None:
        raise UserError(f"data.tokenizer={data_config.tokenizer}: has no mask token, which masked_lm needs; use "
                        "'bpe' (a run's own BPE reserves one) or a BERT-style tokenizer")
    wrap = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    if wrap and seq_len < 3:
        raise UserError(f"seq_len={seq_len}: too short for [CLS] text [SEP]; use at least 3")
    windows = _Windows(seq_len, tokenizer.cls_token_id if wrap else -1, tokenizer.sep_token_id if wrap else -1,
                       tokenizer_lib.pad_id(tokenizer))
    masked = _row_masker(config, tokenizer, windows)
    mlm = config.mlm
    layout = {"seq_len": seq_len, "seed": config.seed, "masking": [mlm.mask_rate, mlm.mask_token_rate,
                                                                   mlm.random_token_rate],
              "data_id": f"{corpus.dataset_id}/{corpus.train.name}/{tokenizer_lib.fingerprint(tokenizer)[:16]}"}
    train_iter = _train_iterator(config, corpus, tokenizer, windows, masked, data_dir, process_index,
                                 process_count, layout)

    def eval_rows() -> tuple[int, Callable[[np.ndarray], example_loader.Batch]]:
        tokens = token_cache.cached_token_split(corpus.eval, tokenizer, data_dir=data_dir,
                                                dataset_id=corpus.dataset_id).tokens
        count = windows.count(tokens, partial=True)

        def read_rows(ids: np.ndarray) -> example_loader.Batch:
            return _stack([masked(*windows.wrap(windows.window(tokens, i) if i < count else np.empty(0, np.int32)),
                                  _EVAL_STREAM, i) for i in ids.tolist()])

        return count, read_rows

    return MLMData(tokenizer, train_iter, eval_rows, global_batch_size=config.global_batch_size,
                   process_index=process_index, process_count=process_count, prep_report=corpus.prep_report)

