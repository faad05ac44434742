"""QAT: STE and LSQ gradients by hand, and convert's codes/logits equal the fake-quantized."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.errors import SchemeError
from edgequant.finetuning.qat import FakeQuantLinear, LRQATLinear, convert, prepare
from edgequant.formats import QuantScheme
from edgequant.models.model import Model
from edgequant.nn.quant_linear import QuantLinear
from edgequant.recipe import Recipe


def _layer(w, scheme="w4-channel-fp32", s=0.25, learn=True, lsq_grad_scale=False):
    scheme = QuantScheme.parse(scheme)
    params = {"scales": torch.full((w.shape[0], 1, 1), s)}
    return FakeQuantLinear(w, None, scheme, params, learn_scales=learn,
                           lsq_grad_scale=lsq_grad_scale)


def test_ste_and_lsq_gradients_by_hand():
    # w/s = [1.2, -4.8, 11.6, 0.2] → round [1, -5, 12, 0]; codes +8 → [9, 3, 20→15, 8]
    w = torch.tensor([[0.3, -1.2, 2.9, 0.05]])
    fq = _layer(w)
    w_hat, q = fq.fake_weight()
    assert q.flatten().tolist() == [9, 3, 15, 8]
    assert w_hat.tolist() == [[0.25, -1.25, 1.75, 0.0]]
    w_hat.sum().backward()
    # STE: gradient 1 where the code is in range, 0 where clamped
    assert fq.weight.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]
    # LSQ: Σ in range (q − z − w/s) + Σ clamped (q − z) = (−0.2 −0.2 −0.2) + 7
    assert fq.scales.grad.item() == pytest.approx(6.4, abs=1e-5)


def test_lsq_gradient_asymmetric_with_integer_zero():
    # scale 0.5, zero 2: u = w/s + z = [2.6, -0.4, 9.0] → round [3, 0, 9→7 (3 bits)]
    scheme = QuantScheme.parse("w3-channel-asym-fp32")
    w = torch.tensor([[0.3, -1.2, 3.5]])
    fq = FakeQuantLinear(w, None, scheme, {"scales": torch.tensor([[[0.5]]]),
                                           "zeros": torch.tensor([[[2.0]]])},
                         lsq_grad_scale=False)
    w_hat, q = fq.fake_weight()
    assert q.flatten().tolist() == [3, 0, 7]
    assert w_hat.tolist() == [[0.5, -1.0, 2.5]]
    (w_hat * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert fq.weight.grad.tolist() == [[1.0, 2.0, 0.0]]
    # (1 − 0.6)·1 + (−2 + 2.4)·2 + 5·3
    assert fq.scales.grad.item() == pytest.approx(0.4 + 0.8 + 15.0, abs=1e-5)


@pytest.mark.parametrize(("scheme", "g"), [
    ("w4-channel-fp32", 1 / math.sqrt(8 * 7)),          # 8 weights per scale, Qp = 2^3 − 1
    ("w3g4-asym-fp32", 1 / math.sqrt(4 * 7)),           # groups of 4, Qp = 2^3 − 1 (asym)
    ("w4g4", 1 / math.sqrt(4 * 7)),                     # fp16 scales: through stored_scale
])
def test_lsq_gradient_scale_multiplies_only_the_scale_gradient(scheme, g):
    torch.manual_seed(0)
    w, x = torch.randn(3, 8), torch.randn(5, 8)
    fmt = QuantScheme.parse(scheme)
    from edgequant.formats.base import get_format, group

    params = get_format("int").params(group(w, fmt), fmt)
    out = {}
    for on in (False, True):
        fq = FakeQuantLinear(w, None, fmt, params, lsq_grad_scale=on)
        y = fq(x)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        out[on] = (y.detach(), fq.scales.grad.clone(), fq.weight.grad.clone(), fq.grad_factor)
    assert out[True][3] == g and out[False][3] == 1.0
    assert torch.equal(out[True][0], out[False][0])          # forward bit-identical
    assert torch.equal(out[True][2], out[False][2])          # the weights' gradient untouched
    assert torch.equal(out[True][1], out[False][1] * g)      # the scales': exactly × g
    assert not torch.equal(out[True][1], out[False][1])


def test_lsq_gradient_scale_reaches_prepared_layers(tiny_llama):
    module = copy.deepcopy(tiny_llama)
    name = "model.layers.0.mlp.down_proj"
    on = prepare(module, {name: QuantScheme.parse("w4g32")})[name]
    assert on.grad_factor == 1 / math.sqrt(32 * 7)
    module = copy.deepcopy(tiny_llama)
    off = prepare(module, {name: QuantScheme.parse("w4g32")}, lsq_grad_scale=False,
                  low_rank=4)[name]
    assert isinstance(off, LRQATLinear) and off.grad_factor == 1.0


def test_scales_train_at_storage_precision():
    fq = _layer(torch.randn(3, 8), scheme="w4-channel", s=0.1)   # fp16 scales
    with torch.no_grad():
        fq.scales.fill_(0.1000123)
    qt = fq.to_quantized()
    assert torch.equal(qt.dequantize(), fq.fake_weight()[0])


def test_rtn_init_reproduces_rtn_codes(tiny_llama):
    lin = tiny_llama.model.layers[0].mlp.down_proj
    fq = FakeQuantLinear.from_layer(lin, QuantScheme.parse("w4g32"))
    ref = eq.formats.quantize_tensor(lin.weight, "w4g32")
    got = fq.to_quantized()
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.stored["scales"],
                                                             ref.stored["scales"])


@pytest.mark.parametrize("scheme", ["w4g32", "w3g32-asym", "w4g32-asym-fz"])
@pytest.mark.parametrize("low_rank", [None, 4])
def test_convert_codes_and_logits_equal_the_fake_quantized_model(tiny_llama, tmp_path, scheme,
                                                                 low_rank):
    m = copy.deepcopy(tiny_llama)
    recipe = Recipe(scheme=scheme, keep_dtype="float32")
    names = [n for n, x in m.named_modules() if isinstance(x, nn.Linear) and "layers" in n]
    layers = prepare(m, {n: QuantScheme.parse(scheme) for n in names}, low_rank=low_rank)
    with torch.no_grad():  # as if trained: move weights, scales (and the low-rank update)
        for fq in layers.values():
            fq.scales.mul_(1.07)
            if isinstance(fq, LRQATLinear):
                fq.lora_B.normal_(0, 0.05)
            else:
                fq.weight.add_(0.01 * torch.randn_like(fq.weight))
    ids = torch.randint(0, 128, (2, 12))
    fake = m(ids).logits
    expected_codes = {n: fq.fake_weight()[1] for n, fq in layers.items()}
    records = convert(m, "qat")
    assert set(records) == set(names)
    for n in names:
        ql = m.get_submodule(n)
        assert isinstance(ql, QuantLinear)
        from edgequant.formats.base import group
        assert torch.equal(group(ql.quantized().unpacked_codes(), ql.scheme),
                           expected_codes[n])
    assert torch.equal(m(ids).logits, fake)
    # the ordinary artifact: saved, reloaded, same logits
    from transformers import AutoTokenizer  # noqa: F401  (a tokenizer is needed to save)
    model = Model(m, _Tok(), {"name": "tiny"}, recipe, records)
    model.save(tmp_path / "a")
    back = eq.load(tmp_path / "a")
    assert torch.equal(back.module(ids).logits, fake)


class _Tok:
    """The least a tokenizer must do for an artifact to be saved and reloaded."""

    def save_pretrained(self, path):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)


def test_qat_refuses_non_integer_schemes():
    with pytest.raises(SchemeError, match="qlora"):
        FakeQuantLinear.from_layer(nn.Linear(64, 8), QuantScheme.parse("nf4"))


def test_from_quantized_layer_starts_at_its_codes(tiny_llama):
    q = eq.quantize(Model(copy.deepcopy(tiny_llama), None, {}), "rtn", "w4g32",
                    keep_dtype="float32")
    name = "model.layers.1.self_attn.o_proj"
    ql = q.module.get_submodule(name)
    fq = FakeQuantLinear.from_layer(ql)
    assert torch.equal(fq.to_quantized().codes, ql.quantized().codes)
    assert torch.equal(fq.fake_weight()[0], ql.dequantized_weight())


@pytest.mark.parametrize("scheme", ["w4g32", "w3g32-asym"])
def test_latent_init_keeps_codes_and_the_float_weight_inside_its_cell(scheme):
    torch.manual_seed(0)
    w = torch.randn(16, 96) * 0.05
    qt = eq.formats.quantize_tensor(w, scheme)
    # GPTQ-like: some codes differ from rounding the float weight (error compensation)
    codes = qt.unpacked_codes().clone()
    flip = torch.rand(codes.shape) < 0.2
    codes[flip] = (codes[flip].int() + 1).clamp(max=(1 << qt.scheme.bits) - 1).to(codes.dtype)
    from edgequant.formats.base import group, ungroup
    from edgequant.formats.tensor import QuantizedTensor
    moved = QuantizedTensor.from_codes(group(codes, qt.scheme), qt.params(), qt.scheme, qt.shape)
    for base in (qt, moved):
        fq = FakeQuantLinear.from_layer(QuantLinear(base, None), float_weight=w)
        assert torch.equal(fq.to_quantized().unpacked_codes(), base.unpacked_codes())
        latent = fq.weight.detach()
        # where rounding the float weight gives the stored code it is kept (up to the 1% cell
        # margin); elsewhere it sits at the stored code's cell edge nearest the float weight
        step = ungroup(group(torch.ones_like(w), qt.scheme) * qt.params()["scales"],
                       tuple(w.shape))
        err = (latent - w).abs() / step
        same = base.unpacked_codes() == qt.unpacked_codes()
        assert float(err[same].max()) <= 0.0101
        if (~same).any():
            assert float(err[~same].min()) > 0.0 and float(err[~same].max()) <= 1.0101
    fq0 = FakeQuantLinear.from_layer(QuantLinear(qt, None))
    assert torch.equal(fq0.weight.detach(), qt.dequantize())   # no float weight: the grid


def test_scales_learn_at_their_own_rate(tiny_llama):
    from edgequant.finetuning.loop import LR_MULT, _param_groups

    q = eq.quantize(Model(copy.deepcopy(tiny_llama), None, {}), "rtn", "w4g32",
                    keep_dtype="float32")
    names = [n for n, m in q.module.named_modules() if isinstance(m, QuantLinear)]
    prepare(q.module, dict.fromkeys(names), scale_lr_mult=0.1)
    params = {n: p for n, p in q.module.named_parameters() if p.requires_grad}
    groups = {g[LR_MULT]: g["params"] for g in _param_groups(params)}
    assert set(groups) == {0.1, 1.0}
    assert {id(p) for p in groups[0.1]} == {id(p) for n, p in params.items()
                                            if n.endswith(".scales")}
