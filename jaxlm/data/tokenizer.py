"""Tokenizers: train the run's own byte-level BPE, or load one from a directory or the hub.

`data.tokenizer` is 'bpe' (the run's own, kept in <workdir>/tokenizer/), a local directory, or a
hub name. Remote code is never trusted.

A workdir on a bucket: the run's BPE is trained into local scratch and uploaded, tokenizer.json
last (a bucket has no directory rename: that file's presence means the upload is complete);
loading downloads it into this host's cache first (transformers reads local files only).
"""

import hashlib
import math
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import transformers
from absl import logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxlm import io
from jaxlm.errors import UserError

BPE_SPEC = "bpe"
EOS_TOKEN = "<|endoftext|>"  # Separates documents; also used as BOS.
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"  # Only in BPEs trained for masked-LM runs (id 2).
WORKDIR_TOKENIZER_DIR = "tokenizer"
_BYTE_ALPHABET_SIZE = 256
_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # In this order: EOS gets id 0, PAD id 1.
_COMPLETE_MARKER = "tokenizer.json"  # Uploaded last to a bucket; the fast tokenizer's own file.


def workdir_tokenizer_dir(workdir: str) -> str:
    if io.is_remote(workdir):
        return os.fspath(io.path(workdir) / WORKDIR_TOKENIZER_DIR)  # os.path.join is for local paths.
    return os.path.join(workdir, WORKDIR_TOKENIZER_DIR)


def _workdir_tokenizer_saved(directory: str) -> bool:
    if io.is_remote(directory):
        return io.exists(io.path(directory) / _COMPLETE_MARKER)
    return os.path.isdir(directory)  # A local one appears by rename, whole.


