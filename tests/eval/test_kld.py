import pytest
import torch

import edgequant as eq
from edgequant.errors import EvaluationError
from edgequant.eval import kld as kld_mod
from edgequant.eval.kld import base_distribution, kld_exact, kld_rows, reference_rows
from edgequant.eval.perplexity import make_windows

from ..helpers import tiny_tokenizer
from ._tiny import TableRunnable, tiny_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return str(f)


def test_kld_of_a_model_against_itself_is_zero(corpus):
    model = tiny_model()
    for k, m in ((4, 8), (256, 128)):  # a tiny head with a sampled tail; and everything
        res = eq.evaluate(model, ["ppl", "kld"], kld_base=model, corpus=corpus, ctx=64,
                          kld_topk=k, kld_tail=m)
        assert abs(res.kld_mean) <= 1e-6 and res.kld_p99 <= 1e-6 and res.kld_max <= 1e-6
        assert res.top1 == 1.0
        assert res.ppl_base == pytest.approx(res.ppl, rel=1e-6)


def test_full_head_equals_exact_kld():
    torch.manual_seed(0)
    p, q = torch.randn(50, 40) * 2, torch.randn(50, 40) * 2
    targets = torch.randint(0, 40, (50,))
    k, top1 = kld_rows(q, reference_rows(p, targets, k=40))
    assert torch.allclose(k, kld_exact(p, q), atol=1e-6)
    assert top1.tolist() == (p.argmax(-1) == q.argmax(-1)).tolist()


def test_sampled_tail_estimates_the_exact_kld():
    # a hard case: i.i.d. noise on every logit of a flat 2000-token vocabulary, so that more
    # than a third of the mass (and of the divergence) sits outside the 64-token head
    torch.manual_seed(1)
    V = 2000
    p = torch.randn(1600, V) * 1.5
    q = p + 0.3 * torch.randn(1600, V)
    targets = torch.randint(0, V, (1600,))
    exact = float(kld_exact(p, q).mean())
    ref = reference_rows(p, targets, k=64, m=256)
    assert float(ref.tail_mass.exp().mean()) > 0.3
    sampled = float(kld_rows(q, ref)[0].mean())
    head_only = float(kld_rows(q, reference_rows(p, targets, k=64, m=0))[0].mean())
    assert sampled == pytest.approx(exact, rel=0.03)
    assert head_only < 0.8 * exact


def test_kld_strictly_grows_with_noise():
    torch.manual_seed(2)
    p = torch.randn(300, 500) * 2
    targets = torch.randint(0, 500, (300,))
    base = reference_rows(p, targets)
    means = [float(kld_rows(p + s * torch.randn_like(p), base)[0].mean())
             for s in (0.05, 0.2, 0.8)]
    assert means[0] < means[1] < means[2]


def test_base_cache_is_reused_and_keyed(tmp_path):
    torch.manual_seed(3)
    base = TableRunnable(torch.randn(32, 32))
    base.identity = lambda: {"name": "t", "weights_sha256": "abc"}  # cacheable
    w = make_windows(torch.randint(0, 32, (64,)), ctx=16, bos_id=0)
    first = base_distribution(base, w, k=8, m=4)
    assert base.calls == 4 and not first.meta["cached"]
    again = base_distribution(base, w, k=8, m=4)
    assert base.calls == 4 and again.meta["cached"]
    for a, b in zip(first.tensors().values(), again.tensors().values(), strict=True):
        assert torch.equal(a, b)
    base_distribution(base, w, k=16, m=4)  # another k: another cache entry
    assert base.calls == 8
    w2 = make_windows(torch.randint(0, 32, (64,)), ctx=16, bos_id=0)
    base_distribution(base, w2, k=8, m=4)  # other windows: recomputed
    assert base.calls == 12


def test_in_memory_base_is_never_cached():
    base = TableRunnable(torch.randn(8, 8))
    w = make_windows(torch.randint(0, 8, (32,)), ctx=8, bos_id=0)
    base_distribution(base, w)
    base_distribution(base, w)
    assert base.calls == 8
    assert not (kld_mod.cache_root() / "kld").exists()


def test_kld_base_with_another_tokenizer_is_refused(corpus):
    model = tiny_model()
    other = eq.Model(model.module, tiny_tokenizer(model.module.config.vocab_size),
                     {"name": "word-level"})
    with pytest.raises(EvaluationError, match="tokenizes differently"):
        eq.evaluate(model, ["ppl", "kld"], kld_base=other, corpus=corpus, ctx=64)


def test_kld_needs_a_base():
    with pytest.raises(EvaluationError, match="kld needs a base"):
        eq.evaluate(tiny_model(), ["kld"])


@pytest.mark.slow
def test_rtn_kld_grows_w8_w4_w3(smollm2_dir):
    model = eq.load("smollm2-135m")
    base = eq.open(model)
    klds = []
    for scheme in ("w8", "w4g128", "w3g128"):
        q = eq.quantize(model, "rtn", scheme=scheme)
        res = eq.evaluate(q, ["ppl", "kld"], kld_base=base, max_tokens=1024)
        assert res.tokens_scored == 2 * 511
        klds.append(res.kld_mean)
    assert 0 < klds[0] < klds[1] < klds[2], klds
