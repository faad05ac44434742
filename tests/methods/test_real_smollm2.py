"""The methods on the real SmolLM2-135M: HQQ's weight error, and held-out perplexity order.

Only the first blocks are quantized (the rest stay fp16 through a ``keep`` override), which is
enough to separate the methods and keeps each cell to seconds. Calibration windows come from
the second half of the ``wiki`` token stream; perplexity is scored on its first 2,048 tokens,
so the two never overlap.
"""

from __future__ import annotations

import pytest
import torch

import edgequant as eq
from edgequant.data import corpus_tokens
from edgequant.data.calibration import calibration
from edgequant.eval.perplexity import make_windows, perplexity
from edgequant.formats import quantize_tensor
from edgequant.methods.hqq import hqq_quantize

pytestmark = pytest.mark.slow

FIRST_BLOCKS = (("model.layers.*", "keep"), ("model.layers.[0-3].*", "w3g128"))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return eq.load(smollm2_dir)


@pytest.mark.parametrize("scheme", ["w3g128-asym", "w4g64-asym", "w3g128", "w4g128"])
def test_hqq_weight_error_below_rtn_on_real_weights(smollm2, scheme):
    """Every linear of blocks 0 and 1: HQQ's mean |W − Ŵ| is below RTN's (what its
    half-quadratic objective with p = 0.7 optimizes), and its RMS error is no worse."""
    for name, mod in smollm2.module.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and name.startswith(("model.layers.0.",
                                                                      "model.layers.1."))):
            continue
        W = mod.weight.detach().float()
        dh = W - hqq_quantize(W, scheme).dequantize()
        dr = W - quantize_tensor(W, scheme).dequantize()
        assert dh.abs().mean() < 0.99 * dr.abs().mean(), name
        assert dh.pow(2).mean() < 1.01 * dr.pow(2).mean(), name


def test_w3g128_held_out_perplexity_orders_rtn_above_gptq_and_awq(smollm2):
    calib = calibration("wiki", n=16, seq_len=256).build(smollm2.tokenizer)
    ppl = {}
    windows = None
    for method in ("rtn", "gptq", "awq"):
        q = eq.quantize(smollm2, method, scheme="w3g128", overrides=FIRST_BLOCKS, calib=calib)
        assert len(q.layers) == 4 * 7
        run = eq.open(q)
        if windows is None:
            windows = make_windows(corpus_tokens("wiki", run), 512, run.bos_id, max_tokens=2048)
        ppl[method] = perplexity(run, windows)
    print({k: round(v, 3) for k, v in ppl.items()})
    assert ppl["rtn"] > ppl["gptq"] and ppl["rtn"] > ppl["awq"], ppl
