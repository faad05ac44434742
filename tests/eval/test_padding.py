"""Batching pads on the right; padding must never change or count toward any score."""

import torch

import edgequant as eq
from edgequant.backends.torch_native import TorchRunnable
from edgequant.eval.tasks import loglikelihoods

from ._tiny import tiny_model


def test_batched_logits_equal_single_logits_whatever_the_padding():
    r = eq.open(tiny_model())
    seqs = [list(range(40, 60)), list(range(1, 6)), list(range(100, 133))]
    batched = r.logits_batch(seqs)
    assert [b.shape[0] for b in batched] == [20, 5, 33]
    for s, b in zip(seqs, batched, strict=True):
        assert torch.allclose(b, r.logits(s), atol=1e-5)
    # the same short sequence next to long neighbours with other contents: rows unchanged
    again = r.logits_batch([[7] * 60, seqs[1], [200] * 45])
    assert torch.allclose(again[1], batched[1], atol=1e-5)


def test_token_budget_splits_batches_without_changing_results():
    model = tiny_model()
    small = TorchRunnable(model, batch_tokens=16)
    big = TorchRunnable(model)
    seqs = [list(range(i, i + 7 + i % 5)) for i in range(10)]
    for a, b in zip(small.logits_batch(seqs), big.logits_batch(seqs), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_last_rows_only_are_the_tails_of_the_full_logits():
    """``last`` keeps each sequence's own last rows, in batches of mixed lengths (the LM
    head then runs on fewer positions) and across batch splits."""
    model = tiny_model()
    seqs = [list(range(40, 60)), list(range(1, 6)), list(range(100, 133)), [9, 8]]
    last = [3, 5, 1, 2]
    for r in (TorchRunnable(model), TorchRunnable(model, batch_tokens=40)):
        full = r.logits_batch(seqs)
        tails = r.logits_batch(seqs, last=last)
        assert [t.shape[0] for t in tails] == last
        for f, t, n in zip(full, tails, last, strict=True):
            assert torch.allclose(t, f[-n:], atol=1e-5)


def test_task_loglikelihoods_batched_equal_unbatched():
    r = eq.open(tiny_model())
    reqs = [("The cat sat on the", " mat."), ("Question: 2+2?\nAnswer:", " four"),
            ("x", " a much longer continuation than the others, to force padding")]
    batched = loglikelihoods(r, reqs)
    single = [loglikelihoods(r, [q])[0] for q in reqs]
    assert batched == __import__("pytest").approx(single, abs=1e-4)
