"""use_kernels / kernel_plan / describe on a model: explicit choices, recorded reasons, and
what happens to saving and the dequantization cache."""

import copy

import pytest
import torch
from torch import nn

from edgequant.formats import quantize_tensor
from edgequant.kernels import KernelError, describe, get_kernel, kernel_plan, use_kernels
from edgequant.kernels.int4_cpu import kernel_available
from edgequant.nn.quant_linear import QuantLinear, dequantized_weights_cached
from edgequant.nn.w8a8 import W8A8Linear

needs_int4 = pytest.mark.skipif(not kernel_available(), reason="no int4 CPU kernel")

N_NOT_64 = "int4_cpu: 32 output rows are not a multiple of 64"
THREE_BIT = "auto: no kernel but the reference takes w3g64"


def _model() -> nn.Sequential:
    """128 → 128 (w4, int4_cpu), → 32 (w4, N off the 64-row grid), → 128 (3-bit), → 64
    (w8a8, integer matmul), → 128 (w4 again)."""
    gen = torch.Generator().manual_seed(0)

    def q(n, k, scheme):
        return quantize_tensor(torch.randn(n, k, generator=gen), scheme)
    return nn.Sequential(
        QuantLinear(q(128, 128, "w4g64"), torch.randn(128, generator=gen)),
        QuantLinear(q(32, 128, "w4g64-asym")),
        QuantLinear(q(128, 32, "w3g64")),
        W8A8Linear(q(64, 128, "w8a8")),
        QuantLinear(q(128, 64, "w4g64")),
    )


@needs_int4
def test_auto_plan_counts_kernels_and_records_each_fallback():
    model = _model()
    assert kernel_plan(model).counts() == {"reference": 5}  # layers start on the reference
    plan = use_kernels(model, torch.bfloat16, "cpu")
    assert [e.kernel for e in plan.layers] == ["int4_cpu", "reference", "reference",
                                               "w8a8_int_mm", "int4_cpu"]
    assert plan.counts() == {"int4_cpu": 2, "reference": 2, "w8a8_int_mm": 1}
    assert [e.reason for e in plan.layers] == [None, N_NOT_64, THREE_BIT, None, None]
    assert plan.fallbacks() == {N_NOT_64: 1, THREE_BIT: 1}
    assert plan.summary() == {"kernels": plan.counts(), "kernel_fallbacks": plan.fallbacks(),
                              "kernel_summaries": {k: get_kernel(k).summary
                                                   for k in plan.counts()}}
    assert kernel_plan(model).layers == plan.layers  # read back off the layers
    assert "int4_cpu ×2" in str(plan) and N_NOT_64 in str(plan)
    assert plan.layers[1].to_dict() == {"layer": "1", "scheme": "w4g64-asym",
                                        "shape": [32, 128], "kernel": "reference",
                                        "reason": N_NOT_64}


@needs_int4
def test_describe_answers_without_prepacking():
    model = _model()
    rows = describe(model, "bfloat16", "cpu")
    assert [r["kernel"] for r in rows] == ["int4_cpu", "reference", "reference", "w8a8_int_mm",
                                           "int4_cpu"]
    assert rows[1] == {"layer": "1", "scheme": "w4g64-asym", "shape": [32, 128],
                       "key": "w4g64 bfloat16 cpu", "kernel": "reference", "reason": N_NOT_64}
    assert kernel_plan(model).counts() == {"reference": 5}
    assert {r["kernel"] for r in describe(model, torch.bfloat16, policy="reference")} \
        == {"reference"}
    fp32 = describe(model, torch.float32)
    assert fp32[0]["reason"] == "int4_cpu: multiplies bfloat16 activations, not float32"
    # from manifest records alone (what `edgequant info` reads)
    records = {str(i): {"scheme": m.scheme.to_dict(), "shape": [m.out_features, m.in_features],
                        "act_order": False} for i, m in enumerate(model)}
    assert describe(records, "bfloat16") == rows
    assert describe({"x": {"scheme": "w4g64", "shape": [128, 256]}}, "bfloat16")[0]["kernel"] \
        == "int4_cpu"


def test_policy_reference_keeps_every_layer_as_it_was():
    model = _model()
    x = torch.randn(3, 128)
    want = model(x)
    plan = use_kernels(model, torch.float32, "cpu", policy="reference")
    assert plan.counts() == {"reference": 5} and plan.fallbacks() == {}
    assert torch.equal(model(x), want)
    assert all(not m.prepacked for m in model)