def _train_into_bucket(texts: Iterable[str], vocab_size: int, directory: str, mask_token: bool):
    os.makedirs(io.cache_dir(), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="tokenizer-", dir=io.cache_dir())
    try:
        local = os.path.join(scratch, WORKDIR_TOKENIZER_DIR)
        tokenizer = train_bpe_tokenizer(texts, vocab_size, local, mask_token)
        io.copy_tree(local, directory, last=_COMPLETE_MARKER)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logging.info("Uploaded the run's tokenizer to %s", directory)
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str, mask_token: bool = False
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `texts` and saves it into out_dir.

    mask_token: also reserve MASK_TOKEN (masked-LM pretraining needs one).

    Deterministic: the same texts give a byte-identical tokenizer.json. The directory appears
    complete or not at all (written aside, then renamed), so concurrent hosts are safe.
    """
    specials = _SPECIAL_TOKENS + ((MASK_TOKEN,) if mask_token else ())
    minimum = _BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise UserError(f"data.bpe_vocab_size={vocab_size} is too small; use at least {minimum}")
    model = Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(text)) must give the text back unchanged.
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # Every byte stays encodable.
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        **({"mask_token": MASK_TOKEN} if mask_token else {})
    )
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the tokenizer is meant to be shared.
    try:
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):  # Another host finishing first is fine; else a real error.
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logging.info("Trained a byte-level BPE tokenizer (%d tokens) into %s", len(tokenizer), out_dir)
    return tokenizer


def _looks_like_path(spec: str) -> bool:
    # Hub names are 'name' or 'org/name'; anything else with a slash is meant as a directory.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def _hub_offline() -> bool:
    # Read the environment now: huggingface_hub reads it once, at import time.
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _from_pretrained(spec: str, local_files_only: bool):
    return transformers.AutoTokenizer.from_pretrained(
        spec, local_files_only=local_files_only, trust_remote_code=False
    )


# A model directory (init_from's) keeps its weights beside the tokenizer: never copied for it.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")


def _bucket_tokenizer_copy(spec: str) -> str:
    """Bucket directory `spec`'s top-level files but model weights, copied afresh into this host's
    cache (transformers reads local files only); replaced by rename, as io.local_copy does."""
    parent = os.path.join(io.cache_dir(), "bucket_copies")
    os.makedirs(parent, exist_ok=True)
    target = os.path.join(parent, "tokenizer-" + hashlib.sha256(spec.encode()).hexdigest()[:16])
    staging = tempfile.mkdtemp(prefix=".copy-", dir=parent)
    try:
        for name in io.list_dir(spec):
            if not name.endswith(_WEIGHT_SUFFIXES) and io.is_file(io.path(spec) / name):
                io.copy_file(io.path(spec) / name, os.path.join(staging, name))
        try:
            os.rename(target, f"{staging}.old")
        except FileNotFoundError:
            pass
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(target):  # Else another process of this host just made the same copy.
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(f"{staging}.old", ignore_errors=True)
    return target


def load_tokenizer(spec: str, workdir: str) -> transformers.PreTrainedTokenizerBase:
    """Loads the tokenizer named by `data.tokenizer`: 'bpe', a directory (local or gs://), or a hub name."""
    spec = spec.strip()
    if spec == BPE_SPEC:
        directory = workdir_tokenizer_dir(workdir)
        if not _workdir_tokenizer_saved(directory):
            raise UserError(
                f"data.tokenizer=bpe: {directory} is missing; it is trained on the run's first start,"
                " so start the run again or restore that directory"
            )
        local = io.local_copy(directory) if io.is_remote(directory) else directory
        # The run wrote this one as a plain PreTrainedTokenizerFast: loaded as that, not through
        # AutoTokenizer, whose config machinery imports torch when it is installed (2.8 s -> 0.04 s).
        return transformers.PreTrainedTokenizerFast.from_pretrained(local, local_files_only=True)
    if io.is_remote(spec):
        if not io.is_dir(spec):
            raise UserError(f"data.tokenizer={spec}: no such directory on the bucket; fix the path")
        expanded = _bucket_tokenizer_copy(spec)
    else:
        expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        try:
            return _from_pretrained(expanded, local_files_only=True)
        except (OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # One line only.
            raise UserError(
                f"data.tokenizer={spec}: not a tokenizer directory ({reason}); fix the path"
            ) from None
    if not spec or _looks_like_path(spec):
        raise UserError(
            f"data.tokenizer={spec!r}: no such directory; give a tokenizer directory or 'bpe'"
        )
    try:
        return _from_pretrained(spec, local_files_only=True)  # The hub cache, without network.
    except (OSError, ValueError):
        pass
    if not _hub_offline():
        try:
            return _from_pretrained(spec, local_files_only=False)
        except (OSError, ValueError):
            pass
    raise UserError(
        f"data.tokenizer={spec}: cannot load it from the hub or its cache; pass a local tokenizer"
        " directory or 'bpe'"
    )


def eos_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    """The id that ends each document (GPT-2 style tokenizers call it eos or <|endoftext|>; BERT's
    is [SEP])."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    for token in (EOS_TOKEN, "</s>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            return token_id
    if tokenizer.sep_token_id is not None:  # BERT-style tokenizers end sequences with [SEP].
        return int(tokenizer.sep_token_id)
    raise UserError(
        f"data.tokenizer: {tokenizer.name_or_path} has no end-of-sequence token; use a tokenizer"
        " with one, or 'bpe'"
    )


def document_prefix(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """The ids right before every document in training (token caches hold each document's ids,
    without the tokenizer's own special tokens, then an EOS): a prompt, as a new document, follows
    them too (`jaxlm generate`, and the tokenizer `jaxlm export` writes)."""
    return [eos_id(tokenizer)]


def pad_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    """The padding id; tokenizers without one (GPT-2) pad with EOS, which is safe because
    padded positions always have weight 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_id(tokenizer)


def fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    # Without truncation or padding: those are per-call state (a classifier's encoding sets them),
    # and a hash taken after an encode must equal one taken before it (a resume checks it).
    backend = _plain_backend(tokenizer)
    if backend is not None:
        description = backend.to_str()  # Vocab, merges, normalizer, pre-tokenizer, added tokens.
    else:
        description = json.dumps(
            [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())], ensure_ascii=False
        )
    digest = hashlib.sha256(description.encode("utf-8"))
    digest.update(str(eos_id(tokenizer)).encode())
    return digest.hexdigest()


def _plain_backend(tokenizer: transformers.PreTrainedTokenizerBase) -> Tokenizer | None:
    """The fast tokenizer without truncation or padding (documents are encoded whole)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.truncation is None and backend.padding is None:
        return backend
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


class BatchEncoder:
    """Encodes batches of documents into token ids, without special tokens."""

    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        self._backend = _plain_backend(tokenizer)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is None:
            return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]


_SAMPLE_READ_BATCH = 1024  # Records per read of the BPE sample.


def _read_texts(texts: Sequence[str], indices: Sequence[int]) -> list[str]:
    """texts[i] for i in indices, in one batched read when the split offers it (sources.TextSplit)."""
    read_many = getattr(texts, "texts", None)
    return read_many(list(indices)) if callable(read_many) else [texts[i] for i in indices]


def bpe_training_sample(splits: Sequence[tuple[Sequence[str], float]], max_bytes: int) -> Iterator[str]:
    """Documents to train the run's BPE on: each split's share (by weight) of `max_bytes`, read
    at an even stride over the split so a large corpus is sampled throughout, not at its start.
    A split that fits its share is read whole, in order.

    `splits`: (random-access texts, weight) pairs; bounded time whatever the corpus size.
    """
    total_weight = sum(weight for _, weight in splits) or 1.0
    for texts, weight in splits:
        budget = max_bytes * weight / total_weight
        head = _read_texts(texts, range(min(len(texts), 64)))
        mean_bytes = max(sum(len(t.encode("utf-8")) for t in head) / max(len(head), 1), 1.0)
        stride = max(1, math.ceil(len(texts) * mean_bytes / budget))
        indices = range(0, len(texts), stride)
        used = 0
        for start in range(0, len(indices), _SAMPLE_READ_BATCH):  # Batched reads: one per call is slow.
            for text in _read_texts(texts, indices[start:start + _SAMPLE_READ_BATCH]):
                yield text
                used += len(text.encode("utf-8"))
                if used >= budget:
                    break
            if used >= budget:
                break
        if stride > 1 or used >= budget:
            logging.info("The BPE tokenizer trains on %d bytes of a %d-document split (every %d-th document)",
                         used, len(texts), stride)


def run_tokenizer(data_config, train_texts: Sequence[tuple[Sequence[str], float]], workdir: str,
                  mask_token: bool = False) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer data.tokenizer names. 'bpe' is the run's own: trained at its first start on a
    sample of `train_texts` ((texts, weight) pairs, see bpe_training_sample), with a mask token
    when `mask_token`, and kept in the workdir."""
    spec = (data_config.get("tokenizer", BPE_SPEC) or "").strip()
    directory = workdir_tokenizer_dir(workdir)
    if spec == BPE_SPEC and not _workdir_tokenizer_saved(directory):
        vocab_size = int(data_config.get("bpe_vocab_size", 1024))
        max_bytes = int(float(data_config.get("bpe_sample_mb", 8)) * (1 << 20))
        train = _train_into_bucket if io.is_remote(directory) else train_bpe_tokenizer
        train(bpe_training_sample(train_texts, max_bytes), vocab_size, directory, mask_token)
    tokenizer = load_tokenizer(spec, workdir)
    requested = int(data_config.get("bpe_vocab_size", len(tokenizer)))
    if spec == BPE_SPEC and len(tokenizer) != requested:
        # Small corpora run out of merges; resumed runs keep the tokenizer they started with.
        logging.warning("The run's BPE tokenizer has %d tokens (data.bpe_vocab_size=%d)", len(tokenizer), requested)
    return tokenizer
