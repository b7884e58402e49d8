"""Tokenize a text split once into one flat token array on disk, then memory-map it.

Layout: <data_dir>/jaxlm_token_cache/<dataset_id>/<split>-<tokenizer fingerprint>.npy holds
doc_0 EOS doc_1 EOS ... doc_n EOS (EOS after every document: the packing for causal LM), and a
.json beside it holds the counts needed for bits per byte. Both are written aside and renamed,
so concurrent hosts or a kill never leave a partial file behind. A bucket data_dir (gs://)
keeps its token caches in this host's cache instead (bucket_data.local_root).
"""

import dataclasses
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterator

import numpy as np
from absl import logging

from jaxlm import io
from jaxlm.data import builders, bucket_data
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import TextSplit
from jaxlm.errors import UserError

CACHE_DIRNAME = "jaxlm_token_cache"
_ENCODE_BATCH = 1024  # Documents per fast-tokenizer batch call.
_COPY_CHUNK = 1 << 24  # Tokens per copy step when building the .npy.


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    tokens: np.ndarray  # 1-D, read-only memmap of uint16 or uint32.
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the split's documents (EOS separators not included).

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def cache_paths(
    data_dir: str, dataset_id: str, split: str, tokenizer_fingerprint: str
) -> tuple[str, str]:
    """(.npy path, .json path). Split names like 'train[:10%]' get a safe name plus a hash.
    Under a bucket data_dir, in this host's cache: the cache is per host, and memory-mapped."""
    if io.is_remote(data_dir):
        data_dir = bucket_data.local_root(data_dir)
    safe_split = re.sub(r"[^A-Za-z0-9_-]+", "_", split).strip("_")
    if safe_split != split:
        safe_split += "_" + hashlib.sha256(split.encode()).hexdigest()[:8]
    name = f"{safe_split}-{tokenizer_fingerprint[:16]}"
    stem = os.path.join(data_dir, CACHE_DIRNAME, dataset_id, name)
    return stem + ".npy", stem + ".json"


def _encoded_batches(
    texts: TextSplit, encode: tokenizer_lib.BatchEncoder, eos: int
) -> Iterator[tuple[list[int], int, int]]:
    """Yields (flat ids with EOS after each document, documents, bytes) per batch."""
    for batch in texts.batches(_ENCODE_BATCH):
        flat: list[int] = []
        for ids in encode(batch):
            flat.extend(ids)
            flat.append(eos)
        yield flat, len(batch), sum(len(text.encode("utf-8")) for text in batch)


def _write_cache(texts: TextSplit, tokenizer, npy_path: str, json_path: str, label: str) -> None:
    dtype = token_dtype(len(tokenizer))
    encode = tokenizer_lib.BatchEncoder(tokenizer)
    eos = tokenizer_lib.eos_id(tokenizer)
    directory = os.path.dirname(npy_path)
    os.makedirs(directory, exist_ok=True)
    progress = builders.Progress(f"tokenizing {label}", 0, total_documents=len(texts))
    documents = tokens = num_bytes = 0
    # Token counts are unknown up front: stream raw ids to a scratch file, then build the .npy.
    raw_fd, raw_path = tempfile.mkstemp(prefix=".raw-", suffix=".tmp", dir=directory)  # Private scratch.
    # Not mkstemp (0600): open_memmap creates it under the umask, so the cache is readable by all.
    npy_tmp = os.path.join(directory, f".npy-{uuid.uuid4().hex[:12]}.tmp")
    try:
        with os.fdopen(raw_fd, "wb") as raw:
            for flat, batch_documents, batch_bytes in _encoded_batches(texts, encode, eos):
                raw.write(np.asarray(flat, dtype=dtype).tobytes())
                documents += batch_documents
                tokens += len(flat)
                num_bytes += batch_bytes
                progress.advance(batch_documents, batch_bytes)
        progress.finish()
        source = np.memmap(raw_path, dtype=dtype, mode="r", shape=(tokens,))
        target = np.lib.format.open_memmap(npy_tmp, mode="w+", dtype=dtype, shape=(tokens,))
        for start in range(0, tokens, _COPY_CHUNK):
            target[start : start + _COPY_CHUNK] = source[start : start + _COPY_CHUNK]
        target.flush()
        del source, target
        metadata = {
            "num_documents": documents, "num_tokens": tokens, "num_bytes": num_bytes, "dtype": dtype.name
        }
        # The .json goes first: a visible .npy always has its counts beside it.
        io.write_json_atomic(json_path, metadata)
        os.replace(npy_tmp, npy_path)
    finally:
        for path in (raw_path, npy_tmp):
            if os.path.exists(path):
                os.unlink(path)


def cached_token_split(texts: TextSplit, tokenizer, *, data_dir: str, dataset_id: str) -> TokenSplit:
    """The split's token stream, tokenized on first use and memory-mapped afterwards."""
    if not len(texts):
        raise UserError(f"split {texts.name!r} of {dataset_id} has no documents; choose another split")
    fingerprint = tokenizer_lib.fingerprint(tokenizer)
    npy_path, json_path = cache_paths(data_dir, dataset_id, texts.name, fingerprint)
    if os.path.exists(npy_path):
        logging.info("Reusing token cache %s", npy_path)
    else:
        _write_cache(texts, tokenizer, npy_path, json_path, f"{dataset_id} {texts.name}")
        logging.info("Wrote token cache %s", npy_path)
    metadata = io.read_json(json_path)
    tokens = np.load(npy_path, mmap_mode="r")
    return TokenSplit(
        tokens=tokens, num_documents=metadata["num_documents"], num_bytes=metadata["num_bytes"]
    )