def test_bad_policy_and_dtype_are_clear_errors():
    with pytest.raises(KernelError, match="valid: auto, int4_cpu, w8a8_int_mm, reference"):
        use_kernels(_model(), torch.float32, policy="fused")
    with pytest.raises(KernelError, match="not a torch floating dtype"):
        describe(_model(), "int8")


def test_a_layout_that_unpacks_saves_exactly_what_the_artifact_holds():
    model = _model()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 128)
    y = model(x)
    use_kernels(model, torch.float32, "cpu", policy="w8a8_int_mm")
    layer = model[3]
    assert layer.kernel.name == "w8a8_int_mm" and layer.prepacked
    assert "qweight" not in dict(layer.named_buffers())  # one copy of the codes
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert torch.equal(model(x), y)  # bit-exact with the reference's integer product
    assert torch.equal(layer.dequantized_weight(), _model()[3].dequantized_weight())
    with pytest.raises(KernelError, match="fresh model"):
        model.load_state_dict(want)
    # and back to the reference through the exact unpacking
    use_kernels(model, torch.float32, "cpu", policy="reference")
    assert not layer.prepacked and torch.equal(layer.qweight, want["3.qweight"])


@needs_int4
def test_deepcopy_keeps_the_plan_and_the_cache_still_works_on_reference_layers(monkeypatch):
    model = _model()
    use_kernels(model, torch.bfloat16, "cpu")
    twin = copy.deepcopy(model)
    assert kernel_plan(twin).layers == kernel_plan(model).layers
    assert twin[0].kernel is model[0].kernel
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert torch.equal(twin(x), model(x))
    want = model(x)
    with dequantized_weights_cached(model):
        assert torch.equal(model(x), want) and torch.equal(model(x), want)
        assert set(model[2]._cache) == {torch.bfloat16}   # reference layers cache
        assert model[0]._cache == {}                      # int4_cpu needs none


def test_a_model_object_is_accepted():
    class Holder:
        module = _model()
    plan = use_kernels(Holder(), torch.float32)
    assert plan.counts() == {"reference": 4, "w8a8_int_mm": 1}


def test_open_torch_applies_the_kernels_option_and_records_it(tmp_path):
    import edgequant as eq
    from tests.eval._tiny import tiny_model

    art = eq.quantize(tiny_model(), "rtn", scheme="w4g32").save(tmp_path / "art")
    with eq.open(str(art), dtype="bfloat16", kernels="reference") as r:
        assert r.runtime["kernels"] == {"reference": 14} and r.runtime["kernel_fallbacks"] == {}
    if kernel_available():
        with eq.open(str(art), dtype="bfloat16") as r:  # auto, by default
            assert r.runtime["kernels"] == {"int4_cpu": 10, "reference": 4}
    with pytest.raises(KernelError, match="unknown kernel policy 'int3'"):
        eq.open(str(art), kernels="int3")
    model = eq.load(str(art))
    with eq.open(model) as r:  # a given model keeps its layers' kernels unless asked
        assert r.runtime["kernels"] == {"reference": 14}
    with eq.open(model, kernels="w8a8_int_mm") as r:
        assert r.runtime["kernels"] == {"reference": 14}
        assert set(r.runtime["kernel_fallbacks"]) == {
            "w8a8_int_mm: scheme w4g32 quantizes no activations; W8A8 layers need an "
            "activation scheme such as w8a8 or w8a8-static"}


def test_a_prepacked_w8a8_model_measures_and_saves_as_before(tmp_path):
    """Size accounting and the saved artifact read the artifact's tensors, which the
    ``w8a8_int_mm`` layout gives back exactly."""
    import edgequant as eq
    from tests.eval._tiny import tiny_model

    q = eq.quantize(tiny_model(), "dynamic", scheme="w8a8")
    before = q.summary()
    ids = torch.randint(0, 200, (1, 9))
    want = q.module(input_ids=ids).logits
    plan = use_kernels(q, torch.float32, "cpu")
    assert plan.counts() == {"w8a8_int_mm": 14}
    assert q.summary() == before
    assert torch.equal(q.module(input_ids=ids).logits, want)
    back = eq.load(str(q.save(tmp_path / "art")))
    assert kernel_plan(back).counts() == {"reference": 14}
    assert torch.equal(back.module(input_ids=ids).logits, want)
