import math

import pytest
import torch

import edgequant as eq
from edgequant.data.tasks import MCItem
from edgequant.errors import DataError
from edgequant.eval.tasks import encode_pair, request_tokens, score_items

from ._tiny import TableRunnable, tiny_model


def _runnable_preferring(byte_logp: dict[int, float]) -> TableRunnable:
    """After any byte, the next byte b has log-prob byte_logp.get(b, -10) (unnormalized)."""
    row = torch.full((256,), -10.0)
    for b, lp in byte_logp.items():
        row[b] = lp
    return TableRunnable(row.repeat(256, 1))


def test_encode_pair_moves_trailing_spaces_like_lm_eval():
    r = TableRunnable(torch.zeros(256, 256))
    assert encode_pair(r, "Question: x\nAnswer: ", "yes") == (list(b"Question: x\nAnswer:"),
                                                               list(b" yes"))
    ids, n = request_tokens(r, "ab", " c")
    assert ids == list(b"ab c") and n == 2
    r.add_bos = True
    assert request_tokens(r, "ab", " c")[0] == [r.bos_id, *b"ab c"]


def test_acc_and_acc_norm_by_hand():
    # every byte costs the same (-log 256 after normalization) except 'x', which is likelier:
    # so the raw log-likelihood prefers the shortest choice, and per-character
    # normalization prefers the choice with the most 'x's per character.
    r = _runnable_preferring({ord("x"): 2.0})
    item = MCItem("0", ("Q:",) * 3, (" ab", " xxxxxxxxab", " abcdefgh"), gold=1,
                  norm_texts=("ab", "xxxxxxxxab", "abcdefgh"))
    res = score_items(r, [item])
    assert res["n"] == 1 and res["acc"] == 0.0 and res["acc_norm"] == 1.0
    item2 = MCItem("1", ("Q:",) * 2, (" ab", " abcdefgh"), gold=0, norm_texts=("ab", "abcdefgh"))
    res = score_items(r, [item, item2])
    assert res["acc"] == 0.5 and res["acc_norm"] == 0.5 and res["n"] == 2
    assert res["acc_stderr"] == pytest.approx(math.sqrt(0.5 / 2))


def test_acc_norm_uses_characters_and_acc_bytes_uses_utf8_bytes():
    # 'é' is 2 bytes / 1 character: same total log-likelihood for both choices below, but
    # "éé" has 2 characters and 4 bytes, "abc" has 3 of each.
    r = _runnable_preferring({})
    item = MCItem("0", ("Q:", "Q:"), (" éé", " abc"), gold=0, norm_texts=("éé", "abc"))
    res = score_items(r, [item])
    # ll = -(n_bytes + 1) * c: éé → 5c, abc → 4c. acc: abc. per char: 5c/2 vs 4c/3 → abc.
    # per byte: 5c/4 vs 4c/3 → éé wins (less negative).
    assert res["acc"] == 0.0 and res["acc_norm"] == 0.0 and res["acc_bytes"] == 1.0


def test_winogrande_style_items_have_no_acc_norm():
    r = _runnable_preferring({})
    r.table[ord("a"), ord(" ")] = 3.0  # " won." is likelier after "Maria" than after "Sarah"
    item = MCItem("0", ("so Sarah", "so Maria"), (" won.", " won."), gold=1, norm_texts=None)
    res = score_items(r, [item])
    assert res["acc"] == 1.0 and res["acc_norm"] is None and res["acc_bytes"] is None


def test_unknown_task_name_is_refused_before_any_work():
    with pytest.raises(DataError, match="unknown task.*nope.*known tasks: hellaswag"):
        eq.evaluate(tiny_model(), ["tasks"], tasks=("hellaswag", "nope"))


@pytest.mark.slow
def test_real_task_subset_on_a_tiny_model():
    res = eq.evaluate(tiny_model(), ["tasks"], tasks="arc_easy,winogrande", limit=8)
    assert res.tasks["arc_easy"]["n"] == 8 and res.tasks["arc_easy"]["split"] == "test"
    assert 0 <= res.tasks["arc_easy"]["acc_norm"] <= 1
    assert res.tasks["winogrande"]["acc_norm"] is None
