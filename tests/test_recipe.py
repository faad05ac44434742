"""The recipe and the registries' contract: every quantizer and transform, each family of
schemes, quantize → save → load gives identical logits; every recipe survives JSON; bad
options are clear errors naming the valid ones."""

from __future__ import annotations

import json

import pytest
import torch

import edgequant as eq
from edgequant.errors import SchemeError
from edgequant.formats import QuantScheme
from edgequant.methods import list_quantizers, list_transforms
from edgequant.methods.gptq import GPTQConfig
from edgequant.methods.registry import get_step, make_config
from edgequant.models.model import Model
from edgequant.recipe import RECIPE_VERSION, Recipe

from .helpers import tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3, 64, 12, 7, 8]])

# A representative scheme of every family each quantizer accepts. A quantizer added to the
# registry without a row here fails test_every_step_is_in_the_contract.
FAMILIES: dict[str, tuple[str, ...]] = {
    "rtn": ("w4g32", "w3g24-asym", "w8", "w2-tensor", "nf4", "nf4-dq", "fp4", "fp4_e2m1g32",
            "fp8", "binary", "ternaryg32"),
    "gptq": ("w4g32", "w3g32-asym", "w8", "nf4", "fp4", "fp8", "w4g32-asym-fz"),
    "hqq": ("w4g32-asym", "w3g32-asym-fz", "w4g32"),
    "dynamic": ("w8a8",),
    "static": ("w8a8-static",),
}
# transform -> the quantizers it is checked in front of (and the scheme it runs with)
TRANSFORMS: dict[str, tuple[tuple[str, str], ...]] = {
    "awq": (("rtn", "w4g32-asym"), ("gptq", "w4g32-asym"), ("hqq", "w4g32-asym")),
    "smoothquant": (("dynamic", "w8a8"), ("static", "w8a8-static")),
}


def wrap(module) -> Model:
    return Model(module, tiny_tokenizer(module.config.vocab_size), {"name": "tiny"})


def calib() -> torch.Tensor:
    return torch.randint(4, 128, (4, 24), generator=torch.Generator().manual_seed(3))


def test_every_step_is_in_the_contract():
    """(Steps named test_* are probes that other test modules register.)"""
    assert {q for q in list_quantizers() if not q.startswith("test_")} == set(FAMILIES)
    assert set(list_transforms()) == set(TRANSFORMS)


def _roundtrip(module, recipe: Recipe, tmp_path) -> None:
    q = eq.quantize(wrap(module), recipe, calib=calib())
    q.save(tmp_path / "a")
    r = eq.load(tmp_path / "a")
    assert r.recipe == recipe
    assert torch.equal(q.logits(IDS), r.logits(IDS))


@pytest.mark.parametrize("quantizer,scheme",
                         [(q, s) for q, schemes in FAMILIES.items() for s in schemes])
def test_quantizer_save_load_identical_logits(tiny_llama, tmp_path, quantizer, scheme):
    options = {"static_groups": True} if quantizer == "gptq" and scheme == "nf4-dq" else {}
    _roundtrip(tiny_llama, Recipe.parse(quantizer, scheme, options), tmp_path)


@pytest.mark.parametrize("transform,quantizer,scheme",
                         [(t, q, s) for t, pairs in TRANSFORMS.items() for q, s in pairs])
def test_transform_composes_with_quantizer(tiny_llama, tmp_path, transform, quantizer, scheme):
    options = {"n_grid": 4} if transform == "awq" else {}
    recipe = Recipe.parse(f"{transform}+{quantizer}", scheme, options)
    assert recipe.transform_names == [transform] and recipe.quantizer_name == quantizer
    _roundtrip(tiny_llama, recipe, tmp_path)


def test_awq_then_gptq_differs_from_each_alone(tiny_llama):
    """The composition really runs both steps: its codes are neither AWQ's nor GPTQ's."""
    def codes(spec: str) -> torch.Tensor:
        q = eq.quantize(wrap(tiny_llama), spec, "w4g32-asym", calib=calib(),
                        **({"n_grid": 4} if "awq" in spec else {}))
        return q.module.model.layers[0].mlp.down_proj.qweight.clone()

    both, awq, gptq = codes("awq+gptq"), codes("awq"), codes("gptq")
    assert not torch.equal(both, awq) and not torch.equal(both, gptq)


