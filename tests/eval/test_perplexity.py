import math

import pytest
import torch

import edgequant as eq
from edgequant.errors import DataError, EvaluationError
from edgequant.eval.perplexity import make_windows, nll_rows, score_windows

from ._tiny import TableRunnable, tiny_model


def test_windows_start_with_bos_never_overlap_and_drop_the_remainder():
    stream = torch.arange(100, 125)  # 25 tokens, ctx 8 → 3 windows, 1 token dropped
    w = make_windows(stream, ctx=8, bos_id=7)
    assert w.n == 3 and w.ctx == 8 and w.first == 0
    assert w.tokens[:, 0].tolist() == [7, 7, 7]
    assert w.tokens[:, 1:].flatten().tolist() == [t for i in range(3)
                                                  for t in range(100 + 8 * i + 1, 100 + 8 * i + 8)]
    assert w.tokens_scored == 3 * 7
    assert w.targets(1).tolist() == list(range(109, 116))
    half = make_windows(stream, ctx=8, bos_id=7, half=True)
    assert half.first == 4 and half.scored_per_window == 3  # llama.cpp: ctx/2 − 1
    assert half.targets(0).tolist() == [105, 106, 107]
    assert make_windows(stream, ctx=8, bos_id=7, max_tokens=16).n == 2


def test_hand_checked_perplexity():
    # Vocabulary of 4. After any token the model predicts token 1 with p = 1/2 and the others
    # with p = 1/6 each: logits log([1, 3, 1, 1]).
    table = torch.log(torch.tensor([1.0, 3.0, 1.0, 1.0])).repeat(4, 1)
    r = TableRunnable(table, bos_id=0)
    # one window of 4: [BOS, 1, 2, 1] → predictions of 1, 2, 1: p = 1/2, 1/6, 1/2
    w = make_windows(torch.tensor([3, 1, 2, 1]), ctx=4, bos_id=0)
    scores = score_windows(r, w)
    expected = math.exp(-(math.log(1 / 2) + math.log(1 / 6) + math.log(1 / 2)) / 3)
    assert scores.ppl == pytest.approx(expected, rel=1e-7)  # logits are float32
    assert scores.nll.tolist() == pytest.approx([math.log(2), math.log(6), math.log(2)], rel=1e-7)
    # uniform logits: perplexity is the vocabulary size, whatever the tokens
    u = TableRunnable(torch.zeros(4, 4))
    assert score_windows(u, make_windows(torch.tensor([1, 2, 3, 0] * 3), 4, 0)).ppl == \
        pytest.approx(4.0, rel=1e-12)


def test_perplexity_equals_direct_computation_from_logits():
    torch.manual_seed(0)
    r = TableRunnable(torch.randn(16, 16) * 3)
    stream = torch.randint(0, 16, (70,))
    for half in (False, True):
        w = make_windows(stream, ctx=16, bos_id=0, half=half)
        nll = []
        for i in range(w.n):
            logits = r.table[w.tokens[i]]
            nll.append(torch.nn.functional.cross_entropy(
                logits[w.first:-1].double(), w.tokens[i, w.first + 1:], reduction="none"))
        direct = math.exp(float(torch.cat(nll).mean()))
        assert score_windows(r, w).ppl == pytest.approx(direct, rel=1e-12)


def test_tiny_model_perplexity_matches_module_cross_entropy():
    model = tiny_model()
    r = eq.open(model)
    stream = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1))
    w = make_windows(stream, ctx=32, bos_id=r.bos_id)
    with torch.no_grad():
        logits = model.module(input_ids=w.tokens).logits.double()
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               w.tokens[:, 1:].reshape(-1))
    assert score_windows(r, w).ppl == pytest.approx(math.exp(float(direct)), rel=1e-5)


def test_nll_rows_is_float64_and_exact():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert nll_rows(logits, torch.tensor([0, 0])).tolist() == pytest.approx(
        [math.log(2), math.log(4 / 3)], abs=1e-7)


def test_text_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window of 512"):
        make_windows(torch.arange(100), ctx=512, bos_id=0)
    with pytest.raises(DataError, match="max_tokens=10"):
        make_windows(torch.arange(100), ctx=16, bos_id=0, max_tokens=10)
    with pytest.raises(EvaluationError):
        make_windows(torch.arange(100), ctx=1, bos_id=0)


def test_short_text_file_through_evaluate(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "short.txt"
    f.write_text("only a few words")
    with pytest.raises(DataError, match="fewer than one window of 64"):
        eq.evaluate(tiny_model(), ["ppl"], corpus=str(f), ctx=64)
