"""Batching pads on the right; padding must never change or count toward any score."""

import pytest
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
    batched = loglikelihoods(r, [reqs])[0]
    single = [loglikelihoods(r, [[q]])[0][0] for q in reqs]
    assert batched == pytest.approx(single, abs=1e-4)


# (prefix, branches, rows wanted per branch): a shared context; a branch that is empty and
# one whose wanted rows reach back into the prefix; no shared prefix at all
TREES = [([5, 9, 11, 40, 41, 42], [[7, 8, 9], [3], [60, 61, 62, 63, 64]], [2, 1, 5]),
         ([1, 2, 3, 4, 5, 6, 7, 8], [[], [9, 10]], [3, 4]),
         ([], [[20, 21, 22], [30, 31]], [3, 1])]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("batch_tokens", [4096, 24])
def test_shared_prefix_logits_equal_each_sequence_on_its_own(arch, batch_tokens, request):
    """One tree row per item (prefix once, branches after it, a mask and positions that
    isolate the branches) gives each branch the logits of ``prefix + branch`` alone."""
    from edgequant.models.model import Model

    module = tiny_model().module if arch == "llama" else request.getfixturevalue("tiny_gemma3")
    if arch == "gemma3":
        module.config.sliding_window = 64  # longer than every sequence: the tree path runs
    r = TorchRunnable(Model(module, tiny_model().tokenizer, {"name": arch}),
                      batch_tokens=batch_tokens)
    got = r.logits_shared([(p, bs) for p, bs, _ in TREES], [k for *_, k in TREES])
    for (prefix, branches, keep), rows in zip(TREES, got, strict=True):
        assert len(rows) == len(branches)
        for b, k, row in zip(branches, keep, rows, strict=True):
            want = r.logits([*prefix, *b])[-k:]
            assert row.shape == want.shape
            torch.testing.assert_close(row, want, atol=2e-5, rtol=1e-4)


def test_a_sliding_window_reached_takes_the_plain_path(tiny_gemma3):
    """Gemma 3's sliding layers see at most ``sliding_window`` positions back; the tree
    mask has no window, so sequences that reach it are scored one by one (still exact)."""
    from edgequant.models.model import Model

    assert tiny_gemma3.config.sliding_window == 16
    r = TorchRunnable(Model(tiny_gemma3, tiny_model().tokenizer, {"name": "g"}))
    prefix, branches = list(range(3, 20)), [[30, 31, 32], [40]]
    got = r.logits_shared([(prefix, branches)], [[3, 1]])[0]
    for b, k, row in zip(branches, [3, 1], got, strict=True):
        torch.testing.assert_close(row, r.logits([*prefix, *b])[-k:], atol=2e-5, rtol=1e-4)
