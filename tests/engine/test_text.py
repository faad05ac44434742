"""Streaming text: incremental detokenization and stop strings that never leak."""

import pytest

from edgequant.engine.text import StopFilter, TextDecoder

from ..eval._tiny import byte_tokenizer

TEXT = "naïve café — 東京 🚀 done"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False)


def test_deltas_are_whole_characters_and_add_up(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT.encode())  # one token per byte: characters span tokens
    dec = TextDecoder(lambda x: _decode(tok, x), context=tok.encode("Say: "))
    deltas = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    # a 4-byte emoji: three tokens give nothing, the fourth gives the character
    start = len("naïve café — 東京 ".encode())
    assert deltas[start:start + 4] == ["", "", "", "🚀"]


def test_an_unfinished_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("ok 🚀", add_special_tokens=False)[:-2]
    dec = TextDecoder(lambda x: _decode(tok, x))
    assert "".join(dec.push(t) for t in ids) == "ok "
    assert dec.flush() == "\ufffd"


def test_the_first_token_keeps_its_leading_space(tok):
    # the window starts in the prompt: " Paris" after a prompt stays " Paris"
    dec = TextDecoder(lambda x: _decode(tok, x), context=tok.encode("The capital is"))
    assert "".join(dec.push(t) for t in tok.encode(" Paris")) == " Paris"


def _stream(stops, pieces):
    f = StopFilter(stops)
    out = [f.push(p) for p in pieces]
    if not f.stopped:
        out.append(f.flush())
    return f, out


def test_stop_string_split_over_pieces_is_cut_and_never_streamed():
    f, out = _stream(["</end>"], ["Hello <", "/e", "nd", "> more"])
    assert f.stopped and f.text == "Hello "
    assert out == ["Hello ", "", "", ""]


def test_a_held_tail_is_released_when_it_stops_matching():
    f, out = _stream(["###"], ["a#", "#", "b", "c"])
    assert not f.stopped and out == ["a", "", "##b", "c", ""]
    assert "".join(out) == f.text == "a##bc"


def test_earliest_stop_wins_and_a_stop_inside_a_longer_prefix_counts():
    f, out = _stream(["abc", "b"], ["xa", "bz"])
    assert f.stopped and f.text == "xa" and "".join(out) == "xa"
    f, out = _stream(["world", "lo"], ["hello world"])
    assert f.text == "hel" and out == ["hel"]


def test_text_after_a_stop_is_ignored_and_no_stops_pass_everything():
    f, out = _stream(["."], ["one. two", " three"])
    assert out == ["one", ""] and f.text == "one"
    f, out = _stream([], ["a", "b"])
    assert out == ["a", "b", ""] and f.text == "ab"
