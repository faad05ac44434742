"""SmoothQuant: the migration formula, exact folding, and a W8A8 gain on outlier channels."""

import pytest
import torch

import edgequant as eq
from edgequant.errors import SchemeError
from edgequant.methods.scaling import fold_groups
from edgequant.methods.smoothquant import SmoothQuantConfig, smooth_scales
from edgequant.models.architectures import block_list, spec_for
from edgequant.models.artifact import load_artifact
from edgequant.nn.w8a8 import W8A8Linear

from .outliers import inject_outliers, one_thread, output_error, tokens, wrap  # noqa: F401


def test_smooth_scales_formula():
    x = torch.tensor([4.0, 1.0, 100.0, 0.0])
    w = torch.tensor([1.0, 4.0, 0.25, 2.0])
    s = smooth_scales(x, w, 0.5)
    torch.testing.assert_close(s[:3], torch.tensor([2.0, 0.5, 20.0]))
    assert s[3] > 0  # a dead channel keeps a positive scale
    torch.testing.assert_close(smooth_scales(x, w, 1.0)[:3], x[:3])
    torch.testing.assert_close(smooth_scales(x, w, 0.0), 1 / w)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_smoothing_balances_norm_fed_inputs(fixture, request):
    """After smoothing (α = 0.5), max|X_j| = max|W_j| for the q/k/v input channels."""
    module = inject_outliers(request.getfixturevalue(fixture))
    model = wrap(module)
    q = eq.quantize(model, "smoothquant", scheme="w8a8", calib=tokens(4), keep_dtype="float32")
    # block 0's inputs do not depend on quantization: replay them through the smoothed norm
    seen = []
    h = module.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    model.logits(tokens(4))
    h.remove()
    x_max = torch.cat(seen).abs().amax(0)
    attn = q.module.model.layers[0].self_attn
    w_max = torch.cat([attn.q_proj.dequantized_weight(), attn.k_proj.dequantized_weight(),
                       attn.v_proj.dequantized_weight()]).abs().amax(0)
    s = smooth_scales(x_max, torch.cat([m.weight for m in (
        module.model.layers[0].self_attn.q_proj, module.model.layers[0].self_attn.k_proj,
        module.model.layers[0].self_attn.v_proj)]).abs().amax(0), 0.5)
    torch.testing.assert_close((x_max / s), w_max, rtol=0.02, atol=1e-3)
    assert (x_max / s).max() / (x_max / s).median() < x_max.max() / x_max.median() / 3


NORM_FED_ONLY = (("*.o_proj", "keep"), ("*.down_proj", "keep"))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("scheme,plain", [("w8a8", "dynamic"), ("w8a8-static", "static")])
def test_beats_plain_w8a8_on_outliers(fixture, scheme, plain, request):
    """Clearly better on the layers it smooths (q/k/v, gate/up), and better overall even
    though the unsmoothed o/down inputs dominate the static per-tensor error."""
    model = wrap(inject_outliers(request.getfixturevalue(fixture)))
    calib, held_out = tokens(8), tokens(4, seed=7)

    def error(method, overrides=()):
        return output_error(model, eq.quantize(model, method, scheme=scheme, calib=calib,
                                               overrides=overrides), held_out)

    sq, base = error("smoothquant", NORM_FED_ONLY), error(plain, NORM_FED_ONLY)
    assert sq < 0.5 * base, (sq, base)
    sq, base = error("smoothquant"), error(plain)
    assert sq < {"dynamic": 0.7}.get(plain, 0.95) * base, (sq, base)


def test_only_norm_fed_groups_are_smoothed(tiny_llama):
    spec = spec_for(tiny_llama)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    q = eq.quantize(wrap(inject_outliers(tiny_llama)), "smoothquant", scheme="w8a8",
                    calib=tokens(2), keep_dtype="float32")
    assert [g.roles for g in fold_groups(block_list(tiny_llama)[0], spec,
                                         only_norm_sources=True)] == [("q", "k", "v"),
                                                                        ("gate", "up")]
    layer = q.module.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight,
                           tiny_llama.model.layers[0].input_layernorm.weight)
    # v → o and up → down are left alone: o and down see the original weights (to int8)
    w = before["model.layers.0.self_attn.o_proj.weight"]
    torch.testing.assert_close(layer.self_attn.o_proj.dequantized_weight(), w,
                               atol=w.abs().max() / 127, rtol=0)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_artifact_round_trip(tiny_gemma3, tmp_path, scheme):
    q = eq.quantize(wrap(inject_outliers(tiny_gemma3)), "smoothquant", scheme=scheme,
                    calib=tokens(4), alpha=0.6)
    assert isinstance(q.module.model.layers[0].mlp.up_proj, W8A8Linear)
    q.save(tmp_path / "sq")
    back = load_artifact(tmp_path / "sq")
    assert back.recipe.transforms == (SmoothQuantConfig(alpha=0.6),)
    ids = tokens(2, seed=3)
    assert torch.equal(back.logits(ids), q.logits(ids))


def test_bad_options_and_schemes(tiny_llama):
    with pytest.raises(SchemeError, match="alpha"):
        eq.quantize(wrap(tiny_llama), "smoothquant", scheme="w8a8", calib=tokens(2), alpha=1.5)
    with pytest.raises(SchemeError, match="activation"):
        eq.quantize(wrap(tiny_llama), "smoothquant", scheme="w4g32", calib=tokens(2))
