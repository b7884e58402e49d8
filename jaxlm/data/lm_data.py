"""Everything the causal-LM training loop needs from the data config, in one call."""

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from absl import logging

from jaxlm.data import lm_loader, sources, token_cache
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

# The run's own BPE is trained on at most this much of the train split (a deterministic
# prefix): enough for a good vocabulary, and bounded time on very large corpora.
BPE_TRAINING_MAX_BYTES = 512 << 20


@dataclasses.dataclass(frozen=True)
class LMData:
    tokenizer: Any  # transformers tokenizer
    vocab_size: int  # len(tokenizer), special tokens included
    eos_id: int
    pad_id: int
    train_iter: lm_loader.TrainIterator  # next() -> this host's batch; get_state()/set_state()
    eval_batches: Callable[[], Iterator[lm_loader.Batch]]  # A fresh pass over the eval split.
    eval_tokens_per_byte: float  # Eval targets per UTF-8 byte: bpb = mean_loss * this / ln 2.
    num_eval_batches: int
    prep_report: dict  # Cleaning counts per split ({} for tfds datasets).
    num_train_windows: int  # Examples per epoch.
    host_batch_size: int  # Rows per host batch.


def _bounded_texts(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            logging.info("Training the BPE tokenizer on the first %d bytes of the train split", total)
            return


def run_tokenizer(data_config, train_texts: Iterable[str], workdir: str, mask_token: bool = False):
    """The tokenizer data.tokenizer names; 'bpe' is trained on train_texts at the run's first start
    (with a mask token when `mask_token`)."""
    spec = (data_config.get("tokenizer", tokenizer_lib.BPE_SPEC) or "").strip()
    directory = tokenizer_lib.workdir_tokenizer_dir(workdir)
    if spec == tokenizer_lib.BPE_SPEC and not os.path.isdir(directory):
        vocab_size = int(data_config.get("bpe_vocab_size", 1024))
        texts = _bounded_texts(train_texts, BPE_TRAINING_MAX_BYTES)
        tokenizer_lib.train_bpe_tokenizer(texts, vocab_size, directory, mask_token=mask_token)
    tokenizer = tokenizer_lib.load_tokenizer(spec, workdir)
    requested = int(data_config.get("bpe_vocab_size", len(tokenizer)))
    if spec == tokenizer_lib.BPE_SPEC and len(tokenizer) != requested:
        # Small corpora run out of merges; resumed runs keep the tokenizer they started with.
        logging.warning(
            "The run's BPE tokenizer has %d tokens (data.bpe_vocab_size=%d)", len(tokenizer), requested
        )
    return tokenizer


def build_lm_data(
    data_config,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    workdir: str,
    process_index: int = 0,
    process_count: int = 1,
) -> LMData:
    """Prepares (or reuses) the dataset, tokenizer and token caches, and returns the loaders.

    `data_config` is the `data` ConfigDict. Every host runs this; shared files are written
    atomically, so data_dir and workdir may be shared or local.
    """
    if seq_len <= 0:
        raise UserError(f"seq_len={seq_len} must be positive")
    data_dir = (data_config.get("data_dir", "") or "").strip()
    data_dir = os.path.expanduser(data_dir) if data_dir else sources.default_data_dir()
    corpus = sources.load_corpus(data_config, data_dir)
    tokenizer = run_tokenizer(data_config, corpus.train, workdir)
    fingerprint = tokenizer_lib.fingerprint(tokenizer)
    cache = functools.partial(
        token_cache.cached_token_split,
        tokenizer=tokenizer,
        data_dir=data_dir,
        dataset_id=corpus.dataset_id,
    )
    train, evaluation = cache(corpus.train), cache(corpus.eval)
    pad, eos = tokenizer_lib.pad_id(tokenizer), tokenizer_lib.eos_id(tokenizer)
    # Segmented packing: batches carry segment ids (a new one at each EOS); concat: none.
    segment_eos = eos if data_config.get("packing", "concat") == "segmented" else None
    train_iter = lm_loader.make_train_iterator(
        train.tokens,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        prefetch=int(data_config.get("prefetch", 2)),
        data_id=f"{corpus.dataset_id}/{corpus.train.name}/{fingerprint[:16]}",
        eos_id=segment_eos,
    )
    _, rows = lm_loader.host_rows(global_batch_size, process_index, process_count)
    eval_batches = functools.partial(
        lm_loader.eval_batches,
        evaluation.tokens,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        pad_id=pad,
        process_index=process_index,
        process_count=process_count,
        eos_id=segment_eos,
    )
    eval_targets = max(evaluation.num_tokens - 1, 0)  # Every token but the first is predicted once.
    return LMData(
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        eos_id=eos,
        pad_id=pad,
        train_iter=train_iter,
        eval_batches=eval_batches,
        eval_tokens_per_byte=eval_targets / max(evaluation.num_bytes, 1),
        num_eval_batches=lm_loader.num_eval_batches(evaluation.num_tokens, seq_len, global_batch_size),
        prep_report=corpus.prep_report,
        num_train_windows=lm_loader.num_train_windows(train.num_tokens, seq_len),
        host_batch_size=rows,
    )