RECIPES = [
    Recipe(),
    Recipe.parse("gptq", "w3g128-asym", {"act_order": True, "damp": 0.02}),
    Recipe.parse("awq+gptq", "w4g64-asym", {"duo_scaling": True, "gptq.static_groups": True},
                 formats=(("lm_head", "w8"), ("*.down_proj", "keep")), keep_dtype="bfloat16"),
    Recipe.parse("smoothquant", "w8a8-static", {"alpha": 0.7, "observer": "percentile"}),
    Recipe.parse("hqq", "w4g64-asym-fz", {"optimize_scale": False}),
    Recipe.parse("rtn", "w4g32", formats={"model.layers.0.*": "Q4_K", "lm_head": "q6_k"}),
    Recipe.parse("awq", "w4g128", {"clip_skip": "q,k,v"}),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_json_round_trip_is_identity(recipe):
    d = json.loads(json.dumps(recipe.to_dict()))
    assert d["version"] == RECIPE_VERSION
    assert Recipe.from_dict(d) == recipe


def test_names_and_defaults():
    assert Recipe.parse("awq", "w4g128").name == "awq"       # awq alone = awq then RTN
    assert Recipe.parse("awq+rtn", "w4g128").name == "awq"
    assert Recipe.parse("awq+gptq", "w4g128").name == "awq+gptq"
    assert Recipe.parse("sq", "w8a8").name == "smoothquant"
    assert Recipe.parse("sq", "w8a8-static").quantizer_name == "static"
    assert Recipe.parse("sq", "w8a8").quantizer_name == "dynamic"
    r = Recipe.parse("awq+gptq", "w4g64-asym", {"act_order": True, "n_grid": 4})
    assert r.quantizer == GPTQConfig(act_order=True) and r.transforms[0].n_grid == 4
    assert not Recipe.parse("rtn").needs_calibration and r.needs_calibration


def test_version_0_recipes_are_read():
    """What artifacts written before versioned recipes hold."""
    old = {"method": "awq", "scheme": QuantScheme.parse("w4g128").to_dict(),
           "overrides": [["lm_head", "w8"]], "keep_dtype": "float16",
           "method_options": {"n_grid": 5}}
    r = Recipe.from_dict(old)
    assert r.name == "awq" and r.transforms[0].n_grid == 5 and r.formats == (("lm_head", "w8"),)


@pytest.mark.parametrize("spec,options,match", [
    ("gptq", {"act_ordr": True}, r"no step .* option 'act_ordr'.*gptq\.act_order"),
    ("gptq", {"act_order": "yes"}, r"gptq option act_order: 'yes' is not bool"),
    ("gptq", {"damp": "x"}, r"damp: 'x' is not float"),
    ("rtn", {"damp": 0.1}, r"valid options: none"),
    ("awq+gptq", {"awq.damp": 0.1}, r"awq has no option 'damp'; valid options: .*n_grid"),
    ("awq+gptq", {"hqq.iters": 3}, r"has no step 'hqq'"),
    ("foo", {}, r"unknown method 'foo'; quantizers: .*gptq.*transforms: .*awq"),
    ("gptq+awq", {}, r"quantizer gptq must come last"),
    ("gptq+rtn", {}, r"quantizer gptq must come last"),
    ("awq+", {}, r"expected names joined by '\+'"),
])
def test_bad_recipes_are_clear_errors(spec, options, match):
    with pytest.raises(SchemeError, match=match):
        Recipe.parse(spec, "w4g128", options)


def test_inapplicable_scheme_is_a_clear_error(tiny_llama):
    with pytest.raises(SchemeError, match="awq quantizes weights only"):
        eq.quantize(wrap(tiny_llama), "awq", "w8a8", calib=calib())
    with pytest.raises(SchemeError, match="dynamic"):
        eq.quantize(wrap(tiny_llama), "dynamic", "w8a8-static")
    with pytest.raises(SchemeError, match="GGML type"):
        eq.quantize(wrap(tiny_llama), "rtn", "Q4_K")


def test_malformed_and_future_recipes_are_refused():
    with pytest.raises(SchemeError, match="version 99"):
        Recipe.from_dict({**Recipe().to_dict(), "version": 99})
    with pytest.raises(SchemeError, match="malformed recipe"):
        Recipe.from_dict({"version": 1, "scheme": "w4g128"})
    with pytest.raises(SchemeError, match="unknown method"):
        Recipe.from_dict({**Recipe().to_dict(), "quantizer": {"name": "nope", "options": {}}})


def test_make_config_types():
    gptq = get_step("gptq")
    assert make_config(gptq, {"damp": 1}).damp == 1.0          # int for a float: lossless
    with pytest.raises(SchemeError):
        make_config(gptq, {"block_size": 1.5})                 # float for an int: refused
    with pytest.raises(SchemeError):
        make_config(gptq, {"act_order": 1})                    # int for a bool: refused


def test_targets_and_overrides():
    r = Recipe(scheme="w4g128", formats=(("*.mlp.down_proj", "w8"), ("lm_head", "w8"),
                                         ("model.layers.0.*", "keep")))
    assert r.scheme_for("model.layers.1.self_attn.q_proj", in_blocks=True).name == "w4g128"
    assert r.scheme_for("model.layers.1.mlp.down_proj", in_blocks=True).name == "w8"
    assert r.scheme_for("model.layers.0.mlp.down_proj", in_blocks=True) is None  # last wins
    assert r.scheme_for("lm_head", in_blocks=False).name == "w8"
    assert Recipe().scheme_for("lm_head", in_blocks=False) is None  # 16-bit unless asked
    assert r.format_for("lm_head", in_blocks=False) == QuantScheme.parse("w8")
    g = Recipe(formats={"lm_head": "q6_k"})
    assert g.format_for("lm_head", in_blocks=False) == "Q6_K"
    with pytest.raises(SchemeError, match="GGML type"):
        g.scheme_for("lm_head", in_blocks=False)
    with pytest.raises(SchemeError, match="valid examples"):
        Recipe(formats=(("lm_head", "w4q9"),))
