"""The dynamic and static int8 PTQ flavours end to end on tiny models."""

import pytest
import torch

import edgequant as eq
from edgequant.errors import SchemeError
from edgequant.models.artifact import load_artifact
from edgequant.nn.w8a8 import W8A8Linear

from .outliers import one_thread, tokens, wrap  # noqa: F401


def test_dynamic_needs_no_data_and_uses_w8a8_layers(tiny_llama):
    assert not eq.Recipe.parse("dynamic", "w8a8").needs_calibration
    assert eq.Recipe.parse("static", "w8a8-static").needs_calibration
    model = wrap(tiny_llama)
    q = eq.quantize(model, "dynamic", scheme="w8a8")
    layers = [m for m in q.module.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 14 and all(m.act_scale is None for m in layers)
    assert all(r["module"] == "w8a8_linear" for r in q.layers.values())
    ids = tokens(2)
    ref, out = model.logits(ids), q.logits(ids)
    assert (out - ref).norm() / ref.norm() < 0.02


def test_static_ranges_are_the_calibration_max(tiny_gemma3):
    model = wrap(tiny_gemma3)
    calib = tokens(4)
    seen = []
    h = tiny_gemma3.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.append(a[0].abs().max()))
    model.logits(calib)  # block 0's inputs do not depend on quantized weights
    h.remove()
    q = eq.quantize(model, "static", scheme="w8a8-static", calib=calib, keep_dtype="float32")
    layer = q.module.model.layers[0].self_attn.q_proj
    assert isinstance(layer, W8A8Linear)
    torch.testing.assert_close(layer.act_scale.data, (seen[0] / 127).reshape(1))
    ids = tokens(2, seed=5)
    ref, out = model.logits(ids), q.logits(ids)
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("observer,percentile", [("percentile", 99.0), ("histogram", 99.0),
                                                  ("entropy", 99.99), ("mse", 99.99)])
def test_static_observer_choice_clips_below_the_max(tiny_gemma3, observer, percentile):
    """A clipping observer's per-tensor range is within min-max's (strictly below for the
    percentile and entropy choices); the percentile ones land on the percentile of the
    inputs they saw."""
    model = wrap(tiny_gemma3)
    calib = tokens(4)
    seen = []
    h = tiny_gemma3.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach().abs().flatten()))
    model.logits(calib)
    h.remove()
    x = torch.cat(seen)
    q = eq.quantize(model, "static", scheme="w8a8-static", calib=calib, keep_dtype="float32",
                    observer=observer, percentile=percentile)
    scale = q.module.model.layers[0].self_attn.q_proj.act_scale.data
    assert 0 < scale.item() * 127 <= x.max().item() * (1 + 1e-6)
    if observer != "mse":
        assert scale.item() * 127 < 0.99 * x.max().item()
    if observer in ("percentile", "histogram"):
        want = torch.quantile(x.double(), percentile / 100).item()
        assert scale.item() * 127 == pytest.approx(want, rel=0.05)


def test_static_unknown_observer_is_refused(tiny_llama):
    with pytest.raises(SchemeError, match="unknown observer 'p99'.*minmax"):
        eq.quantize(wrap(tiny_llama), "static", scheme="w8a8-static", calib=tokens(4),
                    observer="p99")


def test_static_artifact_round_trip(tiny_llama, tmp_path):
    q = eq.quantize(wrap(tiny_llama), "static", scheme="w8a8-static", calib=tokens(4))
    act = q.module.model.layers[1].mlp.down_proj.act_scale.data
    assert torch.equal(act, act.half().float())  # rounded to the keep dtype in memory
    q.save(tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert isinstance(back.module.model.layers[1].mlp.down_proj, W8A8Linear)
    ids = tokens(2, seed=9)
    assert torch.equal(back.logits(ids), q.logits(ids))


@pytest.mark.parametrize("method,scheme,error", [
    ("dynamic", "w8a8-static", SchemeError), ("static", "w8a8", SchemeError),
    ("dynamic", "w4g32", SchemeError), ("static", "w4g32", SchemeError)])
def test_mismatches_are_refused(tiny_llama, method, scheme, error):
    with pytest.raises(error):
        eq.quantize(wrap(tiny_llama), method, scheme=scheme, calib=tokens(2))
