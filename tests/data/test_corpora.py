from pathlib import Path

import pytest
import torch

from edgequant.data import corpus_tokens, load_corpus, sample_windows
from edgequant.data.tokens import HFTextTokenizer, fingerprint
from edgequant.errors import DataError

from ..eval._tiny import byte_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))


def test_missing_corpus_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="neither a built-in corpus .*wiki.* nor an existing"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="not a file"):
        load_corpus(str(tmp_path))


def test_unreadable_corpus_file_is_a_clear_error(tmp_path, monkeypatch):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_corpus(str(binary))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(str(empty))
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match="permission denied"):
        load_corpus(str(locked))


def test_file_corpus_tokens_are_cached_per_tokenizer(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld " * 10)
    tok = byte_tokenizer()
    first = corpus_tokens(str(f), tok)
    assert first.dtype == torch.int64 and first.tolist() == list(("héllo wörld " * 10).encode())
    assert corpus_tokens(str(f), tok, max_tokens=5).tolist() == first[:5].tolist()
    files = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 1
    # a second call reads the cache: tokenizing again would fail here
    monkeypatch.setattr(HFTextTokenizer, "tokenize", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(HFTextTokenizer, "tokenizer_fingerprint", lambda self: fp)
    fp = fingerprint(lambda s: list(s.encode()), 256)
    assert torch.equal(corpus_tokens(str(f), tok), first)
    # an edited file is another corpus
    f.write_text("other text " * 10)
    monkeypatch.undo()
    assert corpus_tokens(str(f), tok).tolist() == list(("other text " * 10).encode())


def test_unknown_corpus_name_lists_the_known_ones():
    with pytest.raises(DataError, match="wiki, lambada, shakespeare"):
        corpus_tokens("wikitext-103", byte_tokenizer())


def test_fingerprint_tells_tokenizers_apart():
    a = HFTextTokenizer(byte_tokenizer()).tokenizer_fingerprint()
    assert a == HFTextTokenizer(byte_tokenizer()).tokenizer_fingerprint()
    assert a == fingerprint(lambda s: list(s.encode()), 256)
    assert a != fingerprint(lambda s: list(s.encode()), 257)  # another BOS
    assert a != fingerprint(lambda s: list(s.encode())[::-1], 256)


def test_sample_windows_is_seeded_and_checks_length():
    stream = torch.arange(1000)
    a = sample_windows(stream, n=8, seq_len=64, seed=3)
    assert a.shape == (8, 64)
    assert torch.equal(a, sample_windows(stream, n=8, seq_len=64, seed=3))
    assert not torch.equal(a, sample_windows(stream, n=8, seq_len=64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous
    with pytest.raises(DataError, match="fewer than one window of 2000"):
        sample_windows(stream, n=1, seq_len=2000)


@pytest.mark.slow
def test_builtin_corpora():
    wiki = load_corpus("wiki")
    assert len(wiki.documents) == 2938
    assert 260_000 < sum(len(d.split()) for d in wiki.documents) < 280_000
    assert len(load_corpus("lambada").documents) == 5153
    assert len(load_corpus("shakespeare").documents) == 78
