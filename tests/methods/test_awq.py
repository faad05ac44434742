"""AWQ: scale search, clip search, and a lower output error than RTN where outliers are."""

import pytest
import torch

import edgequant as eq
from edgequant.data.calibration import Calibration
from edgequant.errors import SchemeError
from edgequant.formats import QuantScheme
from edgequant.methods.awq import AWQConfig, candidate_scales, search_clip, search_scale
from edgequant.methods.scaling import fake_quantize, fold_groups
from edgequant.models.architectures import block_list, spec_for
from edgequant.models.artifact import load_artifact
from edgequant.nn.quant_linear import QuantLinear
from edgequant.pipeline import BlockContext
from edgequant.statistics import capture_block_inputs

from .outliers import inject_outliers, one_thread, output_error, tokens, wrap  # noqa: F401


def test_candidate_scales():
    x = torch.tensor([0.5, 2.0, 8.0])
    assert torch.equal(candidate_scales(x, None, 0.0), torch.ones(3))
    s = candidate_scales(x, None, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    torch.testing.assert_close(s / s[0], (x / x[0]).sqrt())
    w = torch.tensor([1.0, 0.5, 0.25])
    duo = candidate_scales(x, w, 0.5)
    expected = x.sqrt() / (w.sqrt() + 1e-4)
    torch.testing.assert_close(duo / duo[0], expected / expected[0])


def _context(module, scheme):
    spec = spec_for(module)
    blocks = block_list(module, spec)
    inputs, kwargs = capture_block_inputs(module, blocks, list(tokens(4).split(2)))
    schemes = {r.path: QuantScheme.parse(scheme) for r in spec.linears}
    calib = Calibration(tokens(4), compute_dtype="float32")
    return BlockContext(blocks[0], 0, f"{spec.blocks}.0.", spec, inputs, kwargs[0], calib,
                        schemes, AWQConfig())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_scale_search_never_loses_to_rtn(fixture, request):
    module = inject_outliers(request.getfixturevalue(fixture))
    ctx = _context(module, "w3g32")
    for g in fold_groups(ctx.block, ctx.spec):
        before = [lin.weight.clone() for lin in g.linears]
        s, base, best = search_scale(ctx.block, g, ctx, ctx.config)
        assert best <= base and s.shape == (g.n_source,) and (s > 0).all()
        _, duo_base, duo_best = search_scale(ctx.block, g, ctx, AWQConfig(duo_scaling=True))
        assert duo_base == base and duo_best <= base  # s = 1 (plain RTN) is a candidate
        assert all(torch.equal(a, lin.weight) for a, lin in zip(before, g.linears, strict=True))
        if g.roles == ("q", "k", "v"):  # the outlier channels get the largest scales
            assert set(s.topk(3).indices.tolist()) == {3, 17, 40}
            assert best < 0.9 * base


def test_search_on_fewer_windows(tiny_llama):
    ctx = _context(inject_outliers(tiny_llama), "w3g32")  # 2 batches of 2 windows
    g = fold_groups(ctx.block, ctx.spec)[2]
    full = search_scale(ctx.block, g, ctx, ctx.config)
    part = search_scale(ctx.block, g, ctx, AWQConfig(search_samples=2))
    assert part[2] <= part[1] and part[1] != full[1]  # scored on the first batch only
    assert part[0].argmax() == full[0].argmax()  # same activation statistics


@pytest.mark.parametrize("scheme", ["w3g32", "w4", "w3g24-asym", "w4-tensor"])
def test_clip_search_lowers_output_error(scheme):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 96, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 8  # rare large weights: clipping pays
    x = torch.randn(256, 96, generator=gen)
    sch = QuantScheme.parse(scheme)
    clipped = search_clip(w, x, sch, AWQConfig())
    assert clipped.abs().max() <= w.abs().max() and not torch.equal(clipped, w)
    ref = x @ w.T

    def err(v):
        return (x @ fake_quantize(v, sch).T - ref).pow(2).mean()
    assert err(clipped) < err(w)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("options", [{}, {"duo_scaling": True}])
def test_beats_rtn_on_outliers(fixture, options, request):
    model = wrap(inject_outliers(request.getfixturevalue(fixture)))
    calib, held_out = tokens(8), tokens(4, seed=7)
    rtn = output_error(model, eq.quantize(model, "rtn", scheme="w3g32"), held_out)
    awq = output_error(model, eq.quantize(model, "awq", scheme="w3g32", calib=calib,
                                          **options), held_out)
    assert awq < 0.7 * rtn, (awq, rtn)


def test_function_is_kept_before_rounding(tiny_llama):
    """With the clip search off and 8-bit weights, AWQ's folding leaves the model's outputs
    as they were up to 8-bit rounding (a wrong fold would not), also where a layer of a
    group is kept in float. Float32 forwards: at 8 bits, bf16 rounding is as large as the
    differences the scale search ranks."""
    model = wrap(inject_outliers(tiny_llama))
    ids = tokens(2, seed=4)
    calib = Calibration(tokens(4), compute_dtype="float32")
    q = eq.quantize(model, "awq", scheme="w8", calib=calib, clip=False,
                    keep_dtype="float32", overrides=(("*.k_proj", "keep"),))
    k = q.module.model.layers[0].self_attn.k_proj
    assert type(k) is torch.nn.Linear  # kept in float, yet scaled with q and v
    assert not torch.equal(k.weight, tiny_llama.model.layers[0].self_attn.k_proj.weight)
    ref = model.logits(ids)
    assert (q.logits(ids) - ref).norm() / ref.norm() < 0.01


def test_artifact_round_trip(tiny_gemma3, tmp_path):
    q = eq.quantize(wrap(inject_outliers(tiny_gemma3)), "awq", scheme="w4g32", calib=tokens(4),
                    n_grid=5)
    assert type(q.module.model.layers[1].self_attn.o_proj) is QuantLinear
    q.save(tmp_path / "awq")
    back = load_artifact(tmp_path / "awq")
    assert back.recipe.name == "awq" and back.recipe.transforms == (AWQConfig(n_grid=5),)
    ids = tokens(2, seed=3)
    assert torch.equal(back.logits(ids), q.logits(ids))


def test_refuses_activation_schemes_and_bad_options(tiny_llama):
    with pytest.raises(SchemeError, match="weights only"):
        eq.quantize(wrap(tiny_llama), "awq", scheme="w8a8", calib=tokens(2))
    with pytest.raises(SchemeError, match="max_shrink"):
        eq.quantize(wrap(tiny_llama), "awq", scheme="w4g32", calib=tokens(2), max_shrink=1.0)


# --------------------------------------------------------------------- the real model
RIVER_TEXT = (
    "The river that runs through the old market town rises in a bog high on the moor, where the "
    "peat holds rain like a sponge and lets it go slowly through the dry months. For most of "
    "its length it is a modest stream, narrow enough in summer for a child to jump across at "
    "the shallow places, but after a week of autumn storms it fills its valley from side to "
    "side and carries whole trees down to the sea. The people who built the first mills along "
    "its banks understood this double nature well. They set their wheels on short channels cut "
    "beside the main flow, with sluice gates that could be closed when the water rose, and they "
    "placed their houses on the higher ground behind, where the floods could reach the yard but "
    "rarely the kitchen.\n\n"
    "By the middle of the eighteenth century there were eleven mills within a few miles of the "
    "town. Some ground corn for bread, some crushed bark for the tanneries, and two of them "
    "drove the hammers of a small forge that made spades, hinges and the iron tyres for cart "
    "wheels. Each mill had a pond above it, and each pond had a keeper who argued with the "
    "keeper of the next pond about how much water he was entitled to hold back. The quarrels "
    "were settled, more or less, by an agreement written down in 1761, which fixed the height "
    "of every weir to the inch and named the days on which the gates had to stand open so that "
    "the barges below the town could float over the gravel bars.\n\n"
    "Most of the mills have gone now. The last one to work for a living stopped in the winter "
    "of 1952, when its owner died and his sons decided that there was more money in driving "
    "lorries than in grinding animal feed. The building stood empty for thirty years, its roof "
    "slowly falling in, until a group of volunteers bought it for a small sum and spent the "
    "better part of a decade putting it right. They found the old millstones under a heap of "
    "rubble, cracked but complete, and a carpenter from the next valley made a new wheel of oak "
    "to the pattern of the old one, working from measurements taken from the marks it had left "
    "on the walls of the wheel pit.\n\n"
    "Visitors who come to the mill today can watch the wheel turn and hear the steady knock of "
    "the gears, which sounds a little like a large clock that has been left running in an empty "
    "house. On the first Saturday of each month the volunteers grind a few sacks of wheat and "
    "sell the flour in paper bags at the door. It is coarse and brown and makes a heavy loaf, "
    "but the people who buy it tend to come back, and some of them have been coming for years. "
    "The children are usually more interested in the eels that live in the tail race, long and "
    "dark and nearly invisible until one of them moves.\n\n"
    "The river itself has changed less than the town around it. Its course was straightened in "
    "a few places when the railway came through, and a concrete wall now protects the houses on "
    "the low side of the bridge, but the pools and riffles are much where the old maps put "
    "them. Trout still hold in the shade of the alders, and in a good year salmon make their "
    "way up past the weirs, climbing the fish passes that were added when the law began to "
    "require them. A heron stands at the edge of the mill pond most mornings, as still as a "
    "post, and the kingfishers that nest in the bank below the churchyard can be seen by anyone "
    "patient enough to wait for the flash of blue.\n\n"
    "Not everyone welcomes the floods, of course. Twice in the last twenty years the water has "
    "come over the wall and into the shops on the main street, leaving a line of brown silt on "
    "the plaster and a smell that lingered for months. After the second flood the council "
    "commissioned a study, and the engineers who wrote it suggested that the best defence might "
    "lie not in the town at all but on the moor, where drains dug a century ago to improve the "
    "grazing now send the rain off the hills far faster than the peat would on its own. "
    "Blocking those drains, they argued, would hold the water back for a few precious hours and "
    "take the top off the worst floods. Farmers were doubtful at first, but a trial on two "
    "small catchments has shown encouraging results, and more of the old ditches are being "
    "filled each year."
)


@pytest.fixture(scope="module")
def smollm2_two_blocks(smollm2_dir):
    """SmolLM2-135M cut to its first two blocks, and (calibration, held-out) windows of 32
    tokens of real English (16 to calibrate on, 12 held out)."""
    model = eq.load(smollm2_dir)
    model.module.model.layers = model.module.model.layers[:2]
    model.module.config.num_hidden_layers = 2
    ids = torch.tensor(model.tokenizer(RIVER_TEXT)["input_ids"])
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    assert windows.shape[0] >= 26
    return model, windows[:16], windows[16:]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w3g128", "w4"])
def test_real_model_layer_output_error_below_rtn(smollm2_two_blocks, scheme):
    model, calib, held_out = smollm2_two_blocks
    rtn = output_error(model, eq.quantize(model, "rtn", scheme=scheme), held_out)
    awq = output_error(model, eq.quantize(model, "awq", scheme=scheme, calib=calib), held_out)
    print(f"{scheme}: awq {awq:.4g} rtn {rtn:.4g} ratio {awq / rtn:.3f}")
    assert awq < 0.85 * rtn, (awq, rtn)
