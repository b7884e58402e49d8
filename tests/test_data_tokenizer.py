"""The run's BPE tokenizer (deterministic, reloadable) and tokenizer loading rules."""

import os

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "Café, naïve, 日本語 and emoji 🙂 are bytes like any other.",
    "You are all resolved rather to die than to famish?",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("work") / "tokenizer")
    return tokenizer_lib.train_bpe_tokenizer(iter(TEXTS), 300, out_dir), out_dir


def test_training_is_deterministic(trained, tmp_path):
    _, first_dir = trained
    tokenizer_lib.train_bpe_tokenizer(iter(TEXTS), 300, str(tmp_path / "again"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(first_dir, name), "rb") as a, open(tmp_path / "again" / name, "rb") as b:
            assert a.read() == b.read(), name


def test_reload_round_trip_and_special_ids(trained):
    tokenizer, out_dir = trained
    reloaded = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    assert len(reloaded) == len(tokenizer) == 300
    assert tokenizer_lib.eos_id(reloaded) == 0 and reloaded.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tokenizer_lib.pad_id(reloaded) == 1 and reloaded.convert_ids_to_tokens(1) == "<|pad|>"
    text = "Speak, speak! 日本語 🙂 unseen: Ωμέγα\nnew line"
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == text  # Byte level: anything round-trips.
    assert tokenizer_lib.BatchEncoder(reloaded)([text, "All:"]) == [ids, reloaded("All:")["input_ids"]]
    assert tokenizer_lib.fingerprint(reloaded) == tokenizer_lib.fingerprint(tokenizer)


def test_load_tokenizer_specs(trained, tmp_path, monkeypatch):
    tokenizer, out_dir = trained
    workdir = os.path.dirname(out_dir)
    from_bpe = tokenizer_lib.load_tokenizer("bpe", workdir)
    from_dir = tokenizer_lib.load_tokenizer(out_dir, str(tmp_path))
    assert from_bpe.get_vocab() == from_dir.get_vocab() == tokenizer.get_vocab()

    with pytest.raises(UserError, match=r"data.tokenizer=bpe: .*tokenizer is missing"):
        tokenizer_lib.load_tokenizer("bpe", str(tmp_path))
    with pytest.raises(UserError, match=r"data.tokenizer='/no/such/dir': no such directory"):
        tokenizer_lib.load_tokenizer("/no/such/dir", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # No network in tests: only the (empty) cache is tried.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as error:
        tokenizer_lib.load_tokenizer("no-such-org/no-such-tokenizer", str(tmp_path))
    message = str(error.value)
    assert "data.tokenizer=no-such-org/no-such-tokenizer" in message and "'bpe'" in message
    assert "local tokenizer directory" in message and "\n" not in message


def test_vocab_too_small_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data.bpe_vocab_size=100 .*at least 258"):
        tokenizer_lib.train_bpe_tokenizer(iter(TEXTS), 100, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_gpt2_like_tokenizer_without_pad_pads_with_eos():
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    gpt2_like = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>")
    assert gpt2_like.pad_token_id is None
    assert tokenizer_lib.eos_id(gpt2_like) == 0
    assert tokenizer_lib.pad_id(gpt2_like) == 0
    assert tokenizer_lib.BatchEncoder(gpt2_like)(["ab a"]) == [[3, 1]]

    bare = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    no_eos = transformers.PreTrainedTokenizerFast(tokenizer_object=bare)
    with pytest.raises(UserError, match="no end-of-sequence token"):
        tokenizer_lib.eos_id(no_eos)


def test_fingerprint_tracks_the_vocabulary(trained, tmp_path):
    tokenizer, _ = trained
    other = tokenizer_lib.train_bpe_tokenizer(iter(TEXTS), 290, str(tmp_path / "other"))
    assert tokenizer_lib.fingerprint(other) != tokenizer_lib.fingerprint(tokenizer)


def test_encoding_ignores_saved_truncation(trained):
    tokenizer, out_dir = trained
    truncating = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    truncating.backend_tokenizer.enable_truncation(max_length=2)
    text = TEXTS[0]
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(whole) > 2
    assert tokenizer_lib.BatchEncoder(truncating)([text]) == [whole]


def test_fingerprint_ignores_truncation_and_padding_state(trained):
    """A classifier's encoding leaves truncation/padding set on the tokenizer: its fingerprint
    (the data id a resume checks) must be the one it had before, or a second resume is refused."""
    _, out_dir = trained
    fresh = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    before = tokenizer_lib.fingerprint(fresh)
    fresh(TEXTS[:3], truncation=True, max_length=4, padding="max_length")
    assert fresh.backend_tokenizer.truncation is not None, "the call should have left its state behind"
    assert tokenizer_lib.fingerprint(fresh) == before
